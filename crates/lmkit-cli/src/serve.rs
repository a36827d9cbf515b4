//! `lmkit serve`: the OpenAI-compatible server with continuous batching.

use std::sync::Arc;

use anyhow::{Context, Result};
use lmkit::generate_mod::engine::{self, EngineConfig};
use lmkit_server::{AppState, ServerConfig};

use crate::common::ModelArgs;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit serve --port 8080\n  lmkit serve --max-batch 16 --api-key secret\n  curl http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'\n\nRoutes: POST /v1/chat/completions, POST /v1/completions (\"stream\": true for server-sent\nevents), GET /v1/models, GET /health, GET /metrics (Prometheus). Requests join the running\nbatch between decoding steps; a full queue answers 503. lmkit extensions per request: \"kv\":\n\"h2o\", \"kv_budget\": \"0.2\". SIGTERM or Ctrl-C stops taking connections and finishes the\nrequests in flight."
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes (or set LMKIT_API_KEY).
    #[arg(long, env = "LMKIT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences decoded together (slots).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_batch: u32,
    /// Requests waiting for a slot before the server answers 503.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub max_queue: u32,
    /// Prompt tokens read per step, over all requests.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub prefill_tokens: u32,
    /// Prompts kept (keys and values) for later requests that start the same way: the chat
    /// template's system prompt, a shared preamble; 0 turns it off.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub prefix_cache: u32,
    /// Model id reported by /v1/models (default: the file name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn main(a: Args) -> Result<()> {
    let m = a.model.load()?;
    if !m.model.is_native() {
        tracing::warn!(
            "this model runs on the reference path ({:?}, {:?}): requests interleave but are \
             not batched; on the CPU, drop --dtype/--dequantize for batched decoding",
            m.model.device().location(),
            m.model.dtype()
        );
    }
    let model_id = a.model_id.clone().unwrap_or_else(|| {
        m.path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned())
    });
    let tokenizer = Arc::new(m.tokenizer);
    let chat = Arc::new(m.chat);
    let (handle, thread) = engine::start(
        Arc::new(m.model),
        tokenizer.clone(),
        EngineConfig {
            max_batch: a.max_batch as usize,
            max_queue: a.max_queue as usize,
            prefill_tokens: a.prefill_tokens as usize,
            prefix_cache: a.prefix_cache as usize,
        },
    )?;
    let state = Arc::new(AppState::new(
        handle,
        tokenizer,
        chat,
        ServerConfig {
            model_id,
            api_key: a.api_key.clone(),
            max_body: a.max_body,
        },
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let addr = format!("{}:{}", a.host, a.port);
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "lmkit serve: http://{local} (model {}, {} slots)",
            state.cfg.model_id, a.max_batch
        );
        lmkit_server::serve(listener, state, lmkit_server::shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    // Every handle is gone with the router: the engine finishes and its thread ends.
    drop(rt);
    let _ = thread.join();
    Ok(())
}
