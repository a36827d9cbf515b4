//! Loss scaling for f16 training (Micikevicius et al., "Mixed Precision Training",
//! arXiv 1710.03740, §3.2), with the dynamic rule and defaults of PyTorch's
//! `torch.amp.GradScaler`.
//!
//! f16 keeps 5 exponent bits: values below 2⁻²⁴ ≈ 6·10⁻⁸ flush to zero, and below 2⁻¹⁴ lose
//! precision. A language model's gradients start at `∂z = coef·(p − onehot)` with `coef = 1/N`
//! over N target tokens and `p` about 1/vocabulary, so on a batch of 8 × 1,024 tokens and a
//! vocabulary of 49,152 most entries of `∂z` are ~2·10⁻⁹: zero in f16. Scaling the loss by `S`
//! scales every gradient of the backward by `S`, which keeps them in range; the optimizer
//! divides by `S` again (in f32) before it uses them:
//! ```text
//! L' = S·L          backward in f16 gives g' = S·g
//! g  = g' / S       (folded into AdamW's gradient factor with the 1/accumulation mean)
//! ```
//! A step whose gradients are not all finite is skipped (the weights and moments are left
//! alone; on a GPU the optimizer's kernels read that from the gradient norm, so the host never
//! waits for it). The dynamic rule then adjusts `S` once the step's norm is read:
//! ```text
//! not finite:  S ← S·backoff (0.5), good ← 0
//! finite:      good ← good + 1; if good = interval (2000): S ← S·growth (2), good ← 0
//! ```
//! from `S = 2¹⁶`. `Fixed(S)` scales by `S` and never changes it; `Off` is `S = 1`.
//!
//! Deviations:
//! - A skipped step does not count: the next batch retries it at the new scale, so a run
//!   still applies the number of steps asked for (PyTorch's loop counts iterations and lets
//!   the optimizer skip some). The learning-rate schedule follows the applied steps.
//! - After [`MAX_SKIPS`] skipped steps in a row the run stops with an error (the loss or the
//!   weights are not finite at any scale: it diverged), where PyTorch would go on halving.
//! - The same skip applies without scaling (bf16, f32): a step with a NaN or infinite
//!   gradient is never applied.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The first scale of the dynamic rule (PyTorch's `init_scale`).
pub const INITIAL: f64 = 65536.0;
/// Steps with finite gradients before the scale doubles (PyTorch's `growth_interval`).
pub const INTERVAL: u32 = 2000;
const GROWTH: f64 = 2.0;
const BACKOFF: f64 = 0.5;
/// Skipped steps in a row after which training stops.
pub const MAX_SKIPS: u32 = 24;
/// The largest scale, fixed or grown (the scale and its inverse stay normal f32 numbers).
pub const MAX_SCALE: f64 = 1e30;

/// How the loss is scaled before the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossScale {
    /// Dynamic when the model computes in f16, off otherwise.
    #[default]
    Auto,
    Off,
    Dynamic,
    Fixed(f64),
}

impl std::str::FromStr for LossScale {
    type Err = Error;

    /// `auto`, `off`, `dynamic`, or a fixed scale (a number > 0, at most [`MAX_SCALE`]).
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => LossScale::Auto,
            "off" | "none" => LossScale::Off,
            "dynamic" => LossScale::Dynamic,
            _ => match s.parse::<f64>() {
                Ok(x) if x > 0.0 && x <= MAX_SCALE => LossScale::Fixed(x),
                _ => {
                    return Err(Error::Option {
                        option: "loss-scale".into(),
                        why: format!(
                            "`{s}`: expected auto, off, dynamic or a number > 0 and ≤ {MAX_SCALE:e}"
                        ),
                    })
                }
            },
        })
    }
}

/// What became of a step (see [`LossScaler::update`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Applied,
    /// Not applied: its gradients were not all finite.
    Skipped,
}

/// The scale's state, saved with checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good: u32,
}

/// The loss scale of a run and its dynamic rule.
#[derive(Debug, Clone)]
pub struct LossScaler {
    dynamic: bool,
    state: ScalerState,
    skips_in_row: u32,
}

impl LossScaler {
    /// The scaler for `mode` on a model that computes in f16 or not.
    pub fn new(mode: LossScale, f16: bool) -> Self {
        let (dynamic, scale) = match mode {
            LossScale::Auto if f16 => (true, INITIAL),
            LossScale::Auto | LossScale::Off => (false, 1.0),
            LossScale::Dynamic => (true, INITIAL),
            LossScale::Fixed(s) => (false, s),
        };
        Self {
            dynamic,
            state: ScalerState { scale, good: 0 },
            skips_in_row: 0,
        }
    }

