//! DoReMi's domain reweighting: Xie et al., "DoReMi: Optimizing Data Mixtures Speeds Up
//! Language Model Pretraining" (NeurIPS 2023, arXiv 2305.10429; reference code
//! sangmichaelxie/doremi, `DoReMiTrainer.update_domain_weights`, optimizer `doremiv1`).
//!
//! A small proxy model trains with Group DRO against a fixed reference model. After each step,
//! with `ℓ_θ(x_j)` and `ℓ_ref(x_j)` the proxy's and the reference's loss on token `j` of
//! example `x`, and `k` domains:
//!
//! ```text
//! λᵢ = mean over the tokens of domain i in the batch of max(ℓ_θ(x_j) − ℓ_ref(x_j), 0)
//!      (a domain absent from the batch keeps its previous λᵢ)
//! α' = softmax(log α + η·λ)                    (exponentiated gradient ascent)
//! α  = (1 − c)·α' + c/k                        (smoothing toward uniform)
//! ᾱ  = mean of α over the updates               (the weights DoReMi outputs)
//! ```
//!
//! and the proxy's loss is the domain-weighted token loss `Σ_j α_{d(j)} ℓ_θ(x_j) / Σ_j α_{d(j)}`.
//! The paper uses η = 1 and c = 10⁻³.
//!
//! Deviations: none in these formulas. Training the proxy and the reference is the trainer's
//! part (`lmkit data doremi`).

use serde::Serialize;

use crate::{Error, Result};

/// Group-DRO domain weights and their running mean.
#[derive(Debug, Clone, Serialize)]
pub struct DomainWeights {
    /// The current weights α (they sum to 1).
    pub weights: Vec<f64>,
    /// The mean of α over the updates so far (the initial weights before any).
    pub average: Vec<f64>,
    /// Each domain's last excess loss λ.
    pub scores: Vec<f64>,
    pub updates: usize,
    /// Step size η.
    pub eta: f64,
    /// Smoothing c toward the uniform weights.
    pub smoothing: f64,
}

impl DomainWeights {
    /// Starts from `init` (normalized; e.g. uniform) with step size `eta` and smoothing `c`.
    pub fn new(init: &[f64], eta: f64, smoothing: f64) -> Result<Self> {
        let bad = |why: String| Error::Invalid {
            what: "domain weights".into(),
            why,
        };
        if init.is_empty() {
            return Err(bad("no domains".into()));
        }
        if init.iter().any(|w| !w.is_finite() || *w <= 0.0) {
            return Err(bad(format!("initial weights must be positive: {init:?}")));
        }
        if !eta.is_finite() || eta <= 0.0 {
            return Err(bad(format!("step size must be positive, got {eta}")));
        }
        if !(0.0..=1.0).contains(&smoothing) {
            return Err(bad(format!("smoothing must be in [0, 1], got {smoothing}")));
        }
        let total: f64 = init.iter().sum();
        let weights: Vec<f64> = init.iter().map(|w| w / total).collect();
        Ok(Self {
            average: weights.clone(),
            scores: vec![0.0; weights.len()],
            weights,
            updates: 0,
            eta,
            smoothing,
        })
    }

    /// Uniform initial weights over `k` domains.
    pub fn uniform(k: usize, eta: f64, smoothing: f64) -> Result<Self> {
        Self::new(&vec![1.0; k], eta, smoothing)
    }

    /// One update from a batch's per-token excess losses: `excess[t]` is `ℓ_θ − ℓ_ref` of token
    /// `t`, `domain[t]` its domain. Returns the new weights.
    pub fn update(&mut self, excess: &[f32], domain: &[usize]) -> Result<&[f64]> {
        let k = self.weights.len();
        if excess.len() != domain.len() {
            return Err(Error::Invalid {
                what: "excess losses".into(),
                why: format!("{} losses for {} domain ids", excess.len(), domain.len()),
            });
        }
        let mut sum = vec![0f64; k];
        let mut count = vec![0usize; k];
        for (&e, &d) in excess.iter().zip(domain) {
            if d >= k {
                return Err(Error::Invalid {
                    what: "domain id".into(),
                    why: format!("{d} with {k} domains"),
                });
            }
            if e.is_finite() {
                sum[d] += f64::from(e.max(0.0));
                count[d] += 1;
            }
        }
        for i in 0..k {
            if count[i] > 0 {
                self.scores[i] = sum[i] / count[i] as f64;
            }
        }
        // softmax(log α + η λ), shifted by the max for stability.
        let logits: Vec<f64> = (0..k)
            .map(|i| self.weights[i].ln() + self.eta * self.scores[i])
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let c = self.smoothing;
        self.weights = e.iter().map(|x| (1.0 - c) * x / z + c / k as f64).collect();
        self.updates += 1;
        let n = self.updates as f64;
        for (a, w) in self.average.iter_mut().zip(&self.weights) {
            // The running mean of the weights after each update (the initial ones not included).
            *a = if self.updates == 1 {
                *w
            } else {
                *a + (w - *a) / n
            };
        }
        Ok(&self.weights)
    }

