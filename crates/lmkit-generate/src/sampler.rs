//! Token sampling: greedy, temperature, top-k, top-p (nucleus), min-p, repetition penalty,
//! OpenAI's frequency and presence penalties.
//!
//! Order of operations (as llama.cpp's default chain): repetition penalty, then frequency and
//! presence penalties on the raw logits → top-k → softmax with temperature → top-p → min-p →
//! draw. Temperature 0 is greedy (the penalties still apply).
//!
//! The frequency and presence penalties follow OpenAI's definition over the tokens generated so
//! far (not the prompt), `logit[j] −= c[j]·frequency_penalty + [c[j] > 0]·presence_penalty`
//! with `c[j]` how often token `j` was generated, as vLLM applies them.

use crate::{Error, Result};

/// Sampling options, with llama.cpp-like defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables; > 1 penalizes tokens seen in the last `repeat_last_n`.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI's `frequency_penalty`, in [−2, 2]; 0 disables.
    pub frequency_penalty: f32,
    /// OpenAI's `presence_penalty`, in [−2, 2]; 0 disables.
    pub presence_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 42,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |option: &str, why: &str| {
            Err(Error::Option {
                option: option.into(),
                why: why.into(),
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", "must be a finite number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p", "must be in [0, 1]");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad("repeat-penalty", "must be a finite number > 0");
        }
        for (name, v) in [
            ("frequency-penalty", self.frequency_penalty),
            ("presence-penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, "must be between -2 and 2");
            }
        }
        Ok(())
    }
}

/// A seeded sampler (xoshiro-style state, deterministic across platforms).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    state: u64,
    scratch: Vec<(f32, u32)>,
    /// How often each token was sampled (the generated text's counts), for the frequency and
    /// presence penalties.
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            state: params.seed ^ 0x5DEE_CE66_D1CE_4E5B,
            params,
            scratch: Vec::new(),
            counts: std::collections::HashMap::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(lmkit_rand::GAMMA);
        lmkit_rand::unit_f64(lmkit_rand::finalize(self.state))
    }

    /// Picks the next token from `logits` (`(v,)`), given the tokens so far (prompt and
    /// generated); the token picked counts as generated from then on.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let next = self.pick(logits, history);
        if self.params.frequency_penalty != 0.0 || self.params.presence_penalty != 0.0 {
            *self.counts.entry(next).or_insert(0) += 1;
        }
        next
    }

    fn pick(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = self.params.clone();
        if p.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen: Vec<u32> = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&id, &n) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let u = self.next_f64();
        let c = &mut self.scratch;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (l, i as u32)),
        );
        if c.is_empty() {
            return 0;
        }
        let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit);
        // Softmax with temperature, in place: .0 becomes a probability.
        let max = c[0].0;
        let mut sum = 0.0f64;
        for e in c.iter_mut() {
            let w = (((e.0 - max) / p.temperature) as f64).exp();
            e.0 = w as f32;
            sum += w;
        }
        for e in c.iter_mut() {
            e.0 = (e.0 as f64 / sum) as f32;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0f32;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                acc += e.0;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = c[0].0 * p.min_p;
            let keep = c.iter().take_while(|e| e.0 >= floor).count();
            c.truncate(keep.max(1));
        }
        let total: f64 = c.iter().map(|e| e.0 as f64).sum();
        let mut r = u * total;
        for e in c.iter() {
            r -= e.0 as f64;
            if r <= 0.0 {
                return e.1;
            }
        }
        c[c.len() - 1].1
    }
}

/// Index of the largest value (first on ties; NaN never wins).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &x) in xs.iter().enumerate() {
        if x > bv {
            bv = x;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OpenAI's penalties count generated tokens only: the prompt in `history` is not
    /// penalized; a generated token is, by presence once and by frequency per occurrence.
    #[test]
    fn frequency_and_presence_penalties_count_generated_tokens() {
        let logits = [5.0f32, 4.0, 3.5, 0.0];
        let run = |freq: f32, pres: f32, steps: usize| -> Vec<u32> {
            let mut s = Sampler::new(SamplingParams {
                frequency_penalty: freq,
                presence_penalty: pres,
                ..SamplingParams::greedy()
            })
            .unwrap();
            (0..steps)
                .map(|_| s.sample(&mut logits.clone(), &[0, 0, 0]))
                .collect()
        };
        // Without penalties greedy repeats token 0, although the prompt is full of it.
        assert_eq!(run(0.0, 0.0, 3), [0, 0, 0]);
        // Presence 1.5: after one 0 (5 − 1.5 = 3.5 < 4) token 1; then 3.5, 2.5, 3.5: token 0
        // wins its tie with token 2 (the first maximum).
        assert_eq!(run(0.0, 1.5, 3), [0, 1, 0]);
        // Frequency 0.6: 0 (5), 0 (4.4), 1 (4 > 3.8), then 0 (3.8 > 3.4 and 3.5).
        assert_eq!(run(0.6, 0.0, 4), [0, 0, 1, 0]);
        for bad in [2.5, -2.1, f32::NAN] {
            let p = SamplingParams {
                frequency_penalty: bad,
                ..SamplingParams::default()
            };
            assert!(p.validate().is_err(), "{bad}");
            let p = SamplingParams {
                presence_penalty: bad,
                ..SamplingParams::default()
            };
            assert!(p.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&mut l, &[]), 1);
    }

    #[test]
    fn repetition_penalty_can_change_the_choice() {
        let p = SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p).unwrap();
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&mut l, &[1]), 3);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_deterministic() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(p).unwrap();
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&mut l, &[]), 1);

        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..p.clone() }).unwrap();
            (0..50)
                .map(|_| s.sample(&mut [1.0, 1.0, 1.0, 1.0], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // Uniform logits must reach every token in 50 draws.
        let d = draw(7);
        for t in 0..4 {
            assert!(d.contains(&t), "token {t} never drawn: {d:?}");
        }
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(p.clone()).unwrap();
        for _ in 0..100 {
            // p(0) ≈ 0.67, p(1) ≈ 0.24, p(2) ≈ 0.09: min-p 0.5 keeps only token 0.
            assert_eq!(s.sample(&mut [2.0, 1.0, 0.0], &[]), 0);
        }
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.0,
            top_p: 0.5,
            ..p
        })
        .unwrap();
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [2.0, 1.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn bad_options_are_rejected() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                min_p: 2.0,
                ..Default::default()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(p).is_err());
        }
    }
}