    /// The factor of this step's loss.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// Whether the loss is scaled at all.
    pub fn active(&self) -> bool {
        self.dynamic || self.state.scale != 1.0
    }

    pub fn state(&self) -> ScalerState {
        self.state
    }

    /// Restores a saved state (a fixed or no scale keeps its own).
    pub fn restore(&mut self, s: ScalerState) {
        if self.dynamic && s.scale > 0.0 && s.scale <= MAX_SCALE {
            self.state = s;
        }
    }

    /// After a step: `finite` says whether its gradient norm was. Adjusts the scale; an error
    /// after [`MAX_SKIPS`] skipped steps in a row.
    pub fn update(&mut self, finite: bool) -> Result<Outcome> {
        let s = &mut self.state;
        if finite {
            self.skips_in_row = 0;
            if self.dynamic {
                s.good += 1;
                if s.good >= INTERVAL {
                    let grown = s.scale * GROWTH;
                    if grown <= MAX_SCALE {
                        s.scale = grown;
                    }
                    s.good = 0;
                }
            }
            return Ok(Outcome::Applied);
        }
        self.skips_in_row += 1;
        if self.dynamic {
            s.scale *= BACKOFF;
            s.good = 0;
        }
        if self.skips_in_row >= MAX_SKIPS {
            let at = match self.dynamic {
                true => format!(" down to a loss scale of {}", s.scale / BACKOFF),
                false => String::new(),
            };
            let hint = match self.active() {
                true => "lower the learning rate, or train in bf16 or f32",
                false => "lower the learning rate, and check the optimizer's settings and the data",
            };
            return Err(Error::Diverged(format!(
                "the gradients were not finite in {MAX_SKIPS} steps in a row{at}; {hint}"
            )));
        }
        Ok(Outcome::Skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's `_amp_update_scale_`: halve and reset on inf; double after `interval`
    /// finite steps in a row, the count reset by an inf.
    #[test]
    fn follows_the_dynamic_rule() {
        let mut s = LossScaler::new(LossScale::Auto, true);
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.update(false).unwrap(), Outcome::Skipped);
        assert_eq!(s.update(false).unwrap(), Outcome::Skipped);
        assert_eq!(s.scale(), 16384.0);
        for _ in 0..INTERVAL - 1 {
            assert_eq!(s.update(true).unwrap(), Outcome::Applied);
        }
        assert_eq!(s.scale(), 16384.0);
        s.update(false).unwrap();
        assert_eq!(
            s.state(),
            ScalerState {
                scale: 8192.0,
                good: 0
            }
        );
        for _ in 0..INTERVAL {
            s.update(true).unwrap();
        }
        assert_eq!(
            s.state(),
            ScalerState {
                scale: 16384.0,
                good: 0
            }
        );
    }

    #[test]
    fn stops_after_too_many_skips() {
        for mode in [LossScale::Dynamic, LossScale::Off, LossScale::Fixed(8.0)] {
            let mut s = LossScaler::new(mode, false);
            for _ in 0..MAX_SKIPS - 1 {
                assert_eq!(s.update(false).unwrap(), Outcome::Skipped);
            }
            let e = s.update(false).unwrap_err().to_string();
            assert!(e.contains("not finite"), "{mode:?}: {e}");
        }
        // A finite step resets the count.
        let mut s = LossScaler::new(LossScale::Off, false);
        for _ in 0..3 * MAX_SKIPS {
            s.update(false).unwrap();
            s.update(true).unwrap();
        }
    }

    #[test]
    fn modes() {
        assert!(!LossScaler::new(LossScale::Auto, false).active());
        assert!(LossScaler::new(LossScale::Auto, true).active());
        let mut f = LossScaler::new(LossScale::Fixed(128.0), true);
        f.update(false).unwrap();
        f.restore(ScalerState {
            scale: 4.0,
            good: 3,
        });
        assert_eq!(f.scale(), 128.0);
        let mut d = LossScaler::new(LossScale::Dynamic, false);
        d.restore(ScalerState {
            scale: 4.0,
            good: 3,
        });
        assert_eq!(
            d.state(),
            ScalerState {
                scale: 4.0,
                good: 3
            }
        );
        for (s, want) in [
            ("auto", LossScale::Auto),
            ("off", LossScale::Off),
            ("dynamic", LossScale::Dynamic),
            ("1024", LossScale::Fixed(1024.0)),
        ] {
            assert_eq!(s.parse::<LossScale>().unwrap(), want);
        }
        for bad in ["0", "-2", "inf", "nan", "big", "1e31"] {
            assert!(bad.parse::<LossScale>().is_err(), "{bad}");
        }
    }
}
