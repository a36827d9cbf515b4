//! LDLQ adaptive rounding (QuIP, arXiv 2307.13304, §3), which the paper proves equal to
//! OPTQ/GPTQ (Frantar et al., arXiv 2210.17323): each weight is rounded after adding the
//! rounding errors of the weights already rounded, weighted by the LDL factor of the proxy
//! Hessian `H = E[x xᵀ]`, so the errors cancel in `tr((Ŵ − W) H (Ŵ − W)ᵀ)`.
//!
//! With `H = L Lᵀ` (Cholesky, `L` lower) and `L̃ = L diag(L)⁻¹ − I` (strictly lower, the unit
//! LDL factor minus the identity), columns run from last to first:
//!
//! `ŵᵢ = clamp(⌊wᵢ + Σ_{j>i} (wⱼ − ŵⱼ) L̃ⱼᵢ + ½⌋, 0, maxq)`
//!
//! in code space (weights already divided by their grid step, see [`Grid`]). This is the column
//! order of the reference implementation's `round_ldl` (Cornell-RelaxML/QuIP,
//! `vector_balance.py`); rows are independent and run in parallel.

use rayon::prelude::*;

use crate::{Error, Result};

/// A uniform grid per row: value `a·q + b` for codes `q ∈ [0, maxq]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    pub a: f32,
    pub b: f32,
}

impl Grid {
    /// OPTQ's asymmetric min-max grid over `w` (the range always includes 0):
    /// `scale = (max − min)/maxq`, `zero = round(−min/scale)`, value `scale·(q − zero)`.
    pub fn min_max(w: &[f32], maxq: u32) -> Self {
        let mut lo = w.iter().fold(0f32, |m, &v| m.min(v));
        let mut hi = w.iter().fold(0f32, |m, &v| m.max(v));
        if lo == 0.0 && hi == 0.0 {
            (lo, hi) = (-1.0, 1.0);
        }
        let scale = (hi - lo) / maxq as f32;
        let zero = (-lo / scale).round();
        Self {
            a: scale,
            b: -scale * zero,
        }
    }

    /// QuIP's symmetric grid for incoherent weights: `s = c·rms`, values
    /// `s·(2q/maxq − 1)` spanning `[−s, s]` (`c = 2.4` in the paper).
    pub fn symmetric(rms: f32, clip: f32, maxq: u32) -> Self {
        let s = clip * rms + 1e-16;
        Self {
            a: 2.0 * s / maxq as f32,
            b: -s,
        }
    }

    /// The grid as stored (f16 `a`, `b`), so codes are chosen against the values the file
    /// holds.
    pub fn stored(self) -> Self {
        let r = |v: f32| half::f16::from_f32(v).to_f32();
        let a = r(self.a);
        Self {
            a: if a == 0.0 {
                f32::MIN_POSITIVE.max(self.a)
            } else {
                a
            },
            b: r(self.b),
        }
    }

    /// `w` in code space: `(w − b)/a`, clamped to `[0, maxq]`.
    pub fn code_space(&self, w: f32, maxq: u32) -> f32 {
        ((w - self.b) / self.a).clamp(0.0, maxq as f32)
    }

    pub fn value(&self, q: u8) -> f32 {
        self.a * f32::from(q) + self.b
    }
}

/// `Σ aᵢbᵢ` with eight running sums (vectorizes).
fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f64>()
}

/// `Σ aᵢbᵢ` with sixteen running sums (vectorizes).
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// `L̃` of `H` (`d × d`, symmetric positive definite), column-major: entry `(j, i)` for
/// `j > i` at `[i·d + j]` (zero elsewhere). The Cholesky runs in f64; the factor is returned in
/// f32, the precision the rounding runs in (as the reference's float32 tensors).
pub fn feedback(h: &[f64], d: usize, what: &str) -> Result<Vec<f32>> {
    if h.len() != d * d {
        return Err(Error::Shape {
            op: "LDLQ",
            why: format!("{} Hessian entries for width {d}", h.len()),
        });
    }
    // Cholesky, lower, row-major in `l`.
    let mut l = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s = dot_f64(&l[i * d..i * d + j], &l[j * d..j * d + j]);
            if i == j {
                let p = h[i * d + i] - s;
                if p <= 0.0 || !p.is_finite() {
                    return Err(Error::NotPositiveDefinite {
                        what: what.into(),
                        col: i,
                        pivot: p,
                    });
                }
                l[i * d + i] = p.sqrt();
            } else {
                l[i * d + j] = (h[i * d + j] - s) / l[j * d + j];
            }
        }
    }
    let mut fb = vec![0f32; d * d];
    for i in 0..d {
        let di = l[i * d + i];
        for j in i + 1..d {
            fb[i * d + j] = (l[j * d + i] / di) as f32;
        }
    }
    Ok(fb)
}

/// LDLQ codes of one row already in code space (`w`, length `d`).
pub fn round_row(w: &[f32], fb: &[f32], maxq: u32, out: &mut [u8]) {
    let d = w.len();
    let mut err = vec![0f32; d];
    for i in (0..d).rev() {
        let s = dot_f32(&err[i + 1..], &fb[i * d + i + 1..(i + 1) * d]);
        let v = (w[i] + s + 0.5).floor().clamp(0.0, maxq as f32);
        out[i] = v as u8;
        err[i] = w[i] - v;
    }
}

/// LDLQ codes of every row of `w (rows, d)` on the grids `grids[r]`.
pub fn round_rows(w: &[f32], d: usize, grids: &[Grid], fb: &[f32], maxq: u32) -> Vec<u8> {
    let mut codes = vec![0u8; w.len()];
    codes
        .par_chunks_mut(d)
        .zip(w.par_chunks(d))
        .zip(grids.par_iter())
        .for_each(|((out, row), g)| {
            let cs: Vec<f32> = row.iter().map(|&v| g.code_space(v, maxq)).collect();
            round_row(&cs, fb, maxq, out);
        });
    codes
}