    /// Each token's loss weight for the proxy's objective: `α_{d(t)} / Σ_t α_{d(t)}` (they sum
    /// to 1 over the batch).
    pub fn token_weights(&self, domain: &[usize]) -> Result<Vec<f32>> {
        let k = self.weights.len();
        if let Some(d) = domain.iter().find(|&&d| d >= k) {
            return Err(Error::Invalid {
                what: "domain id".into(),
                why: format!("{d} with {k} domains"),
            });
        }
        let total: f64 = domain.iter().map(|&d| self.weights[d]).sum();
        if total <= 0.0 {
            return Ok(vec![0.0; domain.len()]);
        }
        Ok(domain
            .iter()
            .map(|&d| (self.weights[d] / total) as f32)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One update by hand: λ = (mean of clipped excess per domain), α ∝ α·exp(ηλ), smoothed.
    #[test]
    fn update_matches_the_formula() -> Result<()> {
        let mut w = DomainWeights::uniform(3, 1.0, 1e-3)?;
        // Domain 0: excess 1 and 3 → λ 2; domain 1: −1 (clipped) and 1 → 0.5; domain 2 absent.
        let got = w.update(&[1.0, 3.0, -1.0, 1.0], &[0, 0, 1, 1])?.to_vec();
        let e = [2f64.exp(), 0.5f64.exp(), 1.0];
        let z: f64 = e.iter().sum();
        for i in 0..3 {
            let want = (1.0 - 1e-3) * e[i] / z + 1e-3 / 3.0;
            assert!((got[i] - want).abs() < 1e-12, "{i}: {} vs {want}", got[i]);
        }
        assert!((got.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(w.average, got);
        // An absent domain keeps its score; the average is the mean of the two updates.
        let second = w.update(&[0.0], &[2])?.to_vec();
        assert_eq!(w.scores, vec![2.0, 0.5, 0.0]);
        for i in 0..3 {
            assert!((w.average[i] - (got[i] + second[i]) / 2.0).abs() < 1e-12);
        }
        Ok(())
    }

    /// The domain with the persistent excess loss gains weight; the smoothing keeps every
    /// domain at least c/k.
    #[test]
    fn persistent_excess_gains_weight_with_a_floor() -> Result<()> {
        let mut w = DomainWeights::uniform(4, 1.0, 0.04)?;
        for _ in 0..200 {
            w.update(&[2.0, 0.0, 0.0, 0.0], &[0, 1, 2, 3])?;
        }
        assert!(w.weights[0] > 0.95, "{:?}", w.weights);
        assert!(w.weights[1..].iter().all(|&x| x >= 0.01 - 1e-12));
        let t = w.token_weights(&[0, 1, 1])?;
        assert!((t.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(t[0] > t[1]);
        Ok(())
    }

    #[test]
    fn bad_input() {
        assert!(DomainWeights::new(&[], 1.0, 1e-3).is_err());
        assert!(DomainWeights::new(&[1.0, 0.0], 1.0, 1e-3).is_err());
        assert!(DomainWeights::uniform(2, 0.0, 1e-3).is_err());
        assert!(DomainWeights::uniform(2, 1.0, 2.0).is_err());
        let Ok(mut w) = DomainWeights::uniform(2, 1.0, 1e-3) else {
            panic!("valid weights")
        };
        assert!(w.update(&[1.0], &[5]).is_err());
        assert!(w.update(&[1.0, 2.0], &[0]).is_err());
        assert!(w.token_weights(&[2]).is_err());
    }
}
