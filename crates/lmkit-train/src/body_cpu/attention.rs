//! Causal attention with grouped kv heads, forward and backward, on plain row-major buffers:
//! blocks of 64 query rows multiply only the keys they see.

use lmkit_core::sgemm::{sgemm_serial, sgemm_serial_into, View};
use rayon::prelude::*;

use super::Dims;
use crate::Result;

/// A head's `(t, d)` block of a row-major `(b·t, width)` buffer: batch `bi`, head `hi`.
fn head_view(x: &[f32], width: usize, d: usize, t: usize, bi: usize, hi: usize) -> View<'_> {
    View {
        data: &x[bi * t * width + hi * d..],
        rows: t,
        cols: d,
        rs: width,
        cs: 1,
    }
}

/// Query rows per block of attention: each block multiplies only the keys it may see.
const BLOCK: usize = 64;

/// Rows `r0..r1`, columns `0..r1` of a row-major `(·, t)` buffer.
fn block(x: &[f32], t: usize, r0: usize, r1: usize) -> View<'_> {
    View {
        data: &x[r0 * t..],
        rows: r1 - r0,
        cols: r1,
        rs: t,
        cs: 1,
    }
}

/// Rows `r0..r1` of a view.
fn row_block(v: View<'_>, r0: usize, r1: usize) -> View<'_> {
    View {
        data: &v.data[r0 * v.rs..],
        rows: r1 - r0,
        ..v
    }
}

/// Causal attention of `q (b·t, h·d)` over `k`, `v (b·t, kh·d)`: the probabilities
/// `(b, h, t, t)` and the output `(b·t, h·d)`.
pub(super) fn attention_forward(
    dm: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (t, d, h) = (dm.t, dm.d, dm.h);
    let (hd, kd, g) = (dm.hd(), dm.kd(), dm.group());
    let scale = 1.0 / (d as f32).sqrt();
    let isa = lmkit_kernels::isa();
    let mut p = vec![0f32; dm.b * h * t * t];
    let mut yh = vec![0f32; dm.b * h * t * d]; // (b, h, t, d)
    p.par_chunks_mut(t * t)
        .zip(yh.par_chunks_mut(t * d))
        .enumerate()
        .try_for_each(|(i, (pc, yc))| -> Result<()> {
            let (bi, hi) = (i / h, i % h);
            let j = hi / g;
            let qh = head_view(q, hd, d, t, bi, hi);
            let (kv, vv) = (head_view(k, kd, d, t, bi, j), head_view(v, kd, d, t, bi, j));
            // Blocks of query rows see keys 0..r1 only: the masked triangle is never computed.
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(t);
                let qb = row_block(qh, r0, r1);
                let seen = View { rows: r1, ..kv };
                sgemm_serial_into(&mut pc[r0 * t..], t, qb, seen.t(), false)?;
                for (r, row) in (r0..r1).zip(pc[r0 * t..r1 * t].chunks_mut(t)) {
                    let (seen, unseen) = row.split_at_mut(r + 1);
                    seen.iter_mut().for_each(|s| *s *= scale);
                    let inv = 1.0 / lmkit_kernels::ops::softmax_unnormalized(isa, seen);
                    seen.iter_mut().for_each(|s| *s *= inv);
                    unseen.fill(0.0);
                }
                let pb = block(pc, t, r0, r1);
                sgemm_serial(&mut yc[r0 * d..r1 * d], pb, View { rows: r1, ..vv }, false)?;
            }
            Ok(())
        })?;
    let mut y = vec![0f32; dm.n * hd];
    from_heads(&yh, &mut y, dm, h);
    Ok((p, y))
}

/// `(b, heads, t, d)` → row-major `(b·t, heads·d)`.
fn from_heads(src: &[f32], dst: &mut [f32], dm: &Dims, heads: usize) {
    let (t, d) = (dm.t, dm.d);
    dst.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(row, out)| {
            let (bi, r) = (row / t, row % t);
            for (hi, o) in out.chunks_mut(d).enumerate() {
                o.copy_from_slice(&src[((bi * heads + hi) * t + r) * d..][..d]);
            }
        });
}

