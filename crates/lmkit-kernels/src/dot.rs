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
    //! AVX2 + FMA (+ AVX-VNNI where present): nibbles (or |w|) times signed activations summed
    //! into 32-bit lanes (`maddubs` + `madd`, or one `dpbusd`), scaled and accumulated in f32.
    //! `dot` runs one weight row against up to 8 activation rows (prompts); `dot_rows` runs up to
    //! 4 weight rows against one activation row (decoding), so 4 independent chains are in flight.
    use std::arch::x86_64::*;

    use super::*;

    /// f16 → f32 with the F16C instruction (inlined, unlike a library call per block).
    #[inline(always)]
    unsafe fn f16c(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Sum of the 8 lanes.
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// A weight block as 32 unsigned bytes for `maddubs`/`dpbusd`, the sign to move onto the
    /// activations (Q8_0 only), its scale, and the per-block offset term `m` (`w = d·q + m`).
    #[inline(always)]
    unsafe fn load_block(format: QFormat, blk: *const u8) -> (__m256i, __m256i, f32, f32) {
        let d = f16c(blk);
        match format {
            QFormat::Q4_0 | QFormat::Q4_1 => {
                let mask = _mm_set1_epi8(0x0F);
                let off = if format == QFormat::Q4_0 { 2 } else { 4 };
                let q = _mm_loadu_si128(blk.add(off) as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let m = if format == QFormat::Q4_1 {
                    f16c(blk.add(2))
                } else {
                    -8.0 * d
                };
                (_mm256_set_m128i(hi, lo), _mm256_set1_epi8(1), d, m)
            }
            QFormat::Q8_0 => {
                let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                (_mm256_sign_epi8(wv, wv), wv, d, 0.0)
            }
        }
    }

    macro_rules! kernels {
        ($dot:ident, $dot_rows:ident, $features:literal, |$w:ident, $a:ident| $mulsum:expr) => {
            /// # Safety
            /// The CPU must support the enabled features; every `a[k]` must hold at least
            /// `w.len() / block bytes` blocks.
            #[target_feature(enable = $features)]
            pub unsafe fn $dot<const N: usize>(
                format: QFormat,
                w: &[u8],
                a: [&[A8Block]; N],
            ) -> [f32; N] {
                let bb = format.block_bytes();
                let nb = w.len() / bb;
                let q8 = format == QFormat::Q8_0;
                let mut acc = [_mm256_setzero_ps(); N];
                let mut corr = [0f32; N];
                let wp = w.as_ptr();
                for i in 0..nb {
                    let ($w, sign, d, m) = load_block(format, wp.add(i * bb));
                    for k in 0..N {
                        let ab = a[k].get_unchecked(i);
                        let av = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                        // 4-bit weights are already unsigned; Q8_0 moves w's sign onto a.
                        let $a = if q8 { _mm256_sign_epi8(av, sign) } else { av };
                        let p = $mulsum;
                        acc[k] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_set1_ps(d * ab.d),
                            acc[k],
                        );
                        corr[k] += m * ab.s;
                    }
                }
                let mut out = [0f32; N];
                for k in 0..N {
                    out[k] = hsum(acc[k]) + corr[k];
                }
                out
            }

            /// # Safety
            /// As for the row-major kernel; every `w[r]` has the same length and `a` holds at
            /// least `w[r].len() / block bytes` blocks.
            #[target_feature(enable = $features)]
            pub unsafe fn $dot_rows<const R: usize>(
                format: QFormat,
                w: [&[u8]; R],
                a: &[A8Block],
            ) -> [f32; R] {
                let bb = format.block_bytes();
                let nb = w[0].len() / bb;
                let q8 = format == QFormat::Q8_0;
                let mut acc = [_mm256_setzero_ps(); R];
                let mut corr = [0f32; R];
                for i in 0..nb {
                    let ab = a.get_unchecked(i);
                    let av = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                    for r in 0..R {
                        let ($w, sign, d, m) = load_block(format, w[r].as_ptr().add(i * bb));
                        let $a = if q8 { _mm256_sign_epi8(av, sign) } else { av };
                        let p = $mulsum;
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_set1_ps(d * ab.d),
                            acc[r],
                        );
                        corr[r] += m * ab.s;
                    }
                }
                let mut out = [0f32; R];
                for r in 0..R {
                    out[r] = hsum(acc[r]) + corr[r];
                }
                out
            }
        };
    }

    kernels!(dot, dot_rows, "avx2,fma,f16c", |w, a| _mm256_madd_epi16(
        _mm256_maddubs_epi16(w, a),
        _mm256_set1_epi16(1)
    ));
    kernels!(dot_vnni, dot_rows_vnni, "avx2,fma,f16c,avxvnni", |w, a| {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, a)
    });
    kernels!(
        dot_512,
        dot_rows_512,
        "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni",
        |w, a| _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
    );
}

/// Which implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    /// AVX2 with AVX-VNNI's `vpdpbusd` for the integer dot products.
    Avx2Vnni,
    /// AVX-512 (F, VL, BW, VNNI): EVEX `vpdpbusd` and 32 vector registers.
    Avx512,
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// The best implementation this CPU supports. `LMKIT_FORCE_SCALAR=1` forces the reference;
/// `LMKIT_NO_AVX512=1` and `LMKIT_NO_VNNI=1` step down to the narrower paths.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        if env_flag("LMKIT_FORCE_SCALAR") {
            return Isa::Scalar;
        }
        let avail = available();
        let pick = |i: Isa| avail.contains(&i);
        if pick(Isa::Avx512) && !env_flag("LMKIT_NO_AVX512") && !env_flag("LMKIT_NO_VNNI") {
            Isa::Avx512
        } else if pick(Isa::Avx2Vnni) && !env_flag("LMKIT_NO_VNNI") {
            Isa::Avx2Vnni
        } else if pick(Isa::Avx2) {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    })
}

/// Every implementation this CPU can run, the scalar reference first (for tests and benches).
pub fn available() -> Vec<Isa> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut v = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            v.push(Isa::Avx2);
            if is_x86_feature_detected!("avxvnni") {
                v.push(Isa::Avx2Vnni);
            }
            if has_avx512() {
                v.push(Isa::Avx512);
            }
        }
    }
    v
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
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, plus AVX-VNNI.
        Isa::Avx2Vnni => unsafe { avx2::dot_vnni(format, w, a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, plus AVX-512 F/VL/BW/VNNI.
        Isa::Avx512 => unsafe { avx2::dot_512(format, w, a) },
        _ => scalar::dot(format, w, a),
    }
}

/// Up to four weight rows (equal lengths) against one activation row.
#[inline]
pub(crate) fn dot_rows<const R: usize>(
    isa: Isa,
    format: QFormat,
    w: [&[u8]; R],
    a: &[A8Block],
) -> [f32; R] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `dot`.
        Isa::Avx2 => unsafe { avx2::dot_rows(format, w, a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `dot`.
        Isa::Avx2Vnni => unsafe { avx2::dot_rows_vnni(format, w, a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `dot`.
        Isa::Avx512 => unsafe { avx2::dot_rows_512(format, w, a) },
        _ => {
            let mut out = [0f32; R];
            for (o, wr) in out.iter_mut().zip(w) {
                *o = scalar::dot(format, wr, [a])[0];
            }
            out
        }
    }
}
