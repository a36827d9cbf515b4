//! LoRA adapters on the GPU path's products (Hu et al., arXiv 2106.09685, as `lmkit_core::lora`
//! runs them and `crate::body_cpu` differentiates them):
//!
//! ```text
//! y  = x Wᵀ + s · (x̃ Aᵀ) Bᵀ,   x̃ = x ⊙ k (dropout's mask, or x),   hs = s · x̃ Aᵀ  (n, r)
//! dB = dyᵀ hs    g = s · dy B  (n, r)    dA = gᵀ x̃    dx += (g A) ⊙ k
//! ```
//!
//! The base product (and its gradient, when the base trains) is the block's; here only the
//! adapter's terms, in the compute dtype.

use lmkit_core::{DType, Tensor};

use super::{Grads, Param};
use crate::Result;

/// One adapter: `A (r, in)`, `B (out, r)` (f32 variables), `s = α / r`, and this pass's dropout
/// mask over the input `(n, in)` in the compute dtype.
pub(super) struct Adapter {
    pub a: Param,
    pub b: Param,
    pub scale: f64,
    pub mask: Option<Tensor>,
}

/// What the adapter's backward needs: `hs (n, r)` and, under dropout, `x̃`.
pub(super) struct AdapterStash {
    hs: Tensor,
    dropped: Option<Tensor>,
}

impl Adapter {
    /// The adapter's term `s · (x̃ Aᵀ) Bᵀ (n, out)` of the product of `x (n, in)`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, AdapterStash)> {
        let cd = x.dtype();
        let dropped = match &self.mask {
            Some(k) => Some((x * k)?),
            None => None,
        };
        let xin = dropped.as_ref().unwrap_or(x);
        let hs = (xin.matmul(&self.a.t.to_dtype(cd)?.t()?)? * self.scale)?; // (n, r)
        let delta = hs.matmul(&self.b.t.to_dtype(cd)?.t()?)?; // (n, out)
        Ok((delta, AdapterStash { hs, dropped }))
    }

    /// Given `dy (n, out)` and the product's input `x`: pushes the gradients of A and B (those
    /// that train) and returns the adapter's share of `∂x (n, in)`.
    pub fn backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        s: AdapterStash,
        out: &mut Grads,
    ) -> Result<Tensor> {
        let cd = dy.dtype();
        if self.b.train {
            out.push((self.b.t.clone(), dy.t()?.matmul(&s.hs)?)); // (out, r)
        }
        let g = (dy.matmul(&self.b.t.to_dtype(cd)?)? * self.scale)?; // (n, r)
        if self.a.train {
            let xin = s.dropped.as_ref().unwrap_or(x);
            out.push((self.a.t.clone(), g.t()?.matmul(xin)?)); // (r, in)
        }
        let dx = g.matmul(&self.a.t.to_dtype(cd)?)?; // (n, in)
        Ok(match &self.mask {
            Some(k) => (dx * k)?,
            None => dx,
        })
    }
}

/// This pass's dropout mask `(rows, in)` for an adapter, in `dtype` on `like`'s device.
pub(super) fn mask(
    l: &lmkit_core::LoraAdapter,
    rows: usize,
    inp: usize,
    dtype: DType,
    like: &Tensor,
) -> Result<Option<Tensor>> {
    let Some(k) = l.dropout.as_ref().and_then(|d| d.mask(rows * inp)) else {
        return Ok(None);
    };
    Ok(Some(
        Tensor::from_vec(k, (rows, inp), like.device())?.to_dtype(dtype)?,
    ))
}
