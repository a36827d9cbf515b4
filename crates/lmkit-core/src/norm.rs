//! RMSNorm: `y = x / sqrt(mean(x²) + ε) · g`.

use candle_core::{DType, Tensor, D};

use crate::error::OpContext;
use crate::Result;

/// Root-mean-square layer norm over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `weight` is `(c,)`.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// Inference path (candle's fused kernel: no gradient).
    ///
    /// # Shapes
    /// `x`: `(.., c)` → `(.., c)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous().op("rms_norm")?;
        candle_nn::ops::rms_norm(&x, &self.weight, self.eps as f32).op("rms_norm")
    }

    /// Differentiable path, built from elementwise ops (for training).
    ///
    /// # Shapes
    /// `x`: `(.., c)` → `(.., c)`.
    pub fn forward_diff(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32).op("rms_norm")?;
        let ms = x32
            .sqr()
            .op("rms_norm")?
            .mean_keepdim(D::Minus1)
            .op("rms_norm")?;
        let y = x32
            .broadcast_div(&(ms + self.eps).op("rms_norm")?.sqrt().op("rms_norm")?)
            .op("rms_norm")?;
        y.broadcast_mul(&self.weight).op("rms_norm")
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }
}
