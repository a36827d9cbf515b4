//! Element-wise and row operations of a transformer forward pass on plain f32 slices: RMSNorm,
//! RoPE (rotate-half layout), softmax, SiLU-gating, with an AVX2 `exp` for the last two.
//!
//! Each op has a scalar reference (`f32::exp` from the standard library); the SIMD `exp` is a
//! Cephes-style polynomial, within a few ulp of it (tested).

use crate::dot::Isa;

/// `out = x / sqrt(mean(x²) + eps) ⊙ w`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    // Eight partial sums (vectorizes; the order is fixed, so results are reproducible).
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let sum: f32 = acc.iter().sum::<f32>() + tail;
    let scale = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// Rotates one head `x (d)` in place by RoPE with the position's `cos`/`sin` tables `(d/2)`,
/// rotate-half layout (HF): `(x₁, x₂) → (x₁ cos − x₂ sin, x₁ sin + x₂ cos)` with `x₁ = x[..d/2]`.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x1 * sin[i] + x2 * cos[i];
    }
}

/// Softmax of `x` in place.
pub fn softmax(isa: Isa, x: &mut [f32]) {
    let inv = 1.0 / softmax_unnormalized(isa, x);
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Cross-entropy of one row of logits `z` against `target`, with its gradient in place:
/// returns `nll = logsumexp(z) − z[target]` and leaves `z ← coef · (softmax(z) − onehot(target))`,
/// the gradient of `coef · nll` with respect to `z`.
///
/// # Panics
/// If `target ≥ z.len()` (callers check their targets).
pub fn cross_entropy_row(isa: Isa, z: &mut [f32], target: usize, coef: f32) -> f32 {
    let picked = z[target];
    let max = row_max(z);
    let sum = exp_shifted(isa, z, max);
    let nll = max + sum.ln() - picked;
    let scale = coef / sum;
    z.iter_mut().for_each(|v| *v *= scale);
    z[target] -= coef;
    nll
}

/// The largest entry of `x` (−∞ for an empty row).
fn row_max(x: &[f32]) -> f32 {
    // Eight running maxima (vectorizes; max is exact, so the order does not matter).
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    for c in chunks {
        for (a, &v) in m.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    m.iter().fold(tail, |a, &v| if v > a { v } else { a })
}

/// `x ← exp(x − max x)`; returns the sum (divide by it to finish a softmax).
pub fn softmax_unnormalized(isa: Isa, x: &mut [f32]) -> f32 {
    let max = row_max(x);
    exp_shifted(isa, x, max)
}

/// As [`softmax_unnormalized`] with the entries in `skip` masked out: they become 0 and take
/// no part in the maximum or the sum (a query that must not see those positions).
pub fn softmax_unnormalized_skipping(isa: Isa, x: &mut [f32], skip: std::ops::Range<usize>) -> f32 {
    let lo = skip.start.min(x.len());
    let hi = skip.end.clamp(lo, x.len());
    if lo == hi {
        return softmax_unnormalized(isa, x);
    }
    let (head, rest) = x.split_at_mut(lo);
    let (masked, tail) = rest.split_at_mut(hi - lo);
    let max = row_max(head).max(row_max(tail));
    masked.iter_mut().for_each(|v| *v = 0.0);
    exp_shifted(isa, head, max) + exp_shifted(isa, tail, max)
}

/// `x ← exp(x − shift)`; returns the sum.
fn exp_shifted(isa: Isa, x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        // SAFETY: a non-scalar `Isa` is only selected when the CPU has AVX2 and FMA.
        return unsafe { avx2::exp_shifted(x, shift) };
    }
    let _ = isa;
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}

/// `g ← silu(g) ⊙ u`, `silu(g) = g / (1 + e^(−g))`.
pub fn silu_mul(isa: Isa, g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        // SAFETY: as for `exp_shifted`.
        unsafe { avx2::silu_mul(g, u) };
        return;
    }
    let _ = isa;
    for (a, b) in g.iter_mut().zip(u) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// e^x for 8 lanes (Cephes `expf`: x = n·ln2 + r, degree-6 polynomial for e^r, 2^n in the
    /// exponent bits). Inputs are clamped to [−87.3, 88.7]; below that the result is ~1e-38, not 0.
    #[inline(always)]
    pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.7),
        );
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }

    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let v = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), s));
            _mm256_storeu_ps(p.add(i), v);
            acc = _mm256_add_ps(acc, v);
            i += 8;
        }
        let mut sum = crate::dot::avx2::hsum(acc);
        for v in &mut x[i..] {
            *v = (*v - shift).exp();
            sum += *v;
        }
        sum
    }

    /// # Safety
    /// AVX2 and FMA; `u.len() ≥ g.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        let n = g.len().min(u.len());
        let (gp, up) = (g.as_mut_ptr(), u.as_ptr());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_loadu_ps(gp.add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(gp.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.add(i))));
            i += 8;
        }
        for j in i..n {
            g[j] = g[j] / (1.0 + (-g[j]).exp()) * u[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SIMD `exp` against the standard library's, relative.
    const EXP_REL_TOL: f32 = 4e-7;

    #[test]
    fn cross_entropy_row_matches_its_definition() {
        let z: Vec<f32> = (0..101)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.9)
            .collect();
        let lse = z.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
        for isa in crate::dot::available() {
            let mut g = z.clone();
            let nll = cross_entropy_row(isa, &mut g, 7, 0.5);
            assert!(
                (nll as f64 - (lse - z[7] as f64)).abs() < 1e-5,
                "{isa:?} {nll}"
            );
            for (j, (got, v)) in g.iter().zip(&z).enumerate() {
                let p = ((*v as f64) - lse).exp();
                let want = 0.5 * (p - if j == 7 { 1.0 } else { 0.0 });
                assert!(
                    (*got as f64 - want).abs() < 1e-6,
                    "{isa:?} {j}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn simd_exp_softmax_and_silu_match_scalar() {
        let xs: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.37).collect();
        for isa in crate::dot::available() {
            let mut a = xs.clone();
            let sum = exp_shifted(isa, &mut a, 1.5);
            let mut want = 0.0;
            for (got, x) in a.iter().zip(&xs) {
                let e = (x - 1.5).exp();
                want += e;
                assert!(
                    (got - e).abs() <= EXP_REL_TOL * e,
                    "{isa:?} exp({x}) {got} vs {e}"
                );
            }
            assert!((sum - want).abs() <= 1e-5 * want);

            let mut s = xs.clone();
            softmax(isa, &mut s);
            assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            let mut g = xs.clone();
            let u: Vec<f32> = xs.iter().map(|v| v * 0.5 + 1.0).collect();
            silu_mul(isa, &mut g, &u);
            for ((got, x), u) in g.iter().zip(&xs).zip(&u) {
                let want = x / (1.0 + (-x).exp()) * u;
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn rmsnorm_and_rope_by_definition() {
        let x: Vec<f32> = (0..70).map(|i| (i as f32 - 30.0) / 7.0).collect();
        let w: Vec<f32> = (0..70).map(|i| 1.0 + i as f32 / 100.0).collect();
        let mut y = vec![0f32; 70];
        rmsnorm(&x, &w, 1e-5, &mut y);
        let ms: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 70.0;
        for i in 0..70 {
            let want = x[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
            assert!((y[i] as f64 - want).abs() < 1e-5, "{} vs {want}", y[i]);
        }
        // A rotation keeps each pair's norm; angle 0 is the identity.
        let mut h: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect();
        let orig = h.clone();
        rope(&mut h, &[1.0; 4], &[0.0; 4]);
        assert_eq!(h, orig);
        let (c, s) = (0.3f32.cos(), 0.3f32.sin());
        rope(&mut h, &[c; 4], &[s; 4]);
        for i in 0..4 {
            let (a, b) = (orig[i], orig[i + 4]);
            assert!((h[i] - (a * c - b * s)).abs() < 1e-6);
            assert!((h[i].powi(2) + h[i + 4].powi(2) - a * a - b * b).abs() < 1e-4);
        }
    }
}
