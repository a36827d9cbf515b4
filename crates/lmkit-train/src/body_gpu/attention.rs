//! Causal attention of the GPU training path, two ways: the `(b·kv_heads, group·t, t)`
//! probabilities materialized between cuBLAS products (any compute dtype and head size), or
//! lmkit's flash kernels (`tr_flash_*` in `cuda/train.cu`: bf16/f16, heads of 64 or 128), which
//! keep only one log-sum-exp per row and recompute the probabilities in the backward.

use lmkit_core::attn_softmax::{causal_softmax, causal_softmax_backward};
use lmkit_core::launch::Arg;
use lmkit_core::{DType, Tensor};

use super::{Dims, Kernels};
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

/// Whether the flash kernels take this compute dtype and head size.
pub fn flash_applies(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && matches!(head_dim, 64 | 128)
}

/// Whether `mode` runs the flash kernels here.
pub(super) fn use_flash(mode: Attention, dtype: DType, head_dim: usize) -> Result<bool> {
    let ok = flash_applies(dtype, head_dim);
    match mode {
        Attention::Materialized => Ok(false),
        Attention::Auto => Ok(ok && std::env::var("LMKIT_TRAIN_FLASH").map_or(true, |v| v != "0")),
        Attention::Flash if ok => Ok(true),
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

/// Warps per block of the flash kernels (their `W`).
fn warps(d: usize) -> usize {
    match d {
        64 => 4,
        _ => 2,
    }
}

/// Attention of `q (b·kh, g·t, d)`, `k`, `v (b·kh, t, d)`: the output as rows `(n, h·d)`.
pub(super) fn forward(
    dm: &Dims,
    k: &Kernels,
    q: &Tensor,
    kk: &Tensor,
    v: &Tensor,
    flash: bool,
) -> Result<(Saved, Tensor)> {
    let (b, t, n, h, kh, d) = (dm.b, dm.t, dm.n, dm.h, dm.kh, dm.d);
    if !flash {
        let s = q.matmul(&kk.t()?)?; // (b·kh, g·t, t)
        let p = causal_softmax(&s, t, 0, dm.scale())?;
        drop(s);
        let y = p.matmul(v)?; // (b·kh, g·t, d) = (b, h, t, d)
        let y = y
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, h * d))?;
        return Ok((Saved::Probs(p), y));
    }
    let y = k.empty((n, h * d), k.dtype)?;
    let lse = k.empty(b * h * t, DType::F32)?;
    let w = warps(d);
    let args = [
        k.ptr(q)?,
        k.ptr(kk)?,
        k.ptr(v)?,
        k.ptr(&y)?,
        k.ptr(&lse)?,
        Kernels::int(t, "sequence length")?,
        Kernels::int(h, "heads")?,
        Kernels::int(kh, "kv heads")?,
        Arg::F32(dm.scale() as f32),
    ];
    k.run2(
        &format!("flash_fwd_{d}"),
        (t.div_ceil(16 * w), b * h),
        32 * w as u32,
        &args,
    )?;
    Ok((Saved::Lse(lse), y))
}

/// The backward of [`forward`]: from `dy (n, h·d)`, the gradients of q `(b·kh, g·t, d)`, k and
/// v `(b·kh, t, d)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dm: &Dims,
    k: &Kernels,
    saved: Saved,
    q: &Tensor,
    kk: &Tensor,
    v: &Tensor,
    y: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, n, h, kh, d, g) = (dm.b, dm.t, dm.n, dm.h, dm.kh, dm.d, dm.group());
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
            let ds = causal_softmax_backward(&p, &dp, t, 0, dm.scale())?;
            drop((dp, p));
            let dq = ds.matmul(kk)?; // (b·kh, g·t, d)
            let dk = ds.t()?.matmul(q)?; // (b·kh, t, d)
            return Ok((dq, dk, dv));
        }
        Saved::Lse(lse) => lse,
    };
    // δ = rowsum(dy ⊙ y) per (row, head).
    let dd = k.empty(b * h * t, DType::F32)?;
    let args = [
        k.ptr(y)?,
        k.ptr(dy)?,
        k.ptr(&dd)?,
        Kernels::int(b, "batch")?,
        Kernels::int(t, "sequence length")?,
        Kernels::int(h, "heads")?,
        Kernels::int(d, "head size")?,
    ];
    k.run("attn_dot", (n * h).div_ceil(8), 256, &args)?;
    let dq = k.empty((b * kh, g * t, d), k.dtype)?;
    let dk = k.empty((b * kh, t, d), k.dtype)?;
    let dv = k.empty((b * kh, t, d), k.dtype)?;
    let w = warps(d);
    let common = |out: &[&Tensor]| -> Result<Vec<Arg>> {
        let mut a = vec![
            k.ptr(q)?,
            k.ptr(kk)?,
            k.ptr(v)?,
            k.ptr(dy)?,
            k.ptr(&lse)?,
            k.ptr(&dd)?,
        ];
        for o in out {
            a.push(k.ptr(o)?);
        }
        a.extend([
            Kernels::int(t, "sequence length")?,
            Kernels::int(h, "heads")?,
            Kernels::int(kh, "kv heads")?,
            Arg::F32(dm.scale() as f32),
        ]);
        Ok(a)
    };
    let blocks = t.div_ceil(16 * w);
    k.run2(
        &format!("flash_bwd_kv_{d}"),
        (blocks, b * kh),
        32 * w as u32,
        &common(&[&dk, &dv])?,
    )?;
    k.run2(
        &format!("flash_bwd_q_{d}"),
        (blocks, b * h),
        32 * w as u32,
        &common(&[&dq])?,
    )?;
    Ok((dq, dk, dv))
}
