//! Scoring a task's items and aggregating lm-evaluation-harness's metrics
//! (`lm_eval/api/task.py` `process_results`, `api/metrics.py`):
//! - `acc`: the choice with the highest log-likelihood is the gold one (first index on ties);
//! - `acc_norm`: the same after dividing each log-likelihood by its choice's length in
//!   characters (Unicode code points, the delimiter not counted);
//! - each metric's standard error is `sample_stddev / √n` (Bessel-corrected).

use std::collections::BTreeMap;
use std::sync::Arc;

use lmkit_formats::tokenizer::LoadedTokenizer;
use lmkit_models::{KvPolicy, Llama};
use serde::Serialize;

use crate::generation::{edit_distance, Scorer};
use crate::loglik::{encode_pair, score_on_cache, LoglikScorer};
use crate::task::{Item, Kind, TaskSpec};
use crate::Result;

/// One item's outcome (`--log-samples`).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub doc_id: usize,
    pub item: Item,
    /// Each choice's summed log-likelihood.
    pub logprobs: Vec<f64>,
    /// Continuation tokens per choice.
    pub tokens: Vec<usize>,
    /// Whether greedy decoding gives each continuation.
    pub greedy: Vec<bool>,
    pub pred: usize,
    pub pred_norm: usize,
    pub acc: f64,
    pub acc_norm: f64,
    /// Multiple choice: `Σ_i (softmax(logprobs)_i − [i = gold])²`.
    pub brier: f64,
    /// Generation tasks: the output and its scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenSample>,
}

/// A generation item's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct GenSample {
    pub output: String,
    /// Each filter's extracted answer and whether it matched the target exactly.
    pub answers: Vec<(String, String, bool)>,
    pub token_edit_distance: f64,
    pub per_token_acc: f64,
    pub target_logprob: f64,
    pub brier_score: f64,
    /// Prompt tokens taken from the previous item's cache (a shared few-shot prefix).
    pub prompt_tokens_reused: usize,
}

/// A metric's mean over the items and its standard error.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Metric {
    pub value: f64,
    pub stderr: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub task: String,
    pub items: usize,
    pub metrics: BTreeMap<String, Metric>,
    /// Items whose input was cut from the left to fit the model's context.
    pub truncated: usize,
    pub seconds: f64,
    pub items_per_sec: f64,
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

