//! Learning-rate schedules: linear warmup from 0 to `peak` over `warmup` steps, then decay to
//! `min` at step `total` (cosine: `min + (peak − min)·(1 + cos(π·p))/2`, linear:
//! `peak − (peak − min)·p`, with `p` the fraction of the decay done), constant after.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub min: f64,
    pub warmup: usize,
    pub total: usize,
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let p = ((step - self.warmup) as f64 / span as f64).min(1.0);
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Linear => self.peak - (self.peak - self.min) * p,
            Decay::Cosine => {
                self.min + (self.peak - self.min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_to_min() {
        let s = Schedule {
            peak: 1e-3,
            min: 1e-4,
            warmup: 10,
            total: 110,
            decay: Decay::Cosine,
        };
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 5.5e-4).abs() < 1e-12); // halfway: the mean of peak and min
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        assert!((s.lr(500) - 1e-4).abs() < 1e-12);
        let l = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((l.lr(60) - 5.5e-4).abs() < 1e-12);
        assert!((l.lr(35) - (1e-3 - 9e-4 * 0.25)).abs() < 1e-12);
    }
}
