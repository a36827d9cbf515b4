//! LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685),
//! as HF PEFT implements it: a frozen `W (out, in)` plus a trainable low-rank update,
//! `y = x Wᵀ + s · (x Aᵀ) Bᵀ` with `A (r, in)`, `B (out, r)`, `s = α / r`; `B` starts at zero so
//! training starts from the base model. Merging folds the update into the weight:
//! `W' = W + s · B A`.
//!
//! Dropout (PEFT's `lora_dropout`) applies to the adapter's input only, while training:
//! `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`, `drop(x) = x ⊙ k / (1 − p)` with `k ~ Bernoulli(1 − p)`.
//! The masks come from a counter-based generator keyed by (seed, micro-batch, adapter,
//! element), so a run is reproducible and a resumed run draws the masks it would have drawn.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use rayon::prelude::*;

use crate::error::OpContext;
use crate::Result;
use lmkit_rand::mix;

/// A low-rank adapter on one linear layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `(r, in)`.
    pub a: Tensor,
    /// `(out, r)`.
    pub b: Tensor,
    /// `α / r`.
    pub scale: f64,
    /// Input dropout while training (None: no dropout).
    pub dropout: Option<LoraDropout>,
}

/// One adapter's dropout: the probability, the adapter's number, and the run's shared switch.
#[derive(Debug, Clone)]
pub struct LoraDropout {
    pub p: f32,
    pub id: u64,
    pub state: Arc<DropoutState>,
}

/// Whether dropout is on (training) and which micro-batch the masks are drawn for; shared by
/// all adapters of a model.
#[derive(Debug)]
pub struct DropoutState {
    seed: u64,
    active: AtomicBool,
    round: AtomicU64,
}

impl DropoutState {
    /// Off until [`DropoutState::train`].
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            seed,
            active: AtomicBool::new(false),
            round: AtomicU64::new(0),
        })
    }

    /// Dropout on, with the masks of micro-batch `round` (count micro-batches from the start
    /// of the run, so a resumed run continues the sequence).
    pub fn train(&self, round: u64) {
        self.round.store(round, Ordering::Relaxed);
        self.active.store(true, Ordering::Relaxed);
    }

    /// Dropout off (evaluation, inference).
    pub fn eval(&self) {
        self.active.store(false, Ordering::Relaxed);
    }

    fn key(&self) -> Option<u64> {
        self.active
            .load(Ordering::Relaxed)
            .then(|| mix(self.seed ^ mix(self.round.load(Ordering::Relaxed))))
    }
}

impl LoraDropout {
    /// This micro-batch's mask over `n` input elements (row-major): `0` for a dropped
    /// element, `1 / (1 − p)` for a kept one; None when dropout is off (evaluation) or `p` is
    /// 0. The same mask for the same (seed, micro-batch, adapter), whichever path asks.
    pub fn mask(&self, n: usize) -> Option<Vec<f32>> {
        let key = self.state.key()?;
        if self.p <= 0.0 {
            return None;
        }
        let key = mix(key ^ self.id.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        let (p, keep) = (self.p, 1.0 / (1.0 - self.p));
        Some(
            (0..n as u64)
                .into_par_iter()
                .map(|i| {
                    let u = (mix(key ^ i) >> 40) as f32 / (1u64 << 24) as f32;
                    if u < p {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect(),
        )
    }

    /// `x ⊙ k / (1 − p)` (a fresh mask per micro-batch), or `x` when dropout is off.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let Some(mask) = self.mask(x.elem_count()) else {
            return Ok(x.clone());
        };
        let mask = Tensor::from_vec(mask, x.dims(), x.device())
            .and_then(|m| m.to_dtype(x.dtype()))
            .op("lora dropout mask")?;
        (x * mask).op("lora dropout")
    }
}

impl LoraAdapter {
    /// The update `s · (x Aᵀ) Bᵀ`.
    ///
    /// # Shapes
    /// `x`: `(.., in)` → `(.., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims.last().copied().unwrap_or(0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let x = match &self.dropout {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        };
        let x2 = x.reshape((rows, inp)).op("lora input")?;
        // Mixed precision: A and B (f32 trainables) run in the activations' dtype.
        let (a, b) = (
            self.a.to_dtype(x.dtype()).op("lora A")?,
            self.b.to_dtype(x.dtype()).op("lora B")?,
        );
        let h = x2.matmul(&a.t().op("lora A")?).op("lora A")?; // (rows, r)
        let y = h.matmul(&b.t().op("lora B")?).op("lora B")?; // (rows, out)
        let y = (y * self.scale).op("lora scale")?;
        let mut shape = dims;
        if let Some(last) = shape.last_mut() {
            *last = self.b.dims()[0];
        }
        y.reshape(shape).op("lora output")
    }

    /// `s · B A`, `(out, in)`.
    pub fn delta(&self) -> Result<Tensor> {
        (self.b.matmul(&self.a).op("lora merge")? * self.scale).op("lora merge")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn out(l: &LoraAdapter, x: &Tensor) -> Vec<f32> {
        l.forward(x)
            .and_then(|y| y.flatten_all().op("flat"))
            .and_then(|y| y.to_vec1::<f32>().op("vec"))
            .unwrap_or_default()
    }

    /// Off: the plain adapter. On: masks that drop about p of the inputs, scale the rest by
    /// 1/(1 − p), repeat for the same micro-batch and change with the next.
    #[test]
    fn dropout_trains_only_and_is_reproducible() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, inp) = (64, 256);
        let x = Tensor::ones((rows, inp), candle_core::DType::F32, &dev).op("x")?;
        // r = inp, A = I, B = I: the adapter's output is s · drop(x).
        let eye = Tensor::eye(inp, candle_core::DType::F32, &dev).op("eye")?;
        let state = DropoutState::new(7);
        let l = LoraAdapter {
            a: eye.clone(),
            b: eye,
            scale: 1.0,
            dropout: Some(LoraDropout {
                p: 0.25,
                id: 3,
                state: state.clone(),
            }),
        };
        assert!(out(&l, &x).iter().all(|&v| v == 1.0));
        state.train(0);
        let a = out(&l, &x);
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "dropped {dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        assert_eq!(a, out(&l, &x));
        state.train(1);
        assert_ne!(a, out(&l, &x));
        state.eval();
        assert!(out(&l, &x).iter().all(|&v| v == 1.0));
        Ok(())
    }
}
