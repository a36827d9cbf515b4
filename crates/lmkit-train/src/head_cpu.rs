//! The CPU f32 path of [`crate::head_loss`]: the output layer, the loss and its gradients in
//! one pass over row chunks, on plain buffers.
//!
//! Per chunk of rows: `z = h Wᵀ` (gemm), then per row (in parallel) the cross-entropy and, in
//! place, `z ← coefᵢ (softmax(z) − onehot(yᵢ))` (`lmkit_kernels::ops::cross_entropy_row`), then
//! `∂h = z W` and `∂W += zᵀ h` (gemm). The gradients are those of `Σᵢ coefᵢ nllᵢ`; the
//! autograd op scales them by the upstream gradient later (they are linear in it). Computing
//! them in the forward pass saves the recomputation of the logits (a quarter of the head's
//! FLOPs) and every intermediate tensor.

pub(crate) use lmkit_core::cpu::with_f32;
use lmkit_core::sgemm::{sgemm, View};
use lmkit_core::{DType, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Rows per chunk: 256 × 49,152 f32 logits are 50 MB.
pub(crate) const CHUNK: usize = 256;

/// One pass's results, row-major.
pub(crate) struct Pass {
    /// `(n,)`.
    pub nll: Vec<f32>,
    /// `(n, c)`: ∂(Σ coefᵢ nllᵢ)/∂h, when asked for.
    pub dh: Option<Vec<f32>>,
    /// `(v, c)`: ∂(Σ coefᵢ nllᵢ)/∂W, when asked for.
    pub dw: Option<Vec<f32>>,
}

/// Whether `h` and `w` can take this path.
pub(crate) fn applies(h: &Tensor, w: &Tensor) -> bool {
    h.device().is_cpu()
        && h.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.is_contiguous()
        && with_f32(w, |_| ()).is_some()
}

/// The pass over `h (n, c)` and `w (v, c)` (see the module doc). `targets` must be `< v`.
pub(crate) fn pass(
    h: &[f32],
    w: &[f32],
    c: usize,
    targets: &[u32],
    coef: &[f32],
    want_dh: bool,
    want_dw: bool,
) -> Result<Pass> {
    let n = targets.len();
    let v = w.len() / c.max(1);
    let isa = lmkit_kernels::isa();
    let mut z = vec![0f32; CHUNK.min(n) * v];
    let mut nll = vec![0f32; n];
    let mut dh = want_dh.then(|| vec![0f32; n * c]);
    let mut dw = want_dw.then(|| vec![0f32; v * c]);
    let wv = View::rows(w, v, c);
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let hc = View::rows(&h[start * c..(start + len) * c], len, c);
        let zc = &mut z[..len * v];
        sgemm(zc, hc, wv.t(), false)?;
        let (ys, cs) = (&targets[start..start + len], &coef[start..start + len]);
        zc.par_chunks_mut(v)
            .zip(nll[start..start + len].par_iter_mut())
            .zip(ys.par_iter().zip(cs.par_iter()))
            .for_each(|((row, out), (&y, &k))| {
                *out = lmkit_kernels::ops::cross_entropy_row(isa, row, y as usize, k);
            });
        let zv = View::rows(zc, len, v);
        if let Some(dh) = &mut dh {
            sgemm(&mut dh[start * c..(start + len) * c], zv, wv, false)?;
        }
        if let Some(dw) = &mut dw {
            sgemm(dw, zv.t(), hc, start > 0)?;
        }
    }
    Ok(Pass { nll, dh, dw })
}
