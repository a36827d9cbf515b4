//! Attention of one query over a head's cached keys and values:
//! `out = softmax(q·Kᵀ·scale) V`, with `K`, `V` `(len, d)` row-major (the KV cache keeps each
//! head's positions contiguous, so both passes stream memory in order).
//!
//! Causality is the caller's: it passes only the positions the query may see.

use crate::dot::Isa;
use crate::ops::softmax;

/// `out (d) = softmax(q·Kᵀ·scale) V` over `len = keys.len() / d` positions; `scores` is scratch
/// of at least `len` values.
pub fn attend(
    isa: Isa,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    let len = keys.len() / d.max(1);
    let scores = &mut scores[..len];
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && d.is_multiple_of(8) {
        // SAFETY: a non-scalar `Isa` means AVX2 and FMA; lengths: `keys`/`values` hold `len`
        // rows of `d` (asserted inside), `d % 8 == 0`.
        unsafe {
            avx2::scores(q, keys, scale, scores);
            softmax(isa, scores);
            avx2::weighted_sum(scores, values, out);
        }
        return;
    }
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(d)) {
        *s = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
    }
    softmax(isa, scores);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (p, v) in scores.iter().zip(values.chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::dot::avx2::hsum;

    /// `scores[j] = (q · K[j]) · scale`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(q: &[f32], keys: &[f32], scale: f32, scores: &mut [f32]) {
        let d = q.len();
        assert!(keys.len() >= scores.len() * d);
        let (qp, kp) = (q.as_ptr(), keys.as_ptr());
        for (j, s) in scores.iter_mut().enumerate() {
            let k = kp.add(j * d);
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= d {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(k.add(i)), a0);
                a1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qp.add(i + 8)),
                    _mm256_loadu_ps(k.add(i + 8)),
                    a1,
                );
                i += 16;
            }
            if i < d {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(k.add(i)), a0);
            }
            *s = hsum(_mm256_add_ps(a0, a1)) * scale;
        }
    }

    /// `out = Σ_j p[j] · V[j]`, 32 columns per pass over the rows.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum(p: &[f32], values: &[f32], out: &mut [f32]) {
        let d = out.len();
        assert!(values.len() >= p.len() * d);
        let (vp, op) = (values.as_ptr(), out.as_mut_ptr());
        let mut c = 0;
        while c < d {
            let lanes = ((d - c) / 8).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            for (j, &w) in p.iter().enumerate() {
                let wv = _mm256_set1_ps(w);
                let row = vp.add(j * d + c);
                for (k, a) in acc.iter_mut().enumerate().take(lanes) {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * k)), *a);
                }
            }
            for (k, a) in acc.iter().enumerate().take(lanes) {
                _mm256_storeu_ps(op.add(c + 8 * k), *a);
            }
            c += 8 * lanes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_attention_matches_the_definition() {
        for &(d, len) in &[(64, 1), (64, 37), (40, 9), (8, 300), (6, 5)] {
            let q: Vec<f32> = (0..d).map(|i| ((i * 13 % 7) as f32 - 3.0) / 4.0).collect();
            let k: Vec<f32> = (0..len * d)
                .map(|i| ((i * 31 % 19) as f32 - 9.0) / 5.0)
                .collect();
            let v: Vec<f32> = (0..len * d)
                .map(|i| ((i * 17 % 23) as f32 - 11.0) / 6.0)
                .collect();
            let scale = 1.0 / (d as f32).sqrt();
            // Reference in f64.
            let s: Vec<f64> = (0..len)
                .map(|j| (0..d).map(|i| (q[i] * k[j * d + i]) as f64).sum::<f64>() * scale as f64)
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for isa in crate::dot::available() {
                let mut scratch = vec![0f32; len + 3];
                let mut out = vec![f32::NAN; d];
                attend(isa, &q, &k, &v, scale, &mut scratch, &mut out);
                for c in 0..d {
                    let want: f64 = (0..len).map(|j| e[j] / z * v[j * d + c] as f64).sum();
                    assert!(
                        (out[c] as f64 - want).abs() < 1e-5,
                        "{isa:?} d={d} len={len} col {c}: {} vs {want}",
                        out[c]
                    );
                }
            }
        }
    }
}
