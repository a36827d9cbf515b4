//! Streamed generation with a reusable KV cache.
//!
//! A [`Session`] keeps the cache and the tokens it holds; a new prompt that shares a prefix with
//! them (the next turn of a chat) only runs the new tokens.

use std::sync::Arc;
use std::time::Instant;

use lmkit_core::Tensor;
use lmkit_formats::tokenizer::LoadedTokenizer;
use lmkit_models::{KvCache, KvPolicy, Llama};

use crate::error::NonFinite;
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::{StopMatcher, StopState};
use crate::{Error, Result};

/// Tokens per forward pass when reading a prompt.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Text that ends generation (not included in the output).
    pub stop: Vec<String>,
    /// Stop at the model's end-of-turn / end-of-text tokens.
    pub stop_at_eos: bool,
    /// Drop the oldest prompt tokens when prompt + max tokens exceed the context (otherwise an
    /// error).
    pub truncate_prompt: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: vec![],
            stop_at_eos: true,
            truncate_prompt: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Reached `max_tokens`.
    Length,
    /// An end-of-turn token or a stop string.
    Stop,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub prompt_tokens: usize,
    /// Prompt tokens actually run (the rest came from the session cache).
    pub prompt_tokens_run: usize,
    pub finish: FinishReason,
    pub prompt_secs: f64,
    pub gen_secs: f64,
}

impl Generation {
    pub fn gen_tokens_per_sec(&self) -> f64 {
        self.tokens.len() as f64 / self.gen_secs.max(1e-9)
    }
    pub fn prompt_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens_run as f64 / self.prompt_secs.max(1e-9)
    }
}

/// A KV cache plus the tokens it holds.
#[derive(Debug)]
pub struct Session {
    pub cache: KvCache,
    pub tokens: Vec<u32>,
}

impl Session {
    pub fn new(model: &Llama) -> Self {
        Self {
            cache: model.new_cache(),
            tokens: vec![],
        }
    }

    /// A session whose cache evicts under `policy` (see `lmkit_models::kv_policy`; H2O keeps
    /// heavy hitters and a recent window).
    pub fn with_policy(model: &Llama, policy: Arc<dyn KvPolicy>) -> Result<Self> {
        let mut cache = model.new_cache();
        cache.set_policy(policy)?;
        Ok(Self {
            cache,
            tokens: vec![],
        })
    }

    /// Runs `ids` through the model, reusing the cached common prefix; returns the logits of the
    /// last position `(v,)` and how many tokens came from the cache.
    pub fn feed(&mut self, model: &Llama, ids: &[u32]) -> Result<(Vec<f32>, usize)> {
        let common = self
            .tokens
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count();
        // Always run at least the last token so there are logits to sample from.
        let keep = common.min(ids.len().saturating_sub(1));
        self.cache.truncate(keep)?;
        self.tokens.truncate(keep);
        let mut logits = None;
        for chunk in ids[keep..].chunks(PREFILL_CHUNK) {
            let x = Tensor::new(chunk, model.device())?.unsqueeze(0)?; // (1, t)
            logits = Some(model.forward_last(&x, &mut self.cache)?);
            self.tokens.extend_from_slice(chunk);
        }
        let logits = logits
            .ok_or(Error::EmptyPrompt)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        NonFinite::check(&logits, ids.len() - 1).map_err(Error::NonFinite)?;
        Ok((logits, keep))
    }
}

/// Generates from `prompt` (token ids), streaming text pieces to `on_text`; return `false`
/// from `on_text` to stop early.
pub fn generate(
    model: &Llama,
    tok: &LoadedTokenizer,
    session: &mut Session,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let ctx = model.config().max_position_embeddings;
    let mut prompt = prompt;
    if prompt.len().saturating_add(opts.max_tokens) > ctx {
        if !opts.truncate_prompt || opts.max_tokens >= ctx {
            return Err(Error::PromptTooLong {
                prompt: prompt.len(),
                new: opts.max_tokens,
                context: ctx,
            });
        }
        let keep = ctx - opts.max_tokens;
        tracing::warn!("prompt truncated to its last {keep} tokens");
        prompt = &prompt[prompt.len() - keep..];
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let stops = StopMatcher::new(opts.stop.clone());
    // A KV budget given as a share resolves against the whole generation.
    session.cache.plan(prompt.len() + opts.max_tokens);
    let t0 = Instant::now();
    let (mut logits, reused) = session.feed(model, prompt)?;
    let prompt_run = prompt.len() - reused;
    let prompt_secs = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut out: Vec<u32> = Vec::with_capacity(opts.max_tokens);
    let mut emitted = 0usize;
    let mut text = String::new();
    let mut finish = FinishReason::Length;
    let mut history: Vec<u32> = prompt.to_vec();
    while out.len() < opts.max_tokens {
        let next = sampler.sample(&mut logits, &history);
        if opts.stop_at_eos && tok.special.stop.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        out.push(next);
        history.push(next);
        text = tok.decode(&out)?;
        // Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until it completes.
        let settled = text.trim_end_matches('\u{FFFD}').len();
        match stops.check(&text[..settled]) {
            StopState::Stop { at } => {
                if at > emitted {
                    on_text(&text[emitted..at]);
                }
                text.truncate(at);
                finish = FinishReason::Stop;
                break;
            }
            StopState::Continue { emit_to } => {
                if emit_to > emitted {
                    let keep_going = on_text(&text[emitted..emit_to]);
                    emitted = emit_to;
                    if !keep_going {
                        finish = FinishReason::Stop;
                        break;
                    }
                }
            }
        }
        if out.len() == opts.max_tokens {
            break;
        }
        logits = session.feed(model, &history)?.0;
    }
    if finish == FinishReason::Length && text.len() > emitted {
        on_text(&text[emitted..]);
    }
    Ok(Generation {
        tokens: out,
        text,
        prompt_tokens: prompt.len(),
        prompt_tokens_run: prompt_run,
        finish,
        prompt_secs,
        gen_secs: t1.elapsed().as_secs_f64(),
    })
}
