//! Perplexity under a KV-cache policy, computed token by token as a streaming decoder sees it:
//! each window of `ctx` tokens is fed one token at a time into a fresh cache that evicts as it
//! goes (see `lmkit_models::kv_policy`), and every prediction from `score_from` on is scored.
//! Given the full cache's predictions, it also reports how often the policy's top-1 token agrees
//! with them.

use std::sync::Arc;
use std::time::Instant;

use lmkit_core::Tensor;
use lmkit_models::{KvPolicy, Llama};
use serde::Serialize;

use crate::perplexity::row_nll;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct KvPplOptions {
    /// Tokens per window (each window starts a fresh cache).
    pub ctx: usize,
    /// First scored prediction of a window: the logits at position `score_from` predict token
    /// `score_from + 1`.
    pub score_from: usize,
    pub max_windows: Option<usize>,
    /// Replace the first token of each window with this id.
    pub bos: Option<u32>,
}

impl Default for KvPplOptions {
    fn default() -> Self {
        Self {
            ctx: 2048,
            score_from: 0,
            max_windows: None,
            bos: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct KvPplReport {
    pub policy: String,
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub mean_nll: f64,
    pub windows: usize,
    pub ctx: usize,
    pub scored_tokens: usize,
    /// Share of scored positions whose top-1 token equals the full cache's (when given).
    pub top1_agreement: Option<f64>,
    /// Entries per head at the end of a window, averaged over windows.
    pub final_entries: f64,
    /// Most bytes of keys and values held at once.
    pub peak_kv_bytes: usize,
    pub seconds: f64,
    pub tokens_per_sec: f64,
}

/// Streams every window of `tokens` through `model` under `policy`. `reference` is the full
/// cache's top-1 token at each scored position (as this function returns it), for the agreement.
/// Returns the report and the top-1 tokens; `progress(tokens_done, tokens_total)` after each
/// token.
pub fn kv_perplexity(
    model: &Llama,
    tokens: &[u32],
    opts: &KvPplOptions,
    policy: Arc<dyn KvPolicy>,
    reference: Option<&[u32]>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(KvPplReport, Vec<u32>)> {
    let ctx = opts.ctx;
    let bad = |option: &str, why: String| Error::Option {
        option: option.into(),
        why,
    };
    let max_ctx = model.config().max_position_embeddings;
    if ctx < 2 || ctx > max_ctx {
        return Err(bad(
            "ctx",
            format!("{ctx} must be between 2 and the model's context length {max_ctx}"),
        ));
    }
    if opts.score_from >= ctx - 1 {
        return Err(bad(
            "score-from",
            format!(
                "{} leaves nothing to score in a window of {ctx}",
                opts.score_from
            ),
        ));
    }
    let available = tokens.len() / ctx;
    if available == 0 {
        return Err(Error::TooShort {
            tokens: tokens.len(),
            ctx,
        });
    }
    let windows = opts.max_windows.map_or(available, |m| m.min(available));
    let per_window = ctx - 1 - opts.score_from;
    if let Some(r) = reference {
        if r.len() != windows * per_window {
            return Err(bad(
                "reference",
                format!(
                    "{} reference predictions for {} scored positions",
                    r.len(),
                    windows * per_window
                ),
            ));
        }
    }
    let t0 = Instant::now();
    let v = model.config().vocab_size;
    let mut nll = Vec::with_capacity(windows * per_window);
    let mut top = Vec::with_capacity(windows * per_window);
    let (mut entries, mut peak) = (0usize, 0usize);
    let mut buf = Vec::new();
    for w in 0..windows {
        let mut ids = tokens[w * ctx..(w + 1) * ctx].to_vec();
        if let Some(b) = opts.bos {
            ids[0] = b;
        }
        let mut cache = model.new_cache();
        cache.set_policy(policy.clone())?;
        cache.plan(ctx);
        cache.reserve(ctx.min(policy.capacity(ctx, ctx).saturating_add(1)));
        for i in 0..ctx - 1 {
            let x = Tensor::new(&ids[i..=i], model.device())?.unsqueeze(0)?;
            let logits = model.forward_last(&x, &mut cache)?;
            if i >= opts.score_from {
                let row = logits.flatten_all()?.to_vec1::<f32>()?;
                if row.len() != v {
                    return Err(Error::Data(format!("{} logits for {v} tokens", row.len())));
                }
                let x = row_nll(&mut buf, &row, ids[i + 1] as usize);
                if !x.is_finite() {
                    return Err(Error::NonFinite {
                        at: format!("window {}, position {i}", w + 1),
                    });
                }
                nll.push(x);
                top.push(argmax(&row));
            }
            progress(w * (ctx - 1) + i + 1, windows * (ctx - 1));
        }
        entries += cache.entries();
        peak = peak.max(cache.kv_bytes().1);
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = nll.len() as f64;
    let mean = nll.iter().sum::<f64>() / n;
    let var = nll.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let ppl = mean.exp();
    let agreement = reference.map(|r| {
        r.iter().zip(&top).filter(|(a, b)| a == b).count() as f64 / top.len().max(1) as f64
    });
    Ok((
        KvPplReport {
            policy: policy.name(),
            ppl,
            ppl_stderr: ppl * (var / n).sqrt(),
            mean_nll: mean,
            windows,
            ctx,
            scored_tokens: nll.len(),
            top1_agreement: agreement,
            final_entries: entries as f64 / windows as f64,
            peak_kv_bytes: peak,
            seconds: secs,
            tokens_per_sec: (windows * (ctx - 1)) as f64 / secs.max(1e-9),
        },
        top,
    ))
}

/// Index of the largest value (the first of ties).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}
