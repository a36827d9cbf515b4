//! `lmkit run`: generate from a prompt, streamed to stdout.

use std::io::Write;

use anyhow::{Context, Result};
use lmkit::{GenerateOptions, Message, SamplingParams, Session};

use crate::common::ModelArgs;

/// Sampling and stopping options shared by `run` and `chat`.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum new tokens.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 disables).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling mass (1 disables).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than min-p × the top probability (0 disables).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for tokens seen in the last --repeat-last-n (1 disables).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// OpenAI's frequency penalty over the generated tokens, in [-2, 2] (0 disables).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty over the generated tokens, in [-2, 2] (0 disables).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Greedy decoding (same as --temperature 0).
    #[arg(long)]
    pub greedy: bool,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-turn tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Drop the oldest prompt tokens instead of failing when the prompt does not fit the context.
    #[arg(long)]
    pub truncate_prompt: bool,
}

impl SamplingArgs {
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            sampling: SamplingParams {
                temperature: if self.greedy { 0.0 } else { self.temperature },
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n,
                frequency_penalty: self.frequency_penalty,
                presence_penalty: self.presence_penalty,
                seed: self.seed,
            },
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            stop_at_eos: !self.ignore_eos,
            truncate_prompt: self.truncate_prompt,
        }
    }
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit run \"Once upon a time\" -n 64\n  lmkit run --chat \"What is the capital of France?\" --greedy\n  lmkit run --model qwen2.gguf \"def fib(n):\" --stop \"\\n\\n\"\n  lmkit run \"Hello\" --json"
)]
pub struct Args {
    /// The prompt.
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub kv: crate::kv::KvArgs,
    /// Print one JSON object (text, tokens, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

pub fn main(a: Args) -> Result<()> {
    let opts = a.sampling.options();
    opts.sampling.validate()?;
    let m = a.model.load()?;
    let text = if a.chat {
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &a.prompt));
        m.chat.render(&msgs, true)?
    } else {
        a.prompt.clone()
    };
    let ids = m.tokenizer.encode_with_bos(&text)?;
    let mut session = match a.kv.single()? {
        Some(p) => Session::with_policy(&m.model, p)?,
        None => Session::new(&m.model),
    };
    let mut stdout = std::io::stdout();
    let json = a.json;
    let out = lmkit::generate(
        &m.model,
        &m.tokenizer,
        &mut session,
        &ids,
        &opts,
        &mut |piece| {
            if !json {
                print!("{piece}");
                let _ = stdout.flush();
            }
            true
        },
    )
    .context("generation failed")?;
    if json {
        let v = serde_json::json!({
            "text": out.text,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.tokens.len(),
            "finish_reason": format!("{:?}", out.finish).to_lowercase(),
            "prompt_tokens_per_sec": out.prompt_tokens_per_sec(),
            "gen_tokens_per_sec": out.gen_tokens_per_sec(),
            "kv_policy": session.cache.policy().map_or("full".into(), |p| p.name()),
            "kv_entries": session.cache.entries(),
            "kv_bytes": session.cache.kv_bytes().0,
            "kv_peak_bytes": session.cache.kv_bytes().1,
            "tokens": out.tokens,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens at {:.1} t/s, {} generated at {:.1} t/s, finish: {:?}]",
            out.prompt_tokens,
            out.prompt_tokens_per_sec(),
            out.tokens.len(),
            out.gen_tokens_per_sec(),
            out.finish
        );
    }
    Ok(())
}
