//! The element-wise and product helpers of the CPU training path, on plain row-major buffers.

use lmkit_core::sgemm::{sgemm, View};
use rayon::prelude::*;

use crate::Result;

/// `dyᵀ x` for `dy (n, m)`, `x (n, k)`: the gradient `(m, k)` of a linear layer's weight.
pub(super) fn weight_grad(dy: &[f32], x: &[f32], n: usize, m: usize, k: usize) -> Result<Vec<f32>> {
    let mut dw = vec![0f32; m * k];
    sgemm(
        &mut dw,
        View::rows(dy, n, m).t(),
        View::rows(x, n, k),
        false,
    )?;
    Ok(dw)
}

pub(super) fn add_rows(x: &mut [f32], bias: &[f32]) {
    x.par_chunks_mut(bias.len()).for_each(|row| {
        row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    });
}

/// Rows per partial sum of a reduction over rows: fixed, so that sums run in the same order
/// whatever threads take which rows (runs are reproducible).
const GROUP: usize = 64;

/// The sum, in order, of per-group partial sums of width `m`.
fn ordered_sum(partials: Vec<Vec<f32>>, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; m];
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    out
}

/// `Σ_rows x` of `x (n, m)`.
pub(super) fn column_sums(x: &[f32], m: usize) -> Vec<f32> {
    let partials = x
        .par_chunks(m * GROUP)
        .map(|rows| {
            let mut acc = vec![0f32; m];
            for row in rows.chunks(m) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect();
    ordered_sum(partials, m)
}

/// `g ← silu(g) ⊙ u`.
pub(super) fn silu_mul(g: &mut [f32], u: &[f32]) {
    let isa = lmkit_kernels::isa();
    g.par_chunks_mut(4096)
        .zip(u.par_chunks(4096))
        .for_each(|(g, u)| lmkit_kernels::ops::silu_mul(isa, g, u));
}

/// RMSNorm of each row of `x (n, c)` (the inference kernel, on the thread pool).
pub(super) fn rms_forward(x: &[f32], w: &[f32], c: usize, eps: f32) -> Vec<f32> {
    let mut a = vec![0f32; x.len()];
    a.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(a, x)| lmkit_kernels::ops::rmsnorm(x, w, eps, a));
    a
}

/// Rotates every head of every row of `x (b·t, width)` (heads of `d`) by RoPE at the row's
/// position (row mod `t`), or back (`inverse`: the backward pass).
pub(super) fn rope_rows(
    x: &mut [f32],
    width: usize,
    d: usize,
    t: usize,
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    let half = d / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(width).enumerate().for_each(|(row, xs)| {
        let pos = row % t;
        let (cs, sn) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        for head in xs.chunks_mut(d) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2, s) = (a[i], b[i], sign * sn[i]);
                a[i] = x1 * cs[i] - x2 * s;
                b[i] = x1 * s + x2 * cs[i];
            }
        }
    });
}
