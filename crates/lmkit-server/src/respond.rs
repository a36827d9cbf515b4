//! Turning a checked request into engine jobs, and the engine's events into OpenAI responses
//! (one JSON object, or server-sent events ending in `data: [DONE]`).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lmkit_generate::engine::{Event, Job, Refused, TokenInfo};
use lmkit_generate::{FinishReason, GenerateOptions, KvPolicy, SamplingParams};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::openai::Common;
use crate::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

/// A checked request, ready to submit.
pub(crate) struct Planned {
    kind: Kind,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    n: usize,
    stream: bool,
    include_usage: bool,
    logprobs: Option<usize>,
    kv: Option<Arc<dyn KvPolicy>>,
}

static SEEDS: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
static IDS: AtomicU64 = AtomicU64::new(1);

/// Checks the shared fields and tokenizes `text`.
pub(crate) fn plan(
    st: &AppState,
    c: &Common,
    text: &str,
    logprobs: Option<usize>,
    kind: Kind,
) -> Result<Planned, ApiError> {
    let ctx = st.engine.context();
    let prompt = st
        .tokenizer
        .encode_with_bos(text)
        .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    if prompt.len() >= ctx {
        return Err(ApiError::invalid(
            Some("messages"),
            format!(
                "This model's maximum context length is {ctx} tokens. However, your prompt has \
                 {} tokens.",
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let max = c.max_completion_tokens.or(c.max_tokens);
    let max_tokens = match max {
        None => ctx - prompt.len(),
        Some(0) => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                "`max_tokens` must be at least 1",
            ))
        }
        Some(m) if m as usize > ctx - prompt.len() || m > ctx as u64 => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "This model's maximum context length is {ctx} tokens. However, you requested \
                     {} tokens ({} in the prompt, {m} for the completion).",
                    (prompt.len() as u64).saturating_add(m),
                    prompt.len()
                ),
            )
            .with_code("context_length_exceeded"))
        }
        Some(m) => m as usize,
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            "`temperature` must be between 0 and 2",
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            "`top_p` must be in (0, 1]",
        ));
    }
    let n = c.n.unwrap_or(1);
    if !(1..=8).contains(&n) {
        return Err(ApiError::invalid(Some("n"), "`n` must be between 1 and 8"));
    }
    for (name, v) in [
        ("frequency_penalty", c.frequency_penalty),
        ("presence_penalty", c.presence_penalty),
    ] {
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(ApiError::invalid(
                Some(name),
                format!("`{name}` must be between -2 and 2"),
            ));
        }
    }
    let stop = c.stop.as_ref().map(|s| s.list()).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::invalid(Some("stop"), "at most 4 stop sequences"));
    }
    let kv = match (&c.kv, &c.kv_budget) {
        (None, None) if c.kv_recent.is_none() => None,
        (name, budget) => {
            let budget = lmkit_generate::kv::Budget::parse(budget.as_deref().unwrap_or("0.2"))
                .map_err(|e| ApiError::invalid(Some("kv_budget"), e.to_string()))?;
            let p = lmkit_generate::kv::policy(
                name.as_deref().unwrap_or("h2o"),
                budget,
                c.kv_recent.unwrap_or(0.5),
            )
            .map_err(|e| ApiError::invalid(Some("kv"), e.to_string()))?;
            Some(p)
        }
    };
    let seed = c
        .seed
        .unwrap_or_else(|| SEEDS.fetch_add(0x9E37_79B9, Ordering::Relaxed));
    let opts = GenerateOptions {
        sampling: SamplingParams {
            temperature,
            top_k: 0,
            top_p,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
            presence_penalty: c.presence_penalty.unwrap_or(0.0),
            seed,
        },
        max_tokens,
        stop,
        stop_at_eos: !c.ignore_eos.unwrap_or(false),
        truncate_prompt: false,
    };
    opts.sampling
        .validate()
        .map_err(|e| ApiError::invalid(None, e.to_string()))?;
    Ok(Planned {
        kind,
        prompt,
        opts,
        n: n as usize,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs,
        kv,
    })
}

