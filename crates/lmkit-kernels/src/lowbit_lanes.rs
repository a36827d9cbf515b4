//! [`LowBit`] codes with eight rows interleaved for the SIMD kernels (the layout of
//! [`crate::packed`], for 2/3/4-bit codes): one 32-byte register holds four codes of each of
//! eight rows, so every integer dot product, scale and offset is computed for eight outputs at
//! once and each unpacked register serves several tokens.
//!
//! For row group `G` (rows `8G..8G+8`, the last padded with zero codes) and block `b`, a group
//! block has `8 × block_bytes` bytes. Byte `k` of a 32-byte vector belongs to row `k/4` and
//! position `j = k%4` within a 4-code chunk; chunk `c` holds codes `4c..4c+4` of the block:
//!
//! | bytes | content |
//! |---|---|
//! | 0..64 | low 2 bits: vector `c/4`, bits `2(c%4)..2(c%4)+2` |
//! | 64..96 | `LB3`: bit 2, bit `c` of the byte |
//! | 64..128 | `LB4`: bits 2–3, as the low bits |
//!
//! Scales per (row group, column group): eight `a` then eight `b`.

use crate::lowbit::{block_bytes, unpack_block, LowBit};
use crate::BLOCK;

/// Rows interleaved per group.
pub const GROUP: usize = crate::groups::GROUP;

/// The interleaved codes of `w` (see the module doc).
pub(crate) fn interleave(w: &LowBit) -> Vec<u8> {
    let nb = w.cols / BLOCK;
    let bb = block_bytes(w.bits);
    let gb = GROUP * bb;
    let mut out = vec![0u8; w.rows.div_ceil(GROUP) * nb * gb];
    let mut q = [0u8; BLOCK];
    for r in 0..w.rows {
        for b in 0..nb {
            let src = (r * nb + b) * bb;
            unpack_block(w.bits, &w.codes[src..src + bb], &mut q);
            let base = ((r / GROUP) * nb + b) * gb;
            for (i, &code) in q.iter().enumerate() {
                let (c, j) = (i / 4, i % 4);
                let k = (r % GROUP) * 4 + j;
                let (h, s) = (c / 4, c % 4);
                out[base + h * 32 + k] |= (code & 3) << (2 * s);
                match w.bits {
                    3 => out[base + 64 + k] |= ((code >> 2) & 1) << c,
                    4 => out[base + 64 + h * 32 + k] |= ((code >> 2) & 3) << (2 * s),
                    _ => {}
                }
            }
        }
    }
    out
}

/// Scales per (row group, column group): `[a; 8]` then `[b; 8]` (zero for padding rows).
pub(crate) fn lane_scales(w: &LowBit) -> Vec<f32> {
    let g = w.groups();
    let groups = w.rows.div_ceil(GROUP);
    let mut out = vec![0f32; groups * g * 2 * GROUP];
    for r in 0..w.rows {
        for gi in 0..g {
            let base = ((r / GROUP) * g + gi) * 2 * GROUP;
            let [a, b] = w.scales[r * g + gi];
            out[base + r % GROUP] = a;
            out[base + GROUP + r % GROUP] = b;
        }
    }
    out
}

/// The SIMD group kernel for one matrix (non-scalar `Isa`s only).
#[cfg(target_arch = "x86_64")]
pub(crate) struct Kernel<'a>(pub crate::dot::Isa, pub &'a LowBit);

