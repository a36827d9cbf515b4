//! Causal attention of the GPU training path, two ways: the `(b·kv_heads, group·t, t)`
//! probabilities materialized between cuBLAS products (any compute dtype and head size), or
//! lmkit's flash kernels (`tr_flash_*` in `cuda/train.cu`: bf16/f16, heads of 64 or 128), which
//! keep only one log-sum-exp per row and recompute the probabilities in the backward.

use lmkit_core::attn_softmax::{causal_softmax, causal_softmax_backward};
pub use lmkit_core::block_ops::flash_applies;
use lmkit_core::block_ops::BlockOps;
use lmkit_core::Tensor;

use super::Dims;
use crate::{Error, Result};

/// How attention runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attention {
    /// Flash where it applies (see [`flash_applies`]) unless `LMKIT_TRAIN_FLASH=0`, else
    /// materialized.
    Auto,
    /// Probabilities materialized.
    Materialized,
    /// The flash kernels (an error where they do not apply).
    Flash,
}

/// Whether `mode` runs the flash kernels with `k`'s dtype and launcher for heads of
/// `head_dim`. Auto falls back to the materialized path where the kernels are missing (a GPU
/// older than sm_80), keeping lmkit's backward.
pub(super) fn use_flash(mode: Attention, k: &BlockOps, head_dim: usize) -> Result<bool> {
    let dtype = k.dtype();
    let fits = flash_applies(dtype, head_dim);
    match mode {
        Attention::Materialized => Ok(false),
        Attention::Auto => Ok(fits
            && std::env::var("LMKIT_TRAIN_FLASH").map_or(true, |v| v != "0")
            && k.has_flash(head_dim)),
        Attention::Flash if fits && k.has_flash(head_dim) => Ok(true),
        Attention::Flash if fits => Err(Error::Data(
            "flash attention's kernels are not built for this GPU (they need sm_80 or newer)"
                .into(),
        )),
        Attention::Flash => Err(Error::Data(format!(
            "flash attention takes bf16/f16 and heads of 64 or 128, not {dtype:?} with {head_dim}"
        ))),
    }
}

/// What the backward needs besides q, k, v and the output.
pub(super) enum Saved {
    /// `(b·kh, g·t, t)` probabilities.
    Probs(Tensor),
    /// `(b, h, t)` f32 log-sum-exp of each row's scaled scores.
    Lse(Tensor),
}

/// Attention of `q (b·kh, g·t, d)`, `k`, `v (b·kh, t, d)`: the output as rows `(n, h·d)`.
pub(super) fn forward(
    dm: &Dims,
    k: &BlockOps,
    q: &Tensor,
    kk: &Tensor,
    v: &Tensor,
    flash: bool,
) -> Result<(Saved, Tensor)> {
    let (b, t, n, h, d) = (dm.b, dm.t, dm.n, dm.h, dm.d);
    if !flash {
        let s = q.matmul(&kk.t()?)?; // (b·kh, g·t, t)
        let p = causal_softmax(&s, t, 0, f64::from(dm.heads().scale()))?;
        drop(s);
        let y = p.matmul(v)?; // (b·kh, g·t, d) = (b, h, t, d)
        let y = y
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, h * d))?;
        return Ok((Saved::Probs(p), y));
    }
    let q = q.reshape((b, h, t, d))?;
    let (y, lse) = k.flash_fwd(&q, kk, v, &dm.heads(), true)?;
    let lse = lse.ok_or_else(|| Error::Data("flash attention kept no log-sum-exp".into()))?;
    Ok((Saved::Lse(lse), y))
}

/// The backward of [`forward`]: from `dy (n, h·d)`, the gradients of q `(b·kh, g·t, d)`, k and
/// v `(b·kh, t, d)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dm: &Dims,
    k: &BlockOps,
    saved: Saved,
    q: &Tensor,
    kk: &Tensor,
    v: &Tensor,
    y: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, h, kh, d, g) = (dm.b, dm.t, dm.h, dm.kh, dm.d, dm.group());
    let lse = match saved {
        Saved::Probs(p) => {
            let dy = dy
                .reshape((b, t, h, d))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * kh, g * t, d))?;
            let dp = dy.matmul(&v.t()?)?; // (b·kh, g·t, t)
            let dv = p.t()?.matmul(&dy)?; // (b·kh, t, d)
            drop(dy);
            let ds = causal_softmax_backward(&p, &dp, t, 0, f64::from(dm.heads().scale()))?;
            drop((dp, p));
            let dq = ds.matmul(kk)?; // (b·kh, g·t, d)
            let dk = ds.t()?.matmul(q)?; // (b·kh, t, d)
            return Ok((dq, dk, dv));
        }
        Saved::Lse(lse) => lse,
    };
    let (dq, dk, dv) = k.flash_bwd(q, kk, v, y, dy, &lse, &dm.heads())?;
    let dq = dq.reshape((b * kh, g * t, d))?;
    Ok((dq, dk, dv))
}
