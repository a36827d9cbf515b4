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
//! Requests that share tokens (a question's answer choices, few-shot examples) run them once:
//! see [`LoglikScorer`].

use std::sync::Arc;

use lmkit_core::Tensor;
use lmkit_formats::tokenizer::LoadedTokenizer;
use lmkit_models::{KvPolicy, Llama};
use rayon::prelude::*;

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
        .logits_of_hidden(rows)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Scores `targets` against logit rows (one row per target, flattened).
pub fn score_logits(logits: &[f32], targets: &[u32]) -> Score {
    let v = logits.len() / targets.len().max(1);
    let mut buf = Vec::new();
    let rows: Vec<_> = logits
        .chunks_exact(v.max(1))
        .zip(targets)
        .map(|(row, &t)| token_score(&mut buf, row, t as usize))
        .collect();
    sum_scores(&rows)
}

/// A continuation's score from its tokens' `(log p, top choice, Brier)`, summed in order.
fn sum_scores(rows: &[(f64, bool, f64)]) -> Score {
    let mut s = Score {
        logprob: 0.0,
        greedy: true,
        tokens: rows.len(),
        correct: 0,
        brier: 0.0,
    };
    for &(lp, top, brier) in rows {
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

/// The model input of a request as lm-eval builds it:
/// `(context + continuation)[-(max_length + 1):][:-1]`, whether it was cut, and the first
/// position whose logits are scored (the continuation is predicted by the input's last
/// `continuation.len()` positions).
fn request_input(e: &Encoded, max_length: usize) -> Result<(Vec<u32>, bool, usize)> {
    if e.context.is_empty() {
        return Err(Error::Data("a request has no context tokens".into()));
    }
    let n = e.continuation.len();
    if n > max_length {
        return Err(Error::Data(format!(
            "a continuation of {n} tokens does not fit the model's context of {max_length}"
        )));
    }
    let whole = e.context.len() + n;
    let skip = whole.saturating_sub(max_length + 1);
    let input: Vec<u32> = e
        .context
        .iter()
        .chain(&e.continuation)
        .skip(skip)
        .take(whole - skip - 1)
        .copied()
        .collect();
    let first = input.len() - n;
    Ok((input, skip > 0, first))
}

/// Scores log-likelihood requests with as little recomputation as exactness allows: the
/// requests of one call (a question's choices) share their longest common token prefix, which
/// runs once, and their remainders run as branches on top of it, all in one batch (tree
/// attention: each branch sees the prefix and its own tokens only); a prefix also shared with
/// the previous call (few-shot examples) stays in the KV cache between calls. Every request is scored exactly as if run
/// alone from an empty cache.
///
/// Under a KV-cache policy ([`LoglikScorer::with_policy`]) each request instead streams through
/// its own evicting cache one token at a time, as a decoder under that policy reads it (the
/// H2O paper's setting for its lm-evaluation-harness results), and nothing is shared.
pub struct LoglikScorer<'m> {
    model: &'m Llama,
    cache: lmkit_models::KvCache,
    /// The tokens in `cache`.
    cached: Vec<u32>,
    policy: Option<Arc<dyn KvPolicy>>,
}

impl<'m> LoglikScorer<'m> {
    pub fn new(model: &'m Llama) -> Self {
        Self::with_policy(model, None)
    }

    /// A scorer whose requests stream through a cache under `policy` (`None`: the full cache,
    /// shared prefixes).
    pub fn with_policy(model: &'m Llama, policy: Option<Arc<dyn KvPolicy>>) -> Self {
        Self {
            model,
            cache: model.new_cache(),
            cached: Vec::new(),
            policy,
        }
    }

    /// Scores `requests`; the flag says whether any input was cut to fit `max_length`.
    pub fn score(&mut self, requests: &[Encoded], max_length: usize) -> Result<(Vec<Score>, bool)> {
        let mut prepared = Vec::with_capacity(requests.len());
        for e in requests {
            prepared.push(request_input(e, max_length)?);
        }
        let cut = prepared.iter().any(|p| p.1);
        let (out, cut) = self.score_prepared(requests, &prepared, cut)?;
        match out.iter().position(|s| !s.logprob.is_finite()) {
            Some(r) => Err(Error::NonFinite {
                at: format!("request {}", r + 1),
            }),
            None => Ok((out, cut)),
        }
    }

    fn score_prepared(
        &mut self,
        requests: &[Encoded],
        prepared: &[(Vec<u32>, bool, usize)],
        cut: bool,
    ) -> Result<(Vec<Score>, bool)> {
        if let Some(policy) = &self.policy {
            let mut out = Vec::with_capacity(requests.len());
            for (e, (input, _, first)) in requests.iter().zip(prepared) {
                out.push(self.streamed(policy, input, *first, &e.continuation)?);
            }
            return Ok((out, cut));
        }
        // Requests with something to score; an empty continuation (merged into the context's
        // last token) scores an empty sum, greedy, as in lm-eval.
        let live: Vec<usize> = (0..requests.len())
            .filter(|&r| !requests[r].continuation.is_empty())
            .collect();
        let empty = Score {
            logprob: 0.0,
            greedy: true,
            tokens: 0,
            correct: 0,
            brier: 0.0,
        };
        let mut out = vec![empty; requests.len()];
        let Some(&r0) = live.first() else {
            return Ok((out, cut));
        };
        let first_input = &prepared[r0].0;
        let shared = live.iter().fold(first_input.len(), |n, &r| {
            common_prefix(&first_input[..n], &prepared[r].0)
        });
        let first_scored = live.iter().map(|&r| prepared[r].2).min().unwrap_or(0);
        // Reuse the cache up to the first scored position (rows before it are not needed).
        let reuse = common_prefix(&self.cached, &first_input[..shared]).min(first_scored);
        self.cache.truncate(reuse)?;
        self.cached.truncate(reuse);
        let trunk = &first_input[reuse..shared];
        let branches: Vec<&[u32]> = live.iter().map(|&r| &prepared[r].0[shared..]).collect();
        let rows = self
            .model
            .forward_tree_hidden(trunk, &branches, &mut self.cache)?;
        self.cached.extend_from_slice(trunk);
        // Each request's scored rows: from the trunk below `shared`, else from its branch.
        let mut index = Vec::new();
        let mut offset = trunk.len();
        for (&r, b) in live.iter().zip(&branches) {
            let (input, _, first) = &prepared[r];
            for pos in *first..input.len() {
                index.push(if pos < shared {
                    (pos - reuse) as u32
                } else {
                    (offset + pos - shared) as u32
                });
            }
            offset += b.len();
        }
        let n = index.len();
        let index = Tensor::from_vec(index, n, rows.device())?;
        let rows = rows.index_select(&index, 0)?.to_dtype(self.model.dtype())?;
        let logits = logits_of(self.model, &rows)?;
        // Every row's token score on the thread pool, then each request's sum in order.
        let v = logits.len() / n.max(1);
        let targets: Vec<u32> = live
            .iter()
            .flat_map(|&r| requests[r].continuation.iter().copied())
            .collect();
        let per_row: Vec<(f64, bool, f64)> = logits
            .par_chunks(v.max(1))
            .zip(targets.par_iter())
            .map_init(Vec::new, |buf, (row, &t)| token_score(buf, row, t as usize))
            .collect();
        let mut at = 0;
        for &r in &live {
            let k = requests[r].continuation.len();
            out[r] = sum_scores(&per_row[at..at + k]);
            at += k;
        }
        Ok((out, cut))
    }
}

impl LoglikScorer<'_> {
    /// One request streamed token by token through a fresh cache under `policy`: the logits
    /// of positions `first..` score the continuation.
    fn streamed(
        &self,
        policy: &Arc<dyn KvPolicy>,
        input: &[u32],
        first: usize,
        continuation: &[u32],
    ) -> Result<Score> {
        if continuation.is_empty() {
            return Ok(sum_scores(&[]));
        }
        let mut cache = self.model.new_cache();
        cache.set_policy(policy.clone())?;
        cache.plan(input.len());
        let mut logits = Vec::new();
        for (i, &t) in input.iter().enumerate() {
            let x = Tensor::from_vec(vec![t], (1, 1), self.model.device())?;
            let row = self.model.forward_last(&x, &mut cache)?;
            if i >= first {
                logits.extend(row.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(score_logits(&logits, continuation))
    }
}

/// Length of the longest common prefix.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_core::GgmlDType;
    use lmkit_models::{LlamaConfig, LoadOptions};

    fn tiny(dtype: GgmlDType) -> Llama {
        // One file per call: tests run in parallel.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "lmkit-loglik-{}-{k}-{dtype:?}.gguf",
            std::process::id()
        ));
        lmkit_models::testing::write_tiny_gguf(&p, &LlamaConfig::tiny(), 7, dtype).unwrap();
        let m = lmkit_models::load(&p, LoadOptions::default())
            .unwrap()
            .model;
        std::fs::remove_file(&p).unwrap();
        m
    }

    /// A request run on its own from an empty cache, every position at once.
    fn alone(model: &Llama, e: &Encoded, max_length: usize) -> Score {
        let (input, _, first) = request_input(e, max_length).unwrap();
        let mut cache = model.new_cache();
        let h = hidden(model, &input, &mut cache).unwrap();
        let rows = h.narrow(0, first, input.len() - first).unwrap();
        score_logits(&logits_of(model, &rows).unwrap(), &e.continuation)
    }

    fn req(context: &[u32], continuation: &[u32]) -> Encoded {
        Encoded {
            context: context.to_vec(),
            continuation: continuation.to_vec(),
        }
    }

    /// Under a KV policy whose budget never binds, streamed scores equal the shared-prefix
    /// scorer's; a binding H2O budget changes them (and they stay finite).
    #[test]
    fn streamed_scores_under_a_policy() {
        use lmkit_generate::h2o::H2o;
        use lmkit_generate::kv::Budget;
        let m = tiny(GgmlDType::F32);
        let ids: Vec<u32> = (0..60).map(|i| (i * 37 + 11) % 100).collect();
        let requests = vec![req(&ids[..40], &ids[40..46]), req(&ids[..40], &ids[46..49])];
        let plain = LoglikScorer::new(&m).score(&requests, 256).unwrap().0;
        let policy = |budget| -> Option<Arc<dyn KvPolicy>> {
            Some(Arc::new(H2o {
                budget,
                recent: 0.5,
            }))
        };
        let never = LoglikScorer::with_policy(&m, policy(Budget::Tokens(1000)))
            .score(&requests, 256)
            .unwrap()
            .0;
        let tight = LoglikScorer::with_policy(&m, policy(Budget::Tokens(8)))
            .score(&requests, 256)
            .unwrap()
            .0;
        for ((a, b), c) in plain.iter().zip(&never).zip(&tight) {
            assert!((a.logprob - b.logprob).abs() < 1e-3, "{a:?} vs {b:?}");
            assert_eq!((a.tokens, a.greedy), (b.tokens, b.greedy));
            assert!(c.logprob.is_finite());
            assert!((a.logprob - c.logprob).abs() > 1e-4, "{a:?} vs {c:?}");
        }
    }

    #[test]
    fn inputs_are_cut_from_the_left_as_the_harness_does() {
        // (context + continuation)[-(max_length + 1):][:-1]; scored from the continuation's
        // first predicting position.
        let e = req(&[1, 2, 3, 4, 5, 6], &[7, 8, 9]);
        assert_eq!(
            request_input(&e, 100).unwrap(),
            (vec![1, 2, 3, 4, 5, 6, 7, 8], false, 5)
        );
        assert_eq!(
            request_input(&e, 5).unwrap(),
            (vec![4, 5, 6, 7, 8], true, 2)
        );
        assert_eq!(request_input(&e, 3).unwrap(), (vec![6, 7, 8], true, 0));
        assert!(request_input(&e, 2).is_err());
        assert!(request_input(&req(&[], &[1]), 8).is_err());
    }

    #[test]
    fn shared_prefixes_and_the_kept_cache_score_as_each_request_alone() {
        let ids: Vec<u32> = (0..80).map(|i| (i * 37 + 11) % 100).collect();
        let few_shot = &ids[..20];
        let q1 = [few_shot, &ids[20..27]].concat();
        let q2 = [few_shot, &ids[30..34]].concat();
        let calls: Vec<(Vec<Encoded>, usize)> = vec![
            // Choices of one question: a common first token, one continuation the others
            // extend, a one-token and an empty continuation.
            (
                vec![
                    req(&q1, &ids[40..45]),
                    req(&q1, &ids[40..43]),
                    req(&q1, &ids[50..51]),
                    req(&q1, &[]),
                    req(&q1, &ids[52..70]),
                ],
                64,
            ),
            // The next question shares the few-shot prefix (kept in the cache).
            (vec![req(&q2, &ids[60..62]), req(&q2, &ids[62..66])], 64),
            // Winogrande: contexts sharing a prefix, one continuation.
            (
                vec![req(&ids[..25], &ids[70..76]), req(&ids[..23], &ids[70..76])],
                64,
            ),
            // Inputs cut from the left to fit, each by its own amount.
            (vec![req(&q1, &ids[40..45]), req(&q1, &ids[52..70])], 24),
            // The same question twice in a row: everything reused.
            (vec![req(&q1, &ids[40..45]), req(&q1, &ids[50..51])], 64),
            (vec![req(&q1, &ids[40..45]), req(&q1, &ids[50..51])], 64),
        ];
        for dtype in [GgmlDType::F32, GgmlDType::Q4_1] {
            let model = tiny(dtype);
            // Choices cut to the whole context window, each by its own amount: the tree holds
            // more tokens than the window has positions.
            let window = model.config().max_position_embeddings;
            let long: Vec<u32> = (0..window as u32 + 40)
                .map(|i| (i * 13 + 5) % 100)
                .collect();
            let requests = [req(&long, &ids[40..70]), req(&long, &ids[50..53])];
            let (got, cut) = LoglikScorer::new(&model).score(&requests, window).unwrap();
            assert!(cut);
            for (g, e) in got.iter().zip(&requests) {
                let want = alone(&model, e, window);
                assert!((g.logprob - want.logprob).abs() < 1e-4 * (1.0 + want.logprob.abs()));
            }
            let mut scorer = LoglikScorer::new(&model);
            for (k, (requests, max_length)) in calls.iter().enumerate() {
                let (got, cut) = scorer.score(requests, *max_length).unwrap();
                assert_eq!(cut, *max_length == 24, "call {k}");
                for (r, (g, e)) in got.iter().zip(requests).enumerate() {
                    let want = alone(&model, e, *max_length);
                    assert_eq!(g.tokens, e.continuation.len());
                    assert_eq!(
                        (g.tokens, g.correct),
                        (want.tokens, want.correct),
                        "call {k} request {r}"
                    );
                    let tol = 1e-4 * (1.0 + want.logprob.abs());
                    assert!(
                        (g.logprob - want.logprob).abs() < tol
                            && (g.brier - want.brier).abs() < tol,
                        "{dtype:?} call {k} request {r}: {g:?} vs {want:?}"
                    );
                }
            }
        }
    }

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