/// `np.argmax`: the first index of the largest value.
fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Mean and `sample_stddev / √n`.
pub fn mean_stderr(xs: &[f64]) -> Metric {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n.max(1.0);
    let stderr = if xs.len() > 1 {
        (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() / n.sqrt()
    } else {
        f64::NAN
    };
    Metric {
        value: mean,
        stderr,
    }
}

/// `exp(−mean(ll))` over items, and its standard error by bootstrap: 1,000 resamples with
/// replacement (a fixed-seed generator), the resampled perplexities' sample deviation.
/// Deviation: lm-evaluation-harness resamples 100,000 times with Python's `random`, so its
/// stderr differs in the last digits.
pub fn perplexity(lls: &[f64]) -> Metric {
    let n = lls.len();
    let ppl = |sum: f64| (-sum / n.max(1) as f64).exp();
    let value = ppl(lls.iter().sum());
    if n < 2 {
        return Metric {
            value,
            stderr: f64::NAN,
        };
    }
    let mut rng = lmkit_rand::SplitMix64::new(0x853c_49e6_748f_ea9b);
    let mut next = || rng.next_u64();
    let draws: Vec<f64> = (0..1000)
        .map(|_| ppl((0..n).map(|_| lls[(next() % n as u64) as usize]).sum()))
        .collect();
    Metric {
        value,
        stderr: mean_stderr(&draws).stderr * (draws.len() as f64).sqrt(),
    }
}

/// A group's metric from its subtasks' (lm-evaluation-harness `aggregate_subtask_metrics` with
/// `weight_by_size`, and `pooled_sample_stderr`): the size-weighted mean, and
/// `√(Σ (nᵢ − 1)·seᵢ²·nᵢ / (Σ nᵢ − k) / Σ nᵢ)`.
pub fn aggregate(parts: &[(usize, Metric)]) -> Metric {
    let total: usize = parts.iter().map(|(n, _)| n).sum();
    let value = parts.iter().map(|(n, m)| *n as f64 * m.value).sum::<f64>() / total.max(1) as f64;
    let k = parts.len();
    if total <= k {
        return Metric {
            value,
            stderr: f64::NAN,
        };
    }
    let pooled: f64 = parts
        .iter()
        .map(|(n, m)| (*n as f64 - 1.0) * m.stderr.powi(2) * *n as f64)
        .sum::<f64>()
        / (total as f64 - k as f64);
    Metric {
        value,
        stderr: (pooled / total as f64).sqrt(),
    }
}

/// One item's scores: each choice's log-likelihood and token count, and whether any input was
/// cut to fit `max_length`.
pub struct ItemScores {
    pub logprobs: Vec<f64>,
    pub tokens: Vec<usize>,
    pub greedy: Vec<bool>,
    pub truncated: bool,
}

/// Scores one item: every (context, continuation) request, the tokens they share run once.
pub fn score_item(
    scorer: &mut LoglikScorer,
    tok: &LoadedTokenizer,
    item: &Item,
    max_length: usize,
) -> Result<ItemScores> {
    // One context and a continuation per choice, or a context per choice and one continuation
    // (Winogrande).
    let requests: Vec<_> = if item.contexts.len() == 1 {
        item.continuations
            .iter()
            .map(|c| encode_pair(tok, &item.contexts[0], c))
            .collect::<Result<_>>()?
    } else {
        let cont = item.continuations.first().ok_or_else(|| {
            crate::Error::Data("an item with a context per choice has no continuation".into())
        })?;
        item.contexts
            .iter()
            .map(|ctx| encode_pair(tok, ctx, cont))
            .collect::<Result<_>>()?
    };
    let (scores, truncated) = scorer.score(&requests, max_length)?;
    Ok(ItemScores {
        logprobs: scores.iter().map(|s| s.logprob).collect(),
        tokens: scores.iter().map(|s| s.tokens).collect(),
        greedy: scores.iter().map(|s| s.greedy).collect(),
        truncated,
    })
}

/// Runs a task's items; `progress(done, total)` after each.
pub fn evaluate(
    model: &Llama,
    tok: &LoadedTokenizer,
    task: &TaskSpec,
    items: &[Item],
    max_length: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TaskResult> {
    evaluate_with(model, tok, task, items, max_length, None, progress)
}

/// [`evaluate`] with the KV cache under `kv` (`None`: the full cache): every scored sequence
/// streams through its own evicting cache, and generation runs under the policy.
pub fn evaluate_with(
    model: &Llama,
    tok: &LoadedTokenizer,
    task: &TaskSpec,
    items: &[Item],
    max_length: usize,
    kv: Option<&Arc<dyn KvPolicy>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TaskResult> {
    if task.kind == Kind::GenerateUntil {
        return evaluate_generation(model, tok, task, items, max_length, kv, progress);
    }
    let t0 = std::time::Instant::now();
    let mut samples = Vec::with_capacity(items.len());
    let mut truncated = 0;
    let mut scorer = LoglikScorer::with_policy(model, kv.cloned());
    for (i, item) in items.iter().enumerate() {
        let ItemScores {
            logprobs,
            tokens,
            greedy,
            truncated: cut,
        } = score_item(&mut scorer, tok, item, max_length).map_err(|e| match e {
            // Which item, with the choice (`request N`) that `score` names.
            crate::Error::NonFinite { at } => crate::Error::NonFinite {
                at: format!(
                    "{}: item {}, {}",
                    task.name,
                    i + 1,
                    at.replace("request", "choice")
                ),
            },
            e => e,
        })?;
        truncated += usize::from(cut);
        let pred = argmax(&logprobs);
        let normed: Vec<f64> = logprobs
            .iter()
            .zip(&item.choices)
            .map(|(lp, c)| lp / c.chars().count().max(1) as f64)
            .collect();
        let pred_norm = argmax(&normed);
        let (acc, acc_norm) = match task.kind {
            Kind::Loglikelihood => (f64::from(u8::from(greedy.iter().all(|g| *g))), f64::NAN),
            _ => (
                f64::from(u8::from(pred == item.gold)),
                f64::from(u8::from(pred_norm == item.gold)),
            ),
        };
        let brier = brier(&logprobs, item.gold);
        samples.push(Sample {
            doc_id: i,
            item: item.clone(),
            logprobs,
            tokens,
            greedy,
            pred,
            pred_norm,
            acc,
            acc_norm,
            brier,
            generation: None,
        });
        progress(i + 1, items.len());
    }
    let mut metrics = BTreeMap::new();
    for m in &task.metrics {
        if m == "perplexity" {
            let lls: Vec<f64> = samples.iter().map(|s| s.logprobs[0]).collect();
            metrics.insert(m.clone(), perplexity(&lls));
            continue;
        }
        let xs: Vec<f64> = samples
            .iter()
            .map(|s| match m.as_str() {
                "acc_norm" => s.acc_norm,
                "brier_score" => s.brier,
                _ => s.acc,
            })
            .collect();
        metrics.insert(m.clone(), mean_stderr(&xs));
    }
    Ok(finish(task, samples, metrics, truncated, t0))
}

/// The Brier score of the choices' softmax against the gold choice.
fn brier(logprobs: &[f64], gold: usize) -> f64 {
    let max = logprobs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logprobs.iter().map(|l| (l - max).exp()).sum();
    logprobs
        .iter()
        .enumerate()
        .map(|(i, l)| ((l - max).exp() / z - f64::from(u8::from(i == gold))).powi(2))
        .sum()
}

fn finish(
    task: &TaskSpec,
    samples: Vec<Sample>,
    metrics: BTreeMap<String, Metric>,
    truncated: usize,
    t0: std::time::Instant,
) -> TaskResult {
    let seconds = t0.elapsed().as_secs_f64();
    TaskResult {
        task: task.name.clone(),
        items: samples.len(),
        metrics,
        truncated,
        seconds,
        items_per_sec: samples.len() as f64 / seconds.max(1e-9),
        samples,
    }
}

/// Runs a generation task: per item, the target scored with teacher forcing on the prompt's
/// cache, then greedy generation from the same cache (consecutive items share their few-shot
/// prefix's cache), the answers extracted and matched.
fn evaluate_generation(
    model: &Llama,
    tok: &LoadedTokenizer,
    task: &TaskSpec,
    items: &[Item],
    max_length: usize,
    kv: Option<&Arc<dyn KvPolicy>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TaskResult> {
    use lmkit_generate::generate::Session;
    use lmkit_generate::{generate, GenerateOptions, SamplingParams};
    let t0 = std::time::Instant::now();
    let bad = |why: String| crate::Error::Task {
        task: task.name.clone(),
        why,
    };
    let scorer = Scorer::new(&task.filters, &task.exact_match).map_err(bad)?;
    if task.max_gen_toks >= max_length {
        return Err(bad(format!(
            "max_gen_toks {} leaves no room for a prompt in {max_length} tokens",
            task.max_gen_toks
        )));
    }
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: task.max_gen_toks,
        stop: task.until.clone(),
        stop_at_eos: true,
        truncate_prompt: false,
    };
    let enc = |s: &str| -> Result<Vec<u32>> {
        tok.encode(s)
            .map_err(|e| crate::Error::Data(format!("cannot tokenize: {e}")))
    };
    let mut session = Session::new(model);
    let (mut samples, mut truncated) = (Vec::with_capacity(items.len()), 0);
    for (i, item) in items.iter().enumerate() {
        let target = item.target.clone().unwrap_or_default();
        // Teacher forcing: the target after its context, the context cut from the left to fit.
        let pair = encode_pair(tok, &item.contexts[0], &item.continuations[0])?;
        let cont = &pair.continuation;
        if cont.len() > max_length {
            return Err(bad(format!(
                "item {i}: a target of {} tokens does not fit {max_length}",
                cont.len()
            )));
        }
        let keep = (max_length + 1 - cont.len()).min(pair.context.len());
        let mut cut = keep < pair.context.len();
        let ctx = &pair.context[pair.context.len() - keep..];
        let forced = match kv {
            // Under a policy: the target streamed through its own cache, and a fresh session
            // for the generation (an evicted cache is no prefix to share).
            Some(p) => {
                session = Session::with_policy(model, p.clone())?;
                let req = crate::loglik::Encoded {
                    context: ctx.to_vec(),
                    continuation: cont.clone(),
                };
                let mut s = LoglikScorer::with_policy(model, Some(p.clone()));
                s.score(&[req], max_length)?.0[0]
            }
            None => {
                let (last, _) = session.feed(model, ctx)?;
                if cont.is_empty() {
                    crate::loglik::score_logits(&[], &[])
                } else {
                    score_on_cache(model, &mut session.cache, ctx.len(), &last, cont)?
                }
            }
        };
        // Generation: the prompt keeps its last `max_length − max_gen_toks` tokens.
        let prompt = tok
            .encode_with_bos(&item.contexts[0])
            .map_err(|e| crate::Error::Data(format!("cannot tokenize: {e}")))?;
        let room = max_length - task.max_gen_toks;
        cut |= prompt.len() > room;
        let prompt = &prompt[prompt.len().saturating_sub(room)..];
        let g = generate(model, tok, &mut session, prompt, &opts, &mut |_| true)?;
        truncated += usize::from(cut);
        let answers: Vec<(String, String, bool)> = scorer
            .extract(&g.text)
            .into_iter()
            .map(|(name, a)| {
                let hit = scorer.exact_match(&a, &target);
                (name, a, hit)
            })
            .collect();
        // The first extraction's tokens against the target's (a fallback is no answer).
        let answer = match answers.first() {
            Some((f, a, _)) if !scorer.is_fallback(f, a) => a.trim().to_string(),
            _ => String::new(),
        };
        let distance = edit_distance(&enc(&answer)?, &enc(target.trim())?);
        let n = forced.tokens.max(1) as f64;
        samples.push(Sample {
            doc_id: i,
            item: item.clone(),
            logprobs: vec![forced.logprob],
            tokens: vec![forced.tokens],
            greedy: vec![forced.greedy],
            pred: 0,
            pred_norm: 0,
            acc: f64::NAN,
            acc_norm: f64::NAN,
            brier: f64::NAN,
            generation: Some(GenSample {
                output: g.text,
                answers,
                token_edit_distance: distance as f64,
                per_token_acc: forced.correct as f64 / n,
                target_logprob: forced.logprob,
                brier_score: forced.brier / n,
                prompt_tokens_reused: g.prompt_tokens - g.prompt_tokens_run,
            }),
        });
        progress(i + 1, items.len());
    }
    let gens: Vec<&GenSample> = samples
        .iter()
        .filter_map(|s| s.generation.as_ref())
        .collect();
    let mut metrics = BTreeMap::new();
    for m in &task.metrics {
        if m == "exact_match" {
            for (k, (name, _, _)) in gens
                .first()
                .map_or(&[][..], |g| &g.answers[..])
                .iter()
                .enumerate()
            {
                let xs: Vec<f64> = gens
                    .iter()
                    .map(|g| f64::from(u8::from(g.answers[k].2)))
                    .collect();
                let key = if name.is_empty() {
                    m.clone()
                } else {
                    format!("{m},{name}")
                };
                metrics.insert(key, mean_stderr(&xs));
            }
            continue;
        }
        let xs: Vec<f64> = gens
            .iter()
            .map(|g| match m.as_str() {
                "token_edit_distance" => g.token_edit_distance,
                "per_token_acc" => g.per_token_acc,
                "target_logprob" => g.target_logprob,
                _ => g.brier_score,
            })
            .collect();
        metrics.insert(m.clone(), mean_stderr(&xs));
    }
    Ok(finish(task, samples, metrics, truncated, t0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_and_stderr_follow_numpy_and_the_harness() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        let m = mean_stderr(&[1.0, 0.0, 1.0, 1.0]);
        assert!((m.value - 0.75).abs() < 1e-12);
        // sample_stddev = sqrt(0.75/3) = 0.5; / sqrt(4) = 0.25
        assert!((m.stderr - 0.25).abs() < 1e-12);
        assert!(mean_stderr(&[1.0]).stderr.is_nan());
        // Pooling two halves of one sample gives the whole sample's mean.
        let (a, b) = ([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]);
        let g = aggregate(&[(4, mean_stderr(&a)), (4, mean_stderr(&b))]);
        assert!((g.value - 0.5).abs() < 1e-12);
        // (3·0.0625·4 + 3·0.0625·4) / (8 − 2) / 8 = 0.03125
        assert!((g.stderr - 0.03125f64.sqrt()).abs() < 1e-12);
    }
}