#[cfg(target_arch = "x86_64")]
impl crate::groups::GroupKernel for Kernel<'_> {
    fn group<const N: usize>(
        &self,
        g: usize,
        t0: usize,
        acts: [&[crate::act::A8Block]; N],
    ) -> [[f32; GROUP]; N] {
        avx2::group(self.0, self.1, g, t0 == 0, acts)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::GROUP;
    use crate::act::A8Block;
    use crate::dot::Isa;
    use crate::lowbit::{block_bytes, LowBit};
    use crate::packed::avx2::bcast;
    use crate::BLOCK;

    macro_rules! group_kernel {
        ($name:ident, $features:literal, |$acc:ident, $u:ident, $s:ident| $dp:expr) => {
            /// Row group `g` against `N` activation rows: `[token][row]`. With `prefetch`,
            /// the next group's bytes are requested as this one's are read (as in
            /// `packed`: the first token tile of a call).
            ///
            /// # Safety
            /// The CPU supports the features; `g` is a valid group; each `acts[k]` holds
            /// `cols / 32` blocks.
            #[target_feature(enable = $features)]
            unsafe fn $name<const BITS: u8, const N: usize>(
                w: &LowBit,
                g: usize,
                prefetch: bool,
                acts: [&[A8Block]; N],
            ) -> [[f32; GROUP]; N] {
                let nb = w.cols / BLOCK;
                let gb = GROUP * block_bytes(BITS);
                let base = w.lanes.as_ptr().add(g * nb * gb);
                let (bpg, ng) = (w.group / BLOCK, w.groups());
                let m3 = _mm256_set1_epi8(3);
                let m1 = _mm256_set1_epi8(1);
                let mut y = [_mm256_setzero_ps(); N];
                for gi in 0..ng {
                    let mut facc = [_mm256_setzero_ps(); N];
                    let mut xs = [0f32; N];
                    for b in gi * bpg..(gi + 1) * bpg {
                        let blk = base.add(b * gb);
                        let mut off = 0;
                        while prefetch && off < gb {
                            let at = base.wrapping_add(nb * gb + b * gb + off);
                            _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
                            off += 64;
                        }
                        let lo = [
                            _mm256_loadu_si256(blk as *const __m256i),
                            _mm256_loadu_si256(blk.add(32) as *const __m256i),
                        ];
                        let hi = if BITS == 4 {
                            [
                                _mm256_loadu_si256(blk.add(64) as *const __m256i),
                                _mm256_loadu_si256(blk.add(96) as *const __m256i),
                            ]
                        } else if BITS == 3 {
                            let h = _mm256_loadu_si256(blk.add(64) as *const __m256i);
                            [h, h]
                        } else {
                            [_mm256_setzero_si256(); 2]
                        };
                        let mut iacc = [_mm256_setzero_si256(); N];
                        for c in 0..8 {
                            let sh = _mm_cvtsi32_si128(2 * (c as i32 % 4));
                            let mut u = _mm256_and_si256(_mm256_srl_epi16(lo[c / 4], sh), m3);
                            if BITS == 3 {
                                let bit = _mm256_srl_epi16(hi[0], _mm_cvtsi32_si128(c as i32));
                                u = _mm256_or_si256(
                                    u,
                                    _mm256_slli_epi16(_mm256_and_si256(bit, m1), 2),
                                );
                            } else if BITS == 4 {
                                let h2 = _mm256_and_si256(_mm256_srl_epi16(hi[c / 4], sh), m3);
                                u = _mm256_or_si256(u, _mm256_slli_epi16(h2, 2));
                            }
                            for k in 0..N {
                                let ($acc, $u, $s) = (iacc[k], u, bcast(&acts[k][b], 4 * c));
                                iacc[k] = $dp;
                            }
                        }
                        for k in 0..N {
                            let a = &acts[k][b];
                            facc[k] = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(iacc[k]),
                                _mm256_set1_ps(a.d),
                                facc[k],
                            );
                            xs[k] += a.s;
                        }
                    }
                    let sc = w.lane_scales.as_ptr().add((g * ng + gi) * 2 * GROUP);
                    let (av, bv) = (_mm256_loadu_ps(sc), _mm256_loadu_ps(sc.add(GROUP)));
                    for k in 0..N {
                        let t = _mm256_fmadd_ps(bv, _mm256_set1_ps(xs[k]), y[k]);
                        y[k] = _mm256_fmadd_ps(av, facc[k], t);
                    }
                }
                let mut out = [[0f32; GROUP]; N];
                for (o, f) in out.iter_mut().zip(y.iter()) {
                    _mm256_storeu_ps(o.as_mut_ptr(), *f);
                }
                out
            }
        };
    }

    group_kernel!(plain, "avx2,fma", |acc, u, s| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    ));
    group_kernel!(vnni, "avx2,fma,avxvnni", |acc, u, s| {
        _mm256_dpbusd_avx_epi32(acc, u, s)
    });
    group_kernel!(
        vnni512,
        "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni",
        |acc, u, s| _mm256_dpbusd_epi32(acc, u, s)
    );

    /// Dispatches on bit width and implementation.
    #[inline]
    pub(crate) fn group<const N: usize>(
        isa: Isa,
        w: &LowBit,
        g: usize,
        prefetch: bool,
        acts: [&[A8Block]; N],
    ) -> [[f32; GROUP]; N] {
        macro_rules! by_bits {
            ($k:ident) => {
                // SAFETY: `isa` is only non-scalar when the CPU reports the kernel's features
                // (see `dot::isa`); `lowbit_rows` checked the group and activation lengths.
                unsafe {
                    match w.bits {
                        2 => $k::<2, N>(w, g, prefetch, acts),
                        3 => $k::<3, N>(w, g, prefetch, acts),
                        _ => $k::<4, N>(w, g, prefetch, acts),
                    }
                }
            };
        }
        match isa {
            Isa::Avx512 => by_bits!(vnni512),
            Isa::Avx2Vnni => by_bits!(vnni),
            _ => by_bits!(plain),
        }
    }
}
