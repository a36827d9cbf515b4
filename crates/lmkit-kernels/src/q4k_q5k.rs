//! GGUF `Q4_K` and `Q5_K` weights kept exact, with eight rows interleaved for the SIMD kernel
//! (the layout of [`crate::packed`] for 256-weight super-blocks, as [`crate::q6k`]). Both are
//! affine: a scale and a min per 32 weights.
//!
//! A GGUF `Q4_K` super-block holds 256 weights in 144 bytes: `d: f16`, `dmin: f16`,
//! `scales: [u8; 12]` (a 6-bit scale `sc_j` and min `m_j` for each 32-weight sub-block `j`,
//! packed as in ggml's `get_scale_min_k4`) and `qs: [u8; 128]` (bytes `32k..32k+32` hold
//! sub-block `2k` in their low nibbles and `2k+1` in their high ones), and
//! `w = (d·sc_j)·q − dmin·m_j`, `q ∈ 0..16`. `Q5_K` (176 bytes) puts `qh: [u8; 32]` between
//! `scales` and `qs`: bit `j` of `qh[l]` is the fifth bit of weight `l` of sub-block `j`, and
//! `q ∈ 0..32`.
//!
//! Interleaved layout: rows in groups of [`GROUP`] = 8 (the last padded with zero rows); per
//! group and super-block, `32 + 8 × group block` bytes (the scales unpacked to a byte each:
//! 4.625 and 5.625 bits per weight against the files' 4.5 and 5.5):
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | the 8 rows' `d`, f16 |
//! | 16..32 | the 8 rows' `dmin`, f16 |
//! | then 8 × 144 (`Q4_K`) or 8 × 176 (`Q5_K`) | one *group block* per 32 weights |
//!
//! A group block: bytes 0..8 the rows' `sc_j`, 8..16 their `m_j`, then four vectors of low bits
//! (vector `c`, byte `4·row + i`: weight `4c + i` in the low nibble, `16 + 4c + i` in the high
//! one, as in `Q4_0`); `Q5_K` adds one vector of fifth bits (byte `4·row + i`, bit `4v + c`:
//! weight `16v + 4c + i`).
//!
//! Per 32-weight block and token, with the activations quantized to 8 bits (`x ≈ d_a·a`,
//! `s_a = d_a·Σ a`): `y[row] += d[row]·d_a·sc_j[row]·Σ q·a − dmin[row]·m_j[row]·s_a`, the
//! integer sum exact.

use std::ops::Range;

use half::f16;

use crate::act::A8Block;
use crate::dot::Isa;
use crate::groups::GROUP;
use crate::{Error, Result, BLOCK};

/// Weights per super-block.
pub const SUPER: usize = 256;

