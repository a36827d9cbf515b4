//! Log-likelihood requests, scored as lm-evaluation-harness's HF backend scores them
//! (`lm_eval/api/model.py` `TemplateLM._encode_pair`, `models/huggingface.py`
//! `_loglikelihood_tokens`), so acc and acc_norm compare with its numbers:
//! - trailing whitespace of the context moves to the front of the continuation;
//! - the continuation's tokens are those of `encode(context + continuation)` after
//!   `encode(context)`'s length (BOS first when the tokenizer adds one, as HF's `encode` does);
//! - an empty context becomes the BOS (else EOS) token;
//! - input longer than the model's context keeps its last `max_length` tokens;
//! - the score is `Σ log softmax(logits)[token]` over the continuation, and `greedy` says
//!   whether every continuation token is the argmax at its position.
//!
//! Requests that share a context (a question's answer choices) run the context once: its KV
//! cache is kept and each continuation runs on top of it, then the cache is cut back.

use lmkit_core::Tensor;
use lmkit_formats::tokenizer::LoadedTokenizer;
use lmkit_models::Llama;

use crate::{Error, Result};

/// One request's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// A request's score.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Score {
    /// `Σ log p(continuation token)`.
    pub logprob: f64,
    /// Every continuation token was the model's top choice.
    pub greedy: bool,
    /// Continuation tokens scored.
    pub tokens: usize,
    /// Continuation tokens that were the model's top choice.
    pub correct: usize,
    /// `Σ_tokens Σ_v (p_v − [v = token])²`: the Brier score summed over the continuation.
    pub brier: f64,
}

/// `_encode_pair`: the context's and the continuation's tokens.
pub fn encode_pair(tok: &LoadedTokenizer, context: &str, continuation: &str) -> Result<Encoded> {
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    let continuation = format!("{moved}{continuation}");
    let context = trimmed;
    let enc = |s: &str| -> Result<Vec<u32>> {
        tok.encode_with_bos(s)
            .map_err(|e| Error::Data(format!("cannot tokenize: {e}")))
    };
    if context.is_empty() {
        let prefix = tok
            .special
            .bos
            .or(tok.special.eos)
            .ok_or_else(|| Error::Data("an empty context needs a BOS or EOS token".into()))?;
        let cont = tok
            .encode(&continuation)
            .map_err(|e| Error::Data(format!("cannot tokenize: {e}")))?;
        return Ok(Encoded {
            context: vec![prefix],
            continuation: cont,
        });
    }
    let whole = enc(&format!("{context}{continuation}"))?;
    let ctx = enc(context)?;
    let cut = ctx.len().min(whole.len());
    Ok(Encoded {
        context: ctx,
        continuation: whole[cut..].to_vec(),
    })
}

/// One position's score of `target`: `log softmax(row)[target]`, whether `target` is the
/// row's argmax (first index on ties), and the Brier score `Σ_v (p_v − [v = target])²`.
fn token_score(buf: &mut Vec<f32>, row: &[f32], target: usize) -> (f64, bool, f64) {
    let lp = -crate::perplexity::row_nll(buf, row, target);
    // `row_nll` leaves `exp(row − max)` in `buf`.
    let sum: f64 = buf.iter().map(|&e| f64::from(e)).sum();
    let sq: f64 = buf.iter().map(|&e| f64::from(e) * f64::from(e)).sum();
    let brier = sq / (sum * sum) - 2.0 * lp.exp() + 1.0;
    let arg = row
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0;
    (lp, arg == target, brier)
}

/// The model's hidden states for `ids` on top of `cache`, `(t, c)` rows as one tensor.
fn hidden(model: &Llama, ids: &[u32], cache: &mut lmkit_models::KvCache) -> Result<Tensor> {
    let x = Tensor::from_vec(ids.to_vec(), (1, ids.len()), model.device())?;
    let h = model.forward_hidden(&x, cache)?;
    Ok(h.squeeze(0)?)
}

