//! Perplexity over fixed windows, scored as llama.cpp's `llama-perplexity` scores them by default,
//! so lmkit's numbers compare with published llama.cpp figures.
//!
//! Convention (llama.cpp `tools/perplexity/perplexity.cpp`, `perplexity()`):
//! - the whole text is tokenized once (BOS prepended only if the model asks for it);
//! - window `i` is tokens `[i·stride, i·stride + ctx)`; by default `stride = ctx`
//!   (non-overlapping) and only whole windows count;
//! - if the model adds BOS, the first token of every window is replaced by BOS;
//! - in each window only the second half is scored: logits at positions `ctx/2 .. ctx−2` predict
//!   tokens `ctx/2+1 .. ctx−1` (`ctx − 1 − ctx/2` predictions per window), so every scored token
//!   has at least `ctx/2` tokens of context;
//! - `PPL = exp(mean NLL)`; the ± is the standard error of the mean NLL carried through the
//!   exponential: `PPL · sqrt(var(NLL) / (n − 1))`.

use std::time::Instant;

use lmkit_core::Tensor;
use lmkit_models::Llama;
use serde::Serialize;

use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct PplOptions {
    pub ctx: usize,
    /// Distance between window starts (default `ctx`).
    pub stride: Option<usize>,
    /// First scored position in a window (default `ctx / 2`, llama.cpp's choice).
    pub score_from: Option<usize>,
    pub max_windows: Option<usize>,
    /// Replace the first token of each window with this id (llama.cpp does so when the model
    /// adds BOS).
    pub bos: Option<u32>,
    /// Windows run together in one forward pass.
    pub batch: usize,
}

impl Default for PplOptions {
    fn default() -> Self {
        Self {
            ctx: 512,
            stride: None,
            score_from: None,
            max_windows: None,
            bos: None,
            batch: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PplReport {
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub mean_nll: f64,
    pub windows: usize,
    pub ctx: usize,
    pub stride: usize,
    /// Tokens scored.
    pub scored_tokens: usize,
    /// Tokens run through the model.
    pub processed_tokens: usize,
    pub total_tokens: usize,
    pub seconds: f64,
    pub tokens_per_sec: f64,
}

/// `−log softmax(row)[target]` of every row of `logits` (`rows × v`), in parallel:
/// `logsumexp(row) − row[target]`, with the max subtracted first.
fn nlls(logits: &[f32], v: usize, targets: &[usize]) -> Vec<f64> {
    use rayon::prelude::*;
    logits
        .par_chunks_exact(v)
        .zip(targets.par_iter())
        .map_init(Vec::new, |buf, (row, &target)| row_nll(buf, row, target))
        .collect()
}

/// `−log softmax(row)[target] = logsumexp(row) − row[target]`, the max subtracted first
/// (`buf` is scratch space).
pub(crate) fn row_nll(buf: &mut Vec<f32>, row: &[f32], target: usize) -> f64 {
    buf.clear();
    buf.extend_from_slice(row);
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum = lmkit_kernels::ops::softmax_unnormalized(lmkit_kernels::isa(), buf) as f64;
    sum.ln() + max as f64 - row[target] as f64
}

/// Computes perplexity of `tokens`; `progress(done_windows, total_windows)` is called after each
/// batch.
pub fn perplexity(
    model: &Llama,
    tokens: &[u32],
    opts: &PplOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplReport> {
    let ctx = opts.ctx;
    let bad = |option: &str, why: String| Error::Option {
        option: option.into(),
        why,
    };
    if ctx < 2 {
        return Err(bad("ctx", format!("{ctx} is too small (minimum 2)")));
    }
    let max_ctx = model.config().max_position_embeddings;
    if ctx > max_ctx {
        return Err(bad(
            "ctx",
            format!("{ctx} exceeds the model's context length {max_ctx}"),
        ));
    }
    let stride = opts.stride.unwrap_or(ctx);
    if stride == 0 {
        return Err(bad("stride", "must be at least 1".into()));
    }
    let first = opts.score_from.unwrap_or(ctx / 2);
    if first >= ctx - 1 {
        return Err(bad(
            "score-from",
            format!("{first} leaves nothing to score in a window of {ctx}"),
        ));
    }
    if opts.batch == 0 {
        return Err(bad("batch", "must be at least 1".into()));
    }
    if tokens.len() < ctx {
        return Err(Error::TooShort {
            tokens: tokens.len(),
            ctx,
        });
    }
    let mut windows = (tokens.len() - ctx) / stride + 1;
    if let Some(m) = opts.max_windows {
        windows = windows.min(m);
    }
    let t0 = Instant::now();
    let (mut sum, mut sum2, mut n) = (0.0f64, 0.0f64, 0usize);
    let mut done = 0;
    while done < windows {
        let b = opts.batch.min(windows - done);
        let mut ids = Vec::with_capacity(b * ctx);
        for w in done..done + b {
            let start = w * stride;
            let mut win = tokens[start..start + ctx].to_vec();
            if let Some(bos) = opts.bos {
                win[0] = bos;
            }
            ids.extend(win);
        }
        // The native CPU path runs one sequence per call; the reference path takes the batch.
        let mut hidden = Vec::with_capacity(b);
        if model.is_native() {
            for win in ids.chunks_exact(ctx) {
                let x = Tensor::from_vec(win.to_vec(), (1, ctx), model.device())?;
                hidden.push(model.forward_hidden(&x, &mut model.new_cache())?);
            }
        } else {
            let x = Tensor::from_vec(ids.clone(), (b, ctx), model.device())?; // (b, t)
            hidden.push(model.forward_hidden(&x, &mut model.new_cache())?);
        }
        let hidden = Tensor::cat(&hidden, 0)?; // (b, t, c)
                                               // Only the scored positions go through the output layer.
        let s = ctx - 1 - first;
        let hidden = hidden.narrow(1, first, s)?;
        let logits = model
            .lm_head()
            .forward(&hidden)
            .map_err(lmkit_models::Error::from)?; // (b, s, v)
        let logits = logits
            .to_dtype(lmkit_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let v = logits.len() / (b * s);
        let targets: Vec<usize> = (0..b * s)
            .map(|k| ids[(k / s) * ctx + first + k % s + 1] as usize)
            .collect();
        let nll = nlls(&logits, v, &targets);
        if let Some(k) = nll.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                at: format!("window {}, position {}", done + k / s + 1, first + k % s),
            });
        }
        for nll in nll {
            sum += nll;
            sum2 += nll * nll;
            n += 1;
        }
        done += b;
        progress(done, windows);
    }
    let mean = sum / n as f64;
    let var = (sum2 / n as f64 - mean * mean).max(0.0);
    let se = if n > 1 {
        (var / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let ppl = mean.exp();
    let seconds = t0.elapsed().as_secs_f64();
    Ok(PplReport {
        ppl,
        ppl_stderr: ppl * se,
        mean_nll: mean,
        windows,
        ctx,
        stride,
        scored_tokens: n,
        processed_tokens: windows * ctx,
        total_tokens: tokens.len(),
        seconds,
        tokens_per_sec: (windows * ctx) as f64 / seconds.max(1e-9),
    })
}
