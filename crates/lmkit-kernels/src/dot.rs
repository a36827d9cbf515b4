//! Block dot products of one quantized weight row with up to four quantized activation rows.
//!
//! `dot::<N>(format, w, a)` returns `[w · a[0], …, w · a[N−1]]`; processing several activation
//! rows per weight row decodes each weight block once (prompt processing, batched decoding).
//! Scalar references live in [`scalar`]; [`avx2`] holds the x86-64 versions.

use half::f16;

use crate::act::A8Block;
use crate::matmul::QFormat;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scalar reference kernels: the integer sum of each block is exact; scales are applied per
/// block in f32.
pub mod scalar {
    use super::*;

    pub fn dot<const N: usize>(format: QFormat, w: &[u8], a: [&[A8Block]; N]) -> [f32; N] {
        let bb = format.block_bytes();
        let mut out = [0f32; N];
        for (i, blk) in w.chunks_exact(bb).enumerate() {
            let d = f16_at(blk, 0);
            for k in 0..N {
                let ab = &a[k][i];
                let (isum, corr) = match format {
                    QFormat::Q4_0 | QFormat::Q4_1 => {
                        let qs = if format == QFormat::Q4_0 {
                            &blk[2..18]
                        } else {
                            &blk[4..20]
                        };
                        let mut s = 0i32;
                        for (j, &q) in qs.iter().enumerate() {
                            s += (q & 0x0F) as i32 * ab.qs[j] as i32;
                            s += (q >> 4) as i32 * ab.qs[j + 16] as i32;
                        }
                        let corr = if format == QFormat::Q4_0 {
                            -8.0 * d * ab.s
                        } else {
                            f16_at(blk, 2) * ab.s
                        };
                        (s, corr)
                    }
                    QFormat::Q8_0 => {
                        let mut s = 0i32;
                        for j in 0..32 {
                            s += (blk[2 + j] as i8) as i32 * ab.qs[j] as i32;
                        }
                        (s, 0.0)
                    }
                };
                out[k] += d * ab.d * isum as f32 + corr;
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    //! AVX2 + FMA: nibbles (or |w|) times signed activations with `maddubs`, pairs summed with
    //! `madd`, scaled and accumulated in f32 lanes.
    use std::arch::x86_64::*;

    use super::*;

    /// f16 → f32 with the F16C instruction (inlined, unlike a library call per block).
    #[inline(always)]
    unsafe fn f16c(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; every `a[k]` must hold at least `w.len() / block
    /// bytes` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<const N: usize>(format: QFormat, w: &[u8], a: [&[A8Block]; N]) -> [f32; N] {
        let bb = format.block_bytes();
        let nb = w.len() / bb;
        let mask = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut corr = [0f32; N];
        let wp = w.as_ptr();
        for i in 0..nb {
            let blk = wp.add(i * bb);
            let d = f16c(blk);
            match format {
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    let off = if format == QFormat::Q4_0 { 2 } else { 4 };
                    let q = _mm_loadu_si128(blk.add(off) as *const __m128i);
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                    let wv = _mm256_set_m128i(hi, lo);
                    let m = if format == QFormat::Q4_1 {
                        f16c(blk.add(2))
                    } else {
                        -8.0 * d
                    };
                    for k in 0..N {
                        let ab = a[k].get_unchecked(i);
                        let av = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av), ones);
                        acc[k] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_set1_ps(d * ab.d),
                            acc[k],
                        );
                        corr[k] += m * ab.s;
                    }
                }
                QFormat::Q8_0 => {
                    let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    let aw = _mm256_sign_epi8(wv, wv);
                    for k in 0..N {
                        let ab = a[k].get_unchecked(i);
                        let av = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                        let sa = _mm256_sign_epi8(av, wv);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), ones);
                        acc[k] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_set1_ps(d * ab.d),
                            acc[k],
                        );
                    }
                }
            }
        }
        let mut out = [0f32; N];
        for k in 0..N {
            out[k] = hsum(acc[k]) + corr[k];
        }
        out
    }
}

/// Which implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
}

/// The best implementation this CPU supports (`LMKIT_FORCE_SCALAR=1` forces the reference).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("LMKIT_FORCE_SCALAR").is_ok_and(|v| !v.is_empty() && v != "0") {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

/// Dispatches to the best kernel. Callers guarantee `a[k].len() ≥ w.len() / block bytes`.
#[inline]
pub(crate) fn dot<const N: usize>(
    isa: Isa,
    format: QFormat,
    w: &[u8],
    a: [&[A8Block]; N],
) -> [f32; N] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2` is only selected when the CPU reports AVX2, FMA and F16C; lengths are
        // checked by `matmul`.
        Isa::Avx2 => unsafe { avx2::dot(format, w, a) },
        _ => scalar::dot(format, w, a),
    }
}