/// Nearest codes of every row (RTN), for comparison.
pub fn nearest_rows(w: &[f32], d: usize, grids: &[Grid], maxq: u32) -> Vec<u8> {
    w.chunks(d)
        .zip(grids)
        .flat_map(|(row, g)| {
            row.iter()
                .map(move |&v| g.code_space(v, maxq).round() as u8)
        })
        .collect()
}

/// Adds `damp · mean(diag H)` to the diagonal; columns with `H_ii = 0` (inputs that never
/// fire) get `H_ii = 1` and their weights zeroed, as OPTQ does. Returns the dead columns.
pub fn damp(h: &mut [f64], d: usize, damp: f64) -> Vec<usize> {
    let dead: Vec<usize> = (0..d).filter(|&i| h[i * d + i] == 0.0).collect();
    for &i in &dead {
        h[i * d + i] = 1.0;
    }
    let mean = (0..d).map(|i| h[i * d + i]).sum::<f64>() / d as f64;
    for i in 0..d {
        h[i * d + i] += damp * mean;
    }
    dead
}

/// The proxy loss `tr((Ŵ − W) H (Ŵ − W)ᵀ)` relative to `tr(W H Wᵀ)` (0: exact), through f32
/// GEMMs: `tr(E H Eᵀ) = Σ (E H) ⊙ E`.
pub fn relative_error(w: &[f32], w_hat: &[f32], h: &[f64], d: usize) -> f64 {
    let go = || -> std::result::Result<f64, lmkit_core::candle::Error> {
        use lmkit_core::{Device, Tensor};
        let rows = w.len() / d.max(1);
        let hm: Vec<f32> = h.iter().map(|&v| v as f32).collect();
        let ht = Tensor::from_vec(hm, (d, d), &Device::Cpu)?;
        let quad = |m: Vec<f32>| -> std::result::Result<f64, lmkit_core::candle::Error> {
            let t = Tensor::from_vec(m, (rows, d), &Device::Cpu)?;
            let prod = t.matmul(&ht)?.mul(&t)?;
            let v = prod.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.iter().map(|&x| f64::from(x)).sum())
        };
        let e: Vec<f32> = w.iter().zip(w_hat).map(|(a, b)| b - a).collect();
        let num = quad(e)?;
        let den = quad(w.to_vec())?;
        Ok(if den > 0.0 { num / den } else { 0.0 })
    };
    go().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(d: usize, seed: u64) -> Vec<f64> {
        let mut r = lmkit_rand::SplitMix64::new(seed);
        let n = 3 * d;
        let x: Vec<f64> = (0..n * d).map(|_| r.next_f64() * 2.0 - 1.0).collect();
        let mut h = vec![0f64; d * d];
        for t in 0..n {
            for i in 0..d {
                for j in 0..d {
                    h[i * d + j] += x[t * d + i] * x[t * d + j] / n as f64;
                }
            }
        }
        h
    }

    #[test]
    fn feedback_is_the_unit_ldl_factor() {
        let d = 7;
        let h = spd(d, 3);
        let fb = feedback(&h, d, "t").unwrap();
        // H = (L̃ + I) D (L̃ + I)ᵀ with D = diag(L)²: rebuild it.
        let mut l = vec![0f64; d * d];
        for i in 0..d {
            l[i * d + i] = 1.0;
            for j in i + 1..d {
                l[j * d + i] = f64::from(fb[i * d + j]);
            }
        }
        // D from the pivots of the Cholesky: solve via H's first principal minors.
        let mut dd = vec![0f64; d];
        for i in 0..d {
            let s: f64 = (0..i).map(|k| l[i * d + k] * l[i * d + k] * dd[k]).sum();
            dd[i] = h[i * d + i] - s;
        }
        for i in 0..d {
            for j in 0..d {
                let v: f64 = (0..d).map(|k| l[i * d + k] * dd[k] * l[j * d + k]).sum();
                assert!((v - h[i * d + j]).abs() < 1e-6, "({i},{j})");
            }
        }
    }

    #[test]
    fn not_positive_definite_is_an_error() {
        let h = vec![1.0, 2.0, 2.0, 1.0];
        assert!(matches!(
            feedback(&h, 2, "x"),
            Err(Error::NotPositiveDefinite { col: 1, .. })
        ));
    }

    #[test]
    fn ldlq_beats_nearest_on_the_proxy_loss() {
        let (rows, d, maxq) = (16, 32, 3);
        let mut h = spd(d, 5);
        damp(&mut h, d, 0.01);
        let fb = feedback(&h, d, "t").unwrap();
        let mut r = lmkit_rand::SplitMix64::new(9);
        let w: Vec<f32> = (0..rows * d)
            .map(|_| (r.next_f64() * 2.0 - 1.0) as f32)
            .collect();
        let grids: Vec<Grid> = w.chunks(d).map(|row| Grid::min_max(row, maxq)).collect();
        let deq = |codes: &[u8]| -> Vec<f32> {
            codes
                .chunks(d)
                .zip(&grids)
                .flat_map(|(c, g)| c.iter().map(move |&q| g.value(q)))
                .collect()
        };
        let l = relative_error(&w, &deq(&round_rows(&w, d, &grids, &fb, maxq)), &h, d);
        let n = relative_error(&w, &deq(&nearest_rows(&w, d, &grids, maxq)), &h, d);
        assert!(l < n, "LDLQ {l} vs nearest {n}");
    }
}
