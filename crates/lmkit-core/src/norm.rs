//! RMSNorm: `y = x / sqrt(mean(x²) + ε) · g`.

use candle_core::Tensor;

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
        if self.weight.dtype() == x.dtype() {
            return candle_nn::ops::rms_norm(&x, &self.weight, self.eps as f32).op("rms_norm");
        }
        let w = self.weight.to_dtype(x.dtype()).op("rms_norm")?;
        candle_nn::ops::rms_norm(&x, &w, self.eps as f32).op("rms_norm")
    }

    /// Differentiable path, built from elementwise ops (for training). Computes in f32 and
    /// returns `x`'s dtype (as autocast does for norms).
    ///
    /// # Shapes
    /// `x`: `(.., c)` → `(.., c)`.
    pub fn forward_diff(&self, x: &Tensor) -> Result<Tensor> {
        crate::fused::rms_norm(x, &self.weight, self.eps)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }
}
