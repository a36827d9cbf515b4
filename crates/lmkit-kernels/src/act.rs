//! Activation quantization to 8-bit blocks: `x ≈ d·q`, `d = max|x| / 127`, `q = round(x / d)`.

use crate::BLOCK;

/// One block of 32 quantized activations with its scale and the integer sum of its values.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(8))]
pub struct A8Block {
    pub d: f32,
    /// `d · Σ q` over the block (the block's sum, for formats with an offset).
    pub s: f32,
    pub qs: [i8; BLOCK],
}

impl Default for A8Block {
    fn default() -> Self {
        Self {
            d: 0.0,
            s: 0.0,
            qs: [0; BLOCK],
        }
    }
}

/// Quantizes `x` (length a multiple of 32) into `out` (cleared first), in parallel for long
/// inputs.
pub fn quantize_activations(x: &[f32], out: &mut Vec<A8Block>) {
    const PAR_MIN: usize = 1 << 14;
    if x.len() >= PAR_MIN {
        use rayon::prelude::*;
        out.clear();
        out.resize(x.len() / BLOCK, A8Block::default());
        out.par_chunks_mut(PAR_MIN / BLOCK)
            .zip(x.par_chunks(PAR_MIN))
            .for_each(|(o, xs)| quantize_serial(xs, o));
        return;
    }
    out.clear();
    out.resize(x.len() / BLOCK, A8Block::default());
    quantize_serial(x, out);
}

/// Quantizes `x` into `out` (`x.len() / 32` blocks) on the calling thread.
pub fn quantize_into(x: &[f32], out: &mut [A8Block]) {
    quantize_serial(x, out)
}

fn quantize_serial(x: &[f32], out: &mut [A8Block]) {
    quantize_with(crate::dot::isa(), x, out)
}

/// [`quantize_into`] with an explicit implementation; every implementation gives the same bits
/// (the same IEEE operations in the same order per value).
pub fn quantize_with(isa: crate::dot::Isa, x: &[f32], out: &mut [A8Block]) {
    #[cfg(target_arch = "x86_64")]
    if isa != crate::dot::Isa::Scalar {
        for (chunk, slot) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
            // SAFETY: non-scalar ISAs have AVX2; `chunk` holds 32 values.
            *slot = unsafe { avx2::quantize_block(chunk) };
        }
        return;
    }
    let _ = isa;
    quantize_scalar(x, out)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// AVX2; `x` holds 32 values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_block(x: &[f32]) -> A8Block {
        let p = x.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let (idv, lo, hi, half) = (
            _mm256_set1_ps(id),
            _mm256_set1_ps(-127.0),
            _mm256_set1_ps(127.0),
            _mm256_set1_ps(0.5),
        );
        let mut q = [_mm256_setzero_si256(); 4];
        for (qi, x) in q.iter_mut().zip(v.iter()) {
            let y = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(*x, idv), lo), hi);
            // Round half away from zero: y + copysign(0.5, y), truncated.
            let r = _mm256_add_ps(y, _mm256_or_ps(half, _mm256_and_ps(y, sign)));
            *qi = _mm256_cvttps_epi32(r);
        }
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let s4 = _mm_hadd_epi32(s4, s4);
        let s4 = _mm_hadd_epi32(s4, s4);
        let isum = _mm_cvtsi128_si32(s4);
        // i32 → i16 → i8 (saturating, values are within ±127), then undo the lane interleave.
        let ab = _mm256_packs_epi32(q[0], q[1]);
        let cd = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_packs_epi16(ab, cd);
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut b = A8Block {
            d,
            s: d * isum as f32,
            qs: [0; BLOCK],
        };
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, bytes);
        b
    }
}

fn quantize_scalar(x: &[f32], out: &mut [A8Block]) {
    for (chunk, slot) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut b = A8Block {
            d,
            ..Default::default()
        };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(chunk) {
            // Round half away from zero (as C's `roundf`) without a libm call: truncating
            // `x ± 0.5` towards zero.
            let x = (v * id).clamp(-127.0, 127.0);
            let r = (x + 0.5f32.copysign(x)) as i8;
            *q = r;
            sum += r as i32;
        }
        b.s = d * sum as f32;
        *slot = b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_quantization_is_bit_identical_to_scalar() {
        let x: Vec<f32> = (0..32 * 50)
            .map(|i| {
                let v = ((i * 7919 % 2003) as f32 - 1001.0) / 97.0;
                match i % 211 {
                    0 => v * 300.0,          // outliers
                    1 => 0.0,                // zeros
                    _ if i / 32 == 7 => 0.0, // an all-zero block
                    _ => v,
                }
            })
            .collect();
        let mut want = vec![A8Block::default(); 50];
        quantize_with(crate::dot::Isa::Scalar, &x, &mut want);
        assert_eq!(want[7].d, 0.0);
        for isa in crate::dot::available() {
            let mut got = vec![A8Block::default(); 50];
            quantize_with(isa, &x, &mut got);
            assert_eq!(got, want, "{isa:?}");
        }
        // Exact halves round away from zero, as C's roundf: 63.5 → 64, −63.5 → −64.
        let mut h = vec![0f32; 32];
        h[0] = 127.0;
        h[1] = 63.5;
        h[2] = -63.5;
        for isa in crate::dot::available() {
            let mut b = [A8Block::default()];
            quantize_with(isa, &h, &mut b);
            assert_eq!(&b[0].qs[..3], &[127, 64, -64], "{isa:?}");
        }
    }
}