/// Logits `(n, v)` of hidden-state rows `(n, c)`, flattened.
pub fn logits_of(model: &Llama, rows: &Tensor) -> Result<Vec<f32>> {
    Ok(model
        .lm_head()
        .forward(rows)
        .map_err(lmkit_models::Error::from)?
        .to_dtype(lmkit_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Scores `targets` against logit rows (one row per target, flattened).
pub fn score_logits(logits: &[f32], targets: &[u32]) -> Score {
    let v = logits.len() / targets.len().max(1);
    let mut buf = Vec::new();
    let mut s = Score {
        logprob: 0.0,
        greedy: true,
        tokens: targets.len(),
        correct: 0,
        brier: 0.0,
    };
    for (row, &t) in logits.chunks_exact(v.max(1)).zip(targets) {
        let (lp, top, brier) = token_score(&mut buf, row, t as usize);
        s.logprob += lp;
        s.greedy &= top;
        s.correct += usize::from(top);
        s.brier += brier;
    }
    s
}

/// Scores `continuation` after a context already in `cache` whose last position gave
/// `last_logits`; the cache is cut back to the context afterwards.
pub fn score_on_cache(
    model: &Llama,
    cache: &mut lmkit_models::KvCache,
    context_len: usize,
    last_logits: &[f32],
    continuation: &[u32],
) -> Result<Score> {
    let mut logits = last_logits.to_vec();
    if continuation.len() > 1 {
        let h = hidden(model, &continuation[..continuation.len() - 1], cache)?;
        cache.truncate(context_len)?;
        logits.extend(logits_of(model, &h)?);
    }
    Ok(score_logits(&logits, continuation))
}

/// Log-probabilities of `rows (n, c)` of hidden states predicting `targets`.
fn score_rows(model: &Llama, rows: &Tensor, targets: &[u32]) -> Result<Score> {
    Ok(score_logits(&logits_of(model, rows)?, targets))
}

/// Scores requests that share one context: the context runs once (left-truncated as a whole
/// with the longest continuation when they do not fit `max_length`; the flag says so; the
/// harness scores choices one by one when cutting is needed, so each keeps its own context).
pub fn score_shared(
    model: &Llama,
    context: &[u32],
    continuations: &[Vec<u32>],
    max_length: usize,
) -> Result<(Vec<Score>, bool)> {
    if context.is_empty() {
        return Err(Error::Data("a request has no context tokens".into()));
    }
    let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
    if longest > max_length {
        return Err(Error::Data(format!(
            "a continuation of {longest} tokens does not fit the model's context of {max_length}"
        )));
    }
    // Input = (context + continuation)[-(max_length + 1):][:-1].
    let keep = (max_length + 1 - longest).min(context.len());
    let truncated = keep < context.len();
    let context = &context[context.len() - keep..];
    let mut cache = model.new_cache();
    let h = hidden(model, context, &mut cache)?;
    let last = h.narrow(0, context.len() - 1, 1)?;
    let mut out = Vec::with_capacity(continuations.len());
    for c in continuations {
        // No tokens to score (the continuation merged into the context's last token): as
        // lm-eval, an empty sum, greedy.
        if c.is_empty() {
            out.push(Score {
                logprob: 0.0,
                greedy: true,
                tokens: 0,
                correct: 0,
                brier: 0.0,
            });
            continue;
        }
        let rows = if c.len() > 1 {
            let h = hidden(model, &c[..c.len() - 1], &mut cache)?;
            cache.truncate(context.len())?;
            Tensor::cat(&[&last, &h], 0)?
        } else {
            last.clone()
        };
        out.push(score_rows(model, &rows, c)?);
    }
    Ok((out, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_score_is_log_softmax_argmax_and_brier() {
        let mut b = Vec::new();
        let (lp, top, brier) = token_score(&mut b, &[1.0, 2.0, 3.0], 2);
        let z = 1f64.exp() + 2f64.exp() + 3f64.exp();
        assert!((lp - (3.0 - z.ln())).abs() < 1e-6 && top);
        let p: Vec<f64> = [1f64, 2.0, 3.0].iter().map(|x| x.exp() / z).collect();
        let want = p[0].powi(2) + p[1].powi(2) + (p[2] - 1.0).powi(2);
        assert!((brier - want).abs() < 1e-6, "{brier} vs {want}");
        assert!(!token_score(&mut b, &[5.0, 5.0], 1).1 && token_score(&mut b, &[5.0, 5.0], 0).1);
        // Certain and right: 0; certain and wrong: 2.
        assert!(token_score(&mut b, &[0.0, 100.0], 1).2.abs() < 1e-9);
        assert!((token_score(&mut b, &[0.0, 100.0], 0).2 - 2.0).abs() < 1e-9);
    }
}
