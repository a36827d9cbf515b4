//! LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685),
//! as HF PEFT implements it: a frozen `W (out, in)` plus a trainable low-rank update,
//! `y = x Wᵀ + s · (x Aᵀ) Bᵀ` with `A (r, in)`, `B (out, r)`, `s = α / r`; `B` starts at zero so
//! training starts from the base model. Merging folds the update into the weight:
//! `W' = W + s · B A`.

use candle_core::Tensor;

use crate::error::OpContext;
use crate::Result;

/// A low-rank adapter on one linear layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `(r, in)`.
    pub a: Tensor,
    /// `(out, r)`.
    pub b: Tensor,
    /// `α / r`.
    pub scale: f64,
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