/// Submits the request's `n` jobs; returns the receiver of their events.
fn submit(st: &AppState, p: &Planned) -> Result<mpsc::UnboundedReceiver<(usize, Event)>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    for i in 0..p.n {
        let tx = tx.clone();
        let mut opts = p.opts.clone();
        opts.sampling.seed = opts.sampling.seed.wrapping_add(i as u64);
        let job = Job {
            prompt: p.prompt.clone(),
            opts,
            logprobs: p.logprobs,
            kv: p.kv.clone(),
            sink: Box::new(move |e| {
                if let Event::Text { piece, tokens } = &e {
                    if piece.is_empty() && tokens.is_empty() {
                        return !tx.is_closed();
                    }
                }
                tx.send((i, e)).is_ok()
            }),
        };
        st.engine.submit(job).map_err(|r| match r {
            Refused::QueueFull => ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is busy (queue full); retry later",
            )
            .with_code("server_overloaded"),
            Refused::Stopped => ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            ),
        })?;
    }
    Ok(rx)
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
    }
}

/// Per-token log-probabilities, in the endpoint's format.
fn logprobs_json(st: &AppState, kind: Kind, tokens: &[TokenInfo]) -> Value {
    let text = |id: u32| st.tokenizer.decode(&[id]).unwrap_or_default();
    match kind {
        Kind::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let s = text(t.id);
                    json!({
                        "token": s,
                        "logprob": t.logprob,
                        "bytes": s.as_bytes(),
                        "top_logprobs": t.top.iter().map(|&(id, lp)| {
                            let s = text(id);
                            json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
                        }).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({ "content": content })
        }
        Kind::Completion => {
            let toks: Vec<String> = tokens.iter().map(|t| text(t.id)).collect();
            let lps: Vec<f32> = tokens.iter().map(|t| t.logprob).collect();
            let tops: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let m: serde_json::Map<String, Value> = t
                        .top
                        .iter()
                        .map(|&(id, lp)| (text(id), json!(lp)))
                        .collect();
                    Value::Object(m)
                })
                .collect();
            json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops})
        }
    }
}

/// Runs the request: one JSON answer, or a stream of events.
pub(crate) async fn run(
    st: Arc<AppState>,
    p: Planned,
    started: Instant,
) -> Result<Response, ApiError> {
    let rx = submit(&st, &p)?;
    let id = format!(
        "{}-{:x}",
        if p.kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        IDS.fetch_add(1, Ordering::Relaxed)
    );
    if p.stream {
        Ok(stream(st, p, rx, id, started).into_response())
    } else {
        whole(&st, &p, rx, &id, started).await
    }
}

async fn whole(
    st: &AppState,
    p: &Planned,
    mut rx: mpsc::UnboundedReceiver<(usize, Event)>,
    id: &str,
    started: Instant,
) -> Result<Response, ApiError> {
    let mut text = vec![String::new(); p.n];
    let mut toks: Vec<Vec<TokenInfo>> = vec![Vec::new(); p.n];
    let mut finish: Vec<Option<FinishReason>> = vec![None; p.n];
    let mut completion = 0usize;
    let mut first = true;
    let mut left = p.n;
    while left > 0 {
        let Some((i, e)) = rx.recv().await else {
            return Err(internal("the engine stopped"));
        };
        match e {
            Event::Text { piece, tokens } => {
                if first && !tokens.is_empty() {
                    st.metrics
                        .first_token
                        .observe(started.elapsed().as_secs_f64());
                    first = false;
                }
                text[i].push_str(&piece);
                toks[i].extend(tokens);
            }
            Event::Done {
                finish: f,
                completion_tokens,
                ..
            } => {
                finish[i] = Some(f);
                completion += completion_tokens;
                left -= 1;
            }
            Event::Failed(msg) => return Err(internal(&msg)),
        }
    }
    let choices: Vec<Value> = (0..p.n)
        .map(|i| {
            let lp = p
                .logprobs
                .map(|_| logprobs_json(st, p.kind, &toks[i]))
                .unwrap_or(Value::Null);
            let f = finish[i].map(finish_name);
            match p.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": text[i]},
                    "logprobs": lp,
                    "finish_reason": f,
                }),
                Kind::Completion => json!({
                    "index": i,
                    "text": text[i],
                    "logprobs": lp,
                    "finish_reason": f,
                }),
            }
        })
        .collect();
    let body = json!({
        "id": id,
        "object": if p.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": crate::now(),
        "model": st.cfg.model_id,
        "system_fingerprint": concat!("lmkit-", env!("CARGO_PKG_VERSION")),
        "choices": choices,
        "usage": usage(p.prompt.len(), completion),
    });
    st.metrics.latency.observe(started.elapsed().as_secs_f64());
    Ok(Json(body).into_response())
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn internal(msg: &str) -> ApiError {
    ApiError::status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        format!("generation failed: {msg}"),
    )
}