/// The backward of [`attention_forward`] given `dy (b·t, h·d)`: `dq`, `dk`, `dv`, row-major,
/// with respect to the rotated `q` and `k`.
#[allow(clippy::type_complexity)]
pub(super) fn attention_backward(
    dm: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f32],
    dy: &[f32],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (t, d, h, kh) = (dm.t, dm.d, dm.h, dm.kh);
    let (hd, kd, g) = (dm.hd(), dm.kd(), dm.group());
    let scale = 1.0 / (d as f32).sqrt();
    let mut dqh = vec![0f32; dm.b * h * t * d]; // (b, h, t, d)
    let mut dkh = vec![0f32; dm.b * kh * t * d]; // (b, kh, t, d)
    let mut dvh = vec![0f32; dm.b * kh * t * d];
    // One task per kv head: its group of query heads add into its dk and dv.
    dqh.par_chunks_mut(g * t * d)
        .zip(dkh.par_chunks_mut(t * d).zip(dvh.par_chunks_mut(t * d)))
        .enumerate()
        .try_for_each(|(i, (dqc, (dkc, dvc)))| -> Result<()> {
            let (bi, j) = (i / kh, i % kh);
            let (kv, vv) = (head_view(k, kd, d, t, bi, j), head_view(v, kd, d, t, bi, j));
            let mut ds = vec![0f32; t * t];
            for r in 0..g {
                let hi = j * g + r;
                let pc = &p[(bi * h + hi) * t * t..][..t * t];
                let (qh, dyh) = (
                    head_view(q, hd, d, t, bi, hi),
                    head_view(dy, hd, d, t, bi, hi),
                );
                for r0 in (0..t).step_by(BLOCK) {
                    let r1 = (r0 + BLOCK).min(t);
                    let (qb, dyb) = (row_block(qh, r0, r1), row_block(dyh, r0, r1));
                    let (ks, vs) = (View { rows: r1, ..kv }, View { rows: r1, ..vv });
                    // dv += Pᵀ dy, dP = dy vᵀ.
                    sgemm_serial(&mut dvc[..r1 * d], block(pc, t, r0, r1).t(), dyb, true)?;
                    sgemm_serial_into(&mut ds[r0 * t..], t, dyb, vs.t(), false)?;
                    // dS = s·P ⊙ (dP − rowsum(dP ⊙ P)) on the seen columns.
                    for (row, (dsr, pr)) in
                        (r0..r1).zip(ds[r0 * t..].chunks_mut(t).zip(pc[r0 * t..].chunks(t)))
                    {
                        let seen = row + 1;
                        let dot: f32 = dsr[..seen]
                            .iter()
                            .zip(&pr[..seen])
                            .map(|(a, b)| a * b)
                            .sum();
                        for (x, &pv) in dsr[..seen].iter_mut().zip(&pr[..seen]) {
                            *x = scale * pv * (*x - dot);
                        }
                        dsr[seen..r1].fill(0.0);
                    }
                    let dsb = block(&ds, t, r0, r1);
                    // dq = dS k, dk += dSᵀ q.
                    sgemm_serial(
                        &mut dqc[(r * t + r0) * d..][..(r1 - r0) * d],
                        dsb,
                        ks,
                        false,
                    )?;
                    sgemm_serial(&mut dkc[..r1 * d], dsb.t(), qb, true)?;
                }
            }
            Ok(())
        })?;
    let mut dq = vec![0f32; dm.n * hd];
    let mut dk = vec![0f32; dm.n * kd];
    let mut dv = vec![0f32; dm.n * kd];
    from_heads(&dqh, &mut dq, dm, h);
    from_heads(&dkh, &mut dk, dm, kh);
    from_heads(&dvh, &mut dv, dm, kh);
    Ok((dq, dk, dv))
}