/// A `Q4_K` (`BITS` = 4) or `Q5_K` (5) `(rows, cols)` matrix in the interleaved layout.
#[derive(Debug, Clone)]
pub struct AffineK<const BITS: u8> {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// GGUF `Q4_K`.
pub type Q4K = AffineK<4>;
/// GGUF `Q5_K`.
pub type Q5K = AffineK<5>;

/// GGUF bytes per super-block.
pub const fn super_bytes(bits: u8) -> usize {
    if bits == 5 {
        176
    } else {
        144
    }
}

/// Bytes per group block (32 weights of 8 rows, without the `d`s and `dmin`s).
const fn group_block(bits: u8) -> usize {
    if bits == 5 {
        176
    } else {
        144
    }
}

/// Bytes per group super-block.
const fn group_super(bits: u8) -> usize {
    32 + 8 * group_block(bits)
}

/// One row's super-block: `d`, `dmin` (f16 bits), the sub-blocks' scales and mins, the codes.
struct Super {
    d: [u8; 2],
    dmin: [u8; 2],
    sc: [u8; 8],
    m: [u8; 8],
    q: [u8; SUPER],
}

impl Super {
    /// From GGUF bytes of `bits`-bit codes.
    fn read(bits: u8, src: &[u8]) -> Self {
        let s = &src[4..16];
        let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
        for j in 0..8 {
            (sc[j], m[j]) = if j < 4 {
                (s[j] & 63, s[j + 4] & 63)
            } else {
                (
                    (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
                    (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
                )
            };
        }
        let qs = if bits == 5 { 48 } else { 16 };
        let mut q = [0u8; SUPER];
        for (i, v) in q.iter_mut().enumerate() {
            let (j, l) = (i / 32, i % 32);
            *v = (src[qs + 32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F;
            if bits == 5 {
                *v |= ((src[16 + l] >> j) & 1) << 4;
            }
        }
        Self {
            d: [src[0], src[1]],
            dmin: [src[2], src[3]],
            sc,
            m,
            q,
        }
    }

    /// As GGUF bytes (the inverse of [`Super::read`]: every bit of the scales is used).
    fn write(&self, bits: u8, dst: &mut [u8]) {
        dst[..2].copy_from_slice(&self.d);
        dst[2..4].copy_from_slice(&self.dmin);
        let s = &mut dst[4..16];
        for j in 0..4 {
            s[j] = self.sc[j] | (self.sc[j + 4] >> 4) << 6;
            s[j + 4] = self.m[j] | (self.m[j + 4] >> 4) << 6;
            s[j + 8] = (self.sc[j + 4] & 0x0F) | (self.m[j + 4] & 0x0F) << 4;
        }
        dst[16..].fill(0);
        let qs = if bits == 5 { 48 } else { 16 };
        for (i, &v) in self.q.iter().enumerate() {
            let (j, l) = (i / 32, i % 32);
            dst[qs + 32 * (j / 2) + l] |= (v & 0x0F) << (4 * (j % 2));
            if bits == 5 {
                dst[16 + l] |= (v >> 4) << j;
            }
        }
    }
}

/// Where weight `w < 32` of a group block sits for lane `lane`: (low-bits byte, its shift,
/// fifth-bit byte, its bit).
fn code_at(lane: usize, w: usize) -> (usize, u8, usize, u8) {
    let (v, c, i) = (w / 16, w % 16 / 4, w % 4);
    let k = 4 * lane + i;
    (16 + 32 * c + k, 4 * v as u8, 144 + k, (4 * v + c) as u8)
}

impl<const BITS: u8> AffineK<BITS> {
    const SUPER_BYTES: usize = super_bytes(BITS);
    const GROUP_BLOCK: usize = group_block(BITS);
    const GROUP_SUPER: usize = group_super(BITS);

    /// The GGUF type name.
    pub fn type_name(&self) -> &'static str {
        if BITS == 5 {
            "Q5_K"
        } else {
            "Q4_K"
        }
    }

    /// Repacks GGUF row-major super-blocks (`rows × cols/256` of them).
    pub fn pack(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let ns = cols / SUPER;
        let sb = Self::SUPER_BYTES;
        if !cols.is_multiple_of(SUPER) || bytes.len() != rows * ns * sb {
            return Err(Error::Shape {
                op: "pack K-quant",
                why: format!(
                    "{} bytes for a {rows}x{cols} Q{BITS}_K matrix (cols must be a multiple of \
                     {SUPER}, {sb} bytes per {SUPER} weights)",
                    bytes.len()
                ),
            });
        }
        let (gs, gb) = (Self::GROUP_SUPER, Self::GROUP_BLOCK);
        let mut data = vec![0u8; rows.div_ceil(GROUP) * ns * gs];
        for r in 0..rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            for s in 0..ns {
                let at = (r * ns + s) * sb;
                let sup = Super::read(BITS, &bytes[at..at + sb]);
                let dst = &mut data[(g * ns + s) * gs..(g * ns + s + 1) * gs];
                dst[2 * lane..2 * lane + 2].copy_from_slice(&sup.d);
                dst[16 + 2 * lane..16 + 2 * lane + 2].copy_from_slice(&sup.dmin);
                for j in 0..SUPER / BLOCK {
                    let blk = &mut dst[32 + j * gb..32 + (j + 1) * gb];
                    blk[lane] = sup.sc[j];
                    blk[8 + lane] = sup.m[j];
                    for w in 0..BLOCK {
                        let q = sup.q[BLOCK * j + w];
                        let (lo, shift, hi, bit) = code_at(lane, w);
                        blk[lo] |= (q & 0x0F) << shift;
                        if BITS == 5 {
                            blk[hi] |= (q >> 4) << bit;
                        }
                    }
                }
            }
        }
        Ok(Self { rows, cols, data })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (including padding rows).
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// Row `r`'s super-block `s`.
    fn row_super(&self, r: usize, s: usize) -> Super {
        let ns = self.cols / SUPER;
        let (g, lane) = (r / GROUP, r % GROUP);
        let (gs, gb) = (Self::GROUP_SUPER, Self::GROUP_BLOCK);
        let src = &self.data[(g * ns + s) * gs..(g * ns + s + 1) * gs];
        let mut sup = Super {
            d: [src[2 * lane], src[2 * lane + 1]],
            dmin: [src[16 + 2 * lane], src[17 + 2 * lane]],
            sc: [0; 8],
            m: [0; 8],
            q: [0; SUPER],
        };
        for j in 0..SUPER / BLOCK {
            let blk = &src[32 + j * gb..32 + (j + 1) * gb];
            sup.sc[j] = blk[lane];
            sup.m[j] = blk[8 + lane];
            for w in 0..BLOCK {
                let (lo, shift, hi, bit) = code_at(lane, w);
                let mut q = (blk[lo] >> shift) & 0x0F;
                if BITS == 5 {
                    q |= ((blk[hi] >> bit) & 1) << 4;
                }
                sup.q[BLOCK * j + w] = q;
            }
        }
        sup
    }

    /// Row `r`'s GGUF bytes, super-block after super-block.
    pub fn row_bytes(&self, r: usize) -> Vec<u8> {
        let ns = self.cols / SUPER;
        let mut out = vec![0u8; ns * Self::SUPER_BYTES];
        for (s, dst) in out.chunks_exact_mut(Self::SUPER_BYTES).enumerate() {
            self.row_super(r, s).write(BITS, dst);
        }
        out
    }

    /// The GGUF row-major bytes (the inverse of [`AffineK::pack`]).
    pub fn unpack(&self) -> Vec<u8> {
        (0..self.rows).flat_map(|r| self.row_bytes(r)).collect()
    }

    /// Row `r` dequantized into `out` (`cols` values), as GGUF defines it
    /// (`(d·sc)·q − dmin·m` in f32).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (s, o) in out.chunks_exact_mut(SUPER).enumerate() {
            let sup = self.row_super(r, s);
            let d = f16::from_le_bytes(sup.d).to_f32();
            let dmin = f16::from_le_bytes(sup.dmin).to_f32();
            for (i, v) in o.iter_mut().enumerate() {
                let j = i / BLOCK;
                *v = d * sup.sc[j] as f32 * sup.q[i] as f32 - dmin * sup.m[j] as f32;
            }
        }
    }

    /// Row `r` against one row of activation blocks, in scalar code (the reference for the
    /// SIMD kernel: the same integer sums, the same float operations per block).
    fn dot_scalar(sups: &[Super], acts: &[A8Block]) -> f32 {
        let mut y = 0f32;
        for (s, sup) in sups.iter().enumerate() {
            let d = f16::from_le_bytes(sup.d).to_f32();
            let dmin = f16::from_le_bytes(sup.dmin).to_f32();
            for j in 0..SUPER / BLOCK {
                let a = &acts[s * SUPER / BLOCK + j];
                let sum: i32 = (0..BLOCK)
                    .map(|w| sup.q[BLOCK * j + w] as i32 * a.qs[w] as i32)
                    .sum();
                y += (sup.sc[j] as i32 * sum) as f32 * (d * a.d);
                y -= dmin * sup.m[j] as f32 * a.s;
            }
        }
        y
    }
}

/// `W[r] · x_t` for every row `r` in `rows` and every activation row `t < n`, handed to
/// `emit(t, r, value)`; `acts` holds `n` rows of `cols / 32` blocks. Group-aligned ranges run
/// the SIMD kernel.
pub fn affine_k_rows<const BITS: u8>(
    isa: Isa,
    w: &AffineK<BITS>,
    acts: &[A8Block],
    n: usize,
    rows: Range<usize>,
    mut emit: impl FnMut(usize, usize, f32),
) {
    let nb = w.cols / BLOCK;
    let end = rows.end.min(w.rows);
    assert!(
        acts.len() >= n * nb,
        "affine_k_rows: {} blocks for n={n}",
        acts.len()
    );
    if isa == Isa::Scalar || !rows.start.is_multiple_of(GROUP) {
        for r in rows.start..end {
            // The row unpacked once for all tokens.
            let sups: Vec<Super> = (0..w.cols / SUPER).map(|s| w.row_super(r, s)).collect();
            for t in 0..n {
                let y = AffineK::<BITS>::dot_scalar(&sups, &acts[t * nb..(t + 1) * nb]);
                emit(t, r, y);
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    crate::groups::run_groups(isa, &avx2::Kernel(w), acts, nb, n, rows.start..end, emit);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::packed::avx2::bcast;

    /// The group kernel (every non-scalar `Isa` has AVX2, FMA and F16C).
    pub(super) struct Kernel<'a, const BITS: u8>(pub &'a AffineK<BITS>);

    impl<const BITS: u8> crate::groups::GroupKernel for Kernel<'_, BITS> {
        fn group<const N: usize>(
            &self,
            g: usize,
            t0: usize,
            acts: [&[A8Block]; N],
        ) -> [[f32; GROUP]; N] {
            // SAFETY: `affine_k_rows` only runs this for non-scalar `Isa`s, which `dot::isa` picks
            // when the CPU has AVX2, FMA and F16C; it checked the activation lengths, and
            // `run_groups` passes groups below `rows.div_ceil(8)`.
            unsafe { group(self.0, g, t0 == 0, acts) }
        }
    }

    /// Rows `8g..8g+8` against `N` activation rows: `[token][row]`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `g` is a valid group; each `acts[k]` holds `cols / 32`
    /// blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<const BITS: u8, const N: usize>(
        w: &AffineK<BITS>,
        g: usize,
        prefetch: bool,
        acts: [&[A8Block]; N],
    ) -> [[f32; GROUP]; N] {
        let ns = w.cols / SUPER;
        let (gs, gb) = (group_super(BITS), group_block(BITS));
        let base = w.data.as_ptr().add(g * ns * gs);
        let next = base.wrapping_add(ns * gs);
        let (m4, m10) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
        let mut facc = [_mm256_setzero_ps(); N];
        for s in 0..ns {
            let sup = base.add(s * gs);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(sup as *const __m128i));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(sup.add(16) as *const __m128i));
            for j in 0..SUPER / BLOCK {
                // One eighth of the next group's super-block per block (as in `packed`).
                let part = gs / 8;
                let mut off = j * part;
                while prefetch && off < (j + 1) * part {
                    let at = next.wrapping_add(s * gs + off);
                    _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
                    off += 64;
                }
                let blk = sup.add(32 + j * gb);
                let s8 = _mm_loadl_epi64(blk as *const __m128i);
                // Each row's scale in both 16-bit lanes of its 32-bit lane.
                let sc = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(s8, s8));
                let m8 = _mm_loadl_epi64(blk.add(8) as *const __m128i);
                let mins = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m8)));
                let mut q = [_mm256_setzero_si256(); 8];
                for c in 0..4 {
                    let v = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
                    q[c] = _mm256_and_si256(v, m4);
                    q[4 + c] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                }
                if BITS == 5 {
                    let h = _mm256_loadu_si256(blk.add(144) as *const __m256i);
                    for (k, qk) in q.iter_mut().enumerate() {
                        // Bit k of each byte to bit 4 (the 16-bit shifts' spill-over is
                        // masked off).
                        let at = if k < 4 {
                            _mm256_sll_epi16(h, _mm_cvtsi32_si128(4 - k as i32))
                        } else {
                            _mm256_srl_epi16(h, _mm_cvtsi32_si128(k as i32 - 4))
                        };
                        *qk = _mm256_or_si256(*qk, _mm256_and_si256(at, m10));
                    }
                }
                let ab = s * SUPER / BLOCK + j;
                for k in 0..N {
                    let a = &acts[k][ab];
                    let mut iacc = _mm256_setzero_si256();
                    for (c, &qc) in q.iter().enumerate() {
                        let p = _mm256_maddubs_epi16(qc, bcast(a, 4 * c));
                        iacc = _mm256_add_epi32(iacc, _mm256_madd_epi16(p, sc));
                    }
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                    let f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), scale, facc[k]);
                    facc[k] = _mm256_fnmadd_ps(mins, _mm256_set1_ps(a.s), f);
                }
            }
        }
        let mut out = [[0f32; GROUP]; N];
        for (o, f) in out.iter_mut().zip(facc.iter()) {
            _mm256_storeu_ps(o.as_mut_ptr(), *f);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::quantize_activations;
    use crate::matmul::tests::Rng;

    /// Random GGUF `Q4_K`/`Q5_K` bytes for a `(rows, cols)` matrix: every code, scale and min,
    /// and finite `d`s.
    fn random_k(bits: u8, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / SUPER {
            let mut blk = vec![0u8; super_bytes(bits)];
            for b in blk[4..].iter_mut() {
                *b = (rng.next() >> 24) as u8;
            }
            let d = f16::from_f32(0.001 + rng.f().abs() * 0.01);
            let dmin = f16::from_f32(0.001 + rng.f().abs() * 0.01);
            blk[..2].copy_from_slice(&d.to_le_bytes());
            blk[2..4].copy_from_slice(&dmin.to_le_bytes());
            bytes.extend_from_slice(&blk);
        }
        bytes
    }

    /// ggml's `dequantize_row_q4_K` and `dequantize_row_q5_K`, written from their definitions
    /// (`get_scale_min_k4`; `Q5_K`'s fifth bits through the masks `u1`, `u2`).
    fn dequantize_ref(bits: u8, sb: &[u8]) -> Vec<f32> {
        let scale_min = |j: usize, s: &[u8]| {
            if j < 4 {
                (s[j] & 63, s[j + 4] & 63)
            } else {
                (
                    (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
                    (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
                )
            }
        };
        let d = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
        let dmin = f16::from_le_bytes([sb[2], sb[3]]).to_f32();
        let (qh, mut ql) = if bits == 5 {
            (&sb[16..48], &sb[48..])
        } else {
            (&sb[..0], &sb[16..])
        };
        let (mut u1, mut u2) = (1u8, 2u8);
        let mut y = Vec::with_capacity(SUPER);
        for is in (0..8).step_by(2) {
            let (sc, m) = scale_min(is, &sb[4..16]);
            let (d1, m1) = (d * sc as f32, dmin * m as f32);
            let (sc, m) = scale_min(is + 1, &sb[4..16]);
            let (d2, m2) = (d * sc as f32, dmin * m as f32);
            let high = |l: usize, u: u8| match qh.get(l) {
                Some(&h) if h & u != 0 => 16.0,
                _ => 0.0,
            };
            y.extend((0..32).map(|l| d1 * ((ql[l] & 0x0F) as f32 + high(l, u1)) - m1));
            y.extend((0..32).map(|l| d2 * ((ql[l] >> 4) as f32 + high(l, u2)) - m2));
            ql = &ql[32..];
            u1 <<= 2;
            u2 <<= 2;
        }
        y
    }

    fn round_trip<const BITS: u8>() {
        let mut rng = Rng(4);
        let bytes = random_k(BITS, 13, 512, &mut rng);
        let w = AffineK::<BITS>::pack(13, 512, &bytes).unwrap();
        assert_eq!(w.unpack(), bytes);
        assert_eq!(w.size_in_bytes(), 16 * 2 * group_super(BITS) / 8);
        assert!(AffineK::<BITS>::pack(13, 512, &bytes[1..]).is_err());
        let e = AffineK::<BITS>::pack(13, 576, &bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of 256"), "{e}");
        // Dequantized as ggml defines it, value for value.
        let mut row = vec![0f32; 512];
        let sb = super_bytes(BITS);
        for r in 0..13 {
            w.dequantize_row(r, &mut row);
            let want: Vec<f32> = bytes[r * 2 * sb..(r + 1) * 2 * sb]
                .chunks_exact(sb)
                .flat_map(|b| dequantize_ref(BITS, b))
                .collect();
            assert_eq!(row, want, "Q{BITS}_K row {r}");
        }
    }

    #[test]
    fn pack_round_trips_and_dequantizes_as_ggml() {
        round_trip::<4>();
        round_trip::<5>();
    }

    /// The scalar reference against the dequantized weights times the dequantized activations,
    /// and the SIMD kernels against the scalar reference.
    fn kernels<const BITS: u8>() {
        let mut rng = Rng(12);
        for &(rows, cols, n) in &[(19, 256, 1), (8, 512, 3), (37, 768, 9), (24, 256, 13)] {
            let bytes = random_k(BITS, rows, cols, &mut rng);
            let w = AffineK::<BITS>::pack(rows, cols, &bytes).unwrap();
            let x: Vec<f32> = (0..n * cols).map(|_| rng.f()).collect();
            let mut acts = Vec::new();
            quantize_activations(&x, &mut acts);
            let nb = cols / BLOCK;
            let mut want = vec![0f32; n * rows];
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut row);
                for t in 0..n {
                    let a = &acts[t * nb..(t + 1) * nb];
                    let exact: f64 = row
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            let b = &a[i / BLOCK];
                            v as f64 * (b.d * b.qs[i % BLOCK] as f32) as f64
                        })
                        .sum();
                    want[t * rows + r] = exact as f32;
                }
            }
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            // The whole range (padding rows in the last group), then an unaligned split.
            let mid = (rows / 2) / GROUP * GROUP + 1;
            for isa in crate::dot::available() {
                for cut in [rows, mid] {
                    let mut got = vec![f32::NAN; n * rows];
                    for part in [0..cut, cut..rows] {
                        affine_k_rows(isa, &w, &acts, n, part, |t, r, v| got[t * rows + r] = v);
                    }
                    for (g, e) in got.iter().zip(&want) {
                        assert!(
                            (g - e).abs() <= 1e-4 * scale,
                            "Q{BITS}_K {isa:?} ({rows},{cols},{n}): {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kernels_match_the_reference_on_every_isa() {
        kernels::<4>();
        kernels::<5>();
    }
}