/// Server-sent events: chunks as the engine produces them, `data: [DONE]` at the end. A task
/// turns engine events into SSE events; when the client goes away the SSE stream is dropped,
/// the task's sends fail, it drops the engine receiver and the engine cancels the jobs.
fn stream(
    st: Arc<AppState>,
    p: Planned,
    mut rx: mpsc::UnboundedReceiver<(usize, Event)>,
    id: String,
    started: Instant,
) -> impl IntoResponse {
    let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let created = crate::now();
        let object = match p.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let chunk = |choice: Value, usage_v: Option<Value>| {
            let mut v = json!({
                "id": id,
                "object": object,
                "created": created,
                "model": st.cfg.model_id,
                "system_fingerprint": concat!("lmkit-", env!("CARGO_PKG_VERSION")),
                "choices": if choice.is_null() { json!([]) } else { json!([choice]) },
            });
            if let Some(u) = usage_v {
                v["usage"] = u;
            }
            SseEvent::default().data(v.to_string())
        };
        let mut started_choice = vec![false; p.n];
        let mut left = p.n;
        let mut completion = 0usize;
        let mut first = true;
        while left > 0 {
            // A client that hangs up before the first token (its prompt still queued or being
            // read) is noticed here: returning drops `rx`, and the engine cancels the jobs.
            let next = tokio::select! {
                e = rx.recv() => e,
                _ = tx.closed() => return,
            };
            let Some((i, e)) = next else {
                let v = internal("the engine stopped").body();
                let _ = tx.send(Ok(SseEvent::default().data(v.to_string()))).await;
                return;
            };
            let ev = match e {
                Event::Text { piece, tokens } => {
                    if first && !tokens.is_empty() {
                        st.metrics
                            .first_token
                            .observe(started.elapsed().as_secs_f64());
                        first = false;
                    }
                    if piece.is_empty() && p.logprobs.is_none() {
                        continue;
                    }
                    let lp = p
                        .logprobs
                        .map(|_| logprobs_json(&st, p.kind, &tokens))
                        .unwrap_or(Value::Null);
                    let choice = match p.kind {
                        Kind::Chat => {
                            let mut delta = json!({"content": piece});
                            if !started_choice[i] {
                                delta["role"] = json!("assistant");
                                started_choice[i] = true;
                            }
                            json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": null})
                        }
                        Kind::Completion => json!({
                            "index": i, "text": piece, "logprobs": lp, "finish_reason": null,
                        }),
                    };
                    chunk(choice, None)
                }
                Event::Done {
                    finish,
                    completion_tokens,
                    ..
                } => {
                    left -= 1;
                    completion += completion_tokens;
                    let f = finish_name(finish);
                    let choice = match p.kind {
                        Kind::Chat => {
                            let delta = if started_choice[i] {
                                json!({})
                            } else {
                                json!({"role": "assistant", "content": ""})
                            };
                            json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": f})
                        }
                        Kind::Completion => json!({
                            "index": i, "text": "", "logprobs": null, "finish_reason": f,
                        }),
                    };
                    chunk(choice, None)
                }
                Event::Failed(msg) => {
                    let v = internal(&msg).body();
                    let _ = tx.send(Ok(SseEvent::default().data(v.to_string()))).await;
                    return;
                }
            };
            if tx.send(Ok(ev)).await.is_err() {
                return; // the client left: dropping `rx` cancels the jobs
            }
        }
        if p.include_usage {
            let u = chunk(Value::Null, Some(usage(p.prompt.len(), completion)));
            if tx.send(Ok(u)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        st.metrics.latency.observe(started.elapsed().as_secs_f64());
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).keep_alive(KeepAlive::default())
}

/// Records the answer's status and returns it.
pub(crate) fn finish(st: &AppState, endpoint: &str, r: Result<Response, ApiError>) -> Response {
    let resp = match r {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    st.metrics.request(endpoint, resp.status().as_u16());
    resp
}
