//! GGUF `Q6_K` weights kept exact, with eight rows interleaved for the SIMD kernel (the layout
//! of [`crate::packed`], for 256-weight super-blocks with a scale per 16 weights).
//!
//! A GGUF `Q6_K` super-block holds 256 weights in 210 bytes: `ql: [u8; 128]` (low 4 bits),
//! `qh: [u8; 64]` (high 2 bits), `sc: [i8; 16]`, `d: f16`, and
//! `w_i = d · sc[i/16] · (q_i − 32)`, `q_i ∈ 0..64`. Weight `i = 128h + 32k + l` (`h < 2`,
//! `k < 4`, `l < 32`) keeps its low bits in nibble `k/2` of `ql[64h + 32(k%2) + l]` and its
//! high bits at bits `2k..2k+2` of `qh[32h + l]`.
//!
//! Interleaved layout: rows in groups of [`GROUP`] = 8 (the last padded with zero rows); per
//! group and super-block, `8 × 210` bytes (the GGUF size):
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | the 8 rows' `d`, f16 |
//! | then 8 × 208 | one *group block* per 32 weights |
//!
//! A group block: bytes 0..8 hold the rows' scales of its first 16 weights, 8..16 those of its
//! last 16; 16..144 four vectors of low bits (vector `j`, byte `4·row + i`: weight `4j + i` in
//! the low nibble, `16 + 4j + i` in the high one, as in `Q4_0`); 144..208 two vectors of high
//! bits (vector `v`, byte `4·row + i`, bits `2j..2j+2`: weight `16v + 4j + i`).
//!
//! Per 32-weight block and token, with the activations quantized to 8 bits (`x ≈ d_a·a`):
//! `y[row] += d[row]·d_a·Σ_v sc_v[row]·Σ_{i in half v} (q_i − 32)·a_i`, an exact integer sum
//! (below 2^25 in magnitude) times float scales, as for the other block formats.

use std::ops::Range;

use half::f16;

use crate::act::A8Block;
use crate::dot::Isa;
use crate::groups::GROUP;
use crate::{Error, Result, BLOCK};

/// Weights per super-block.
pub const SUPER: usize = 256;
/// GGUF bytes per super-block.
pub const SUPER_BYTES: usize = 210;
/// Bytes per group block (32 weights of 8 rows, without the `d`s).
const GROUP_BLOCK: usize = 208;
/// Bytes per group super-block.
const GROUP_SUPER: usize = GROUP * SUPER_BYTES;

/// A `Q6_K` `(rows, cols)` matrix in the interleaved layout.
#[derive(Debug, Clone)]
pub struct Q6K {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// One row's super-block: `d` (f16 bits), scales and the 6-bit codes.
struct Super {
    d: [u8; 2],
    sc: [i8; 16],
    q: [u8; SUPER],
}

impl Super {
    /// From GGUF bytes.
    fn read(src: &[u8]) -> Self {
        let (ql, qh) = (&src[..128], &src[128..192]);
        let mut q = [0u8; SUPER];
        for (i, v) in q.iter_mut().enumerate() {
            let (h, k, l) = (i / 128, i % 128 / 32, i % 32);
            let lo = (ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
            let hi = (qh[32 * h + l] >> (2 * k)) & 3;
            *v = lo | hi << 4;
        }
        let mut sc = [0i8; 16];
        for (s, &b) in sc.iter_mut().zip(&src[192..208]) {
            *s = b as i8;
        }
        Self {
            d: [src[208], src[209]],
            sc,
            q,
        }
    }

    /// As GGUF bytes.
    fn write(&self, dst: &mut [u8]) {
        dst[..192].fill(0);
        for (i, &v) in self.q.iter().enumerate() {
            let (h, k, l) = (i / 128, i % 128 / 32, i % 32);
            dst[64 * h + 32 * (k % 2) + l] |= (v & 0x0F) << (4 * (k / 2));
            dst[128 + 32 * h + l] |= (v >> 4) << (2 * k);
        }
        for (b, &s) in dst[192..208].iter_mut().zip(&self.sc) {
            *b = s as u8;
        }
        dst[208..210].copy_from_slice(&self.d);
    }
}

/// Where weight `w < 32` of a group block sits for lane `lane`: (low-bits byte, its shift,
/// high-bits byte, its shift), offsets within the group block.
fn code_at(lane: usize, w: usize) -> (usize, u8, usize, u8) {
    let (v, j, i) = (w / 16, w % 16 / 4, w % 4);
    let k = 4 * lane + i;
    (16 + 32 * j + k, 4 * v as u8, 144 + 32 * v + k, 2 * j as u8)
}

impl Q6K {
    /// Repacks GGUF row-major super-blocks (`rows × cols/256` of them).
    pub fn pack(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let ns = cols / SUPER;
        if !cols.is_multiple_of(SUPER) || bytes.len() != rows * ns * SUPER_BYTES {
            return Err(Error::Shape {
                op: "pack Q6_K",
                why: format!(
                    "{} bytes for a {rows}x{cols} Q6_K matrix (cols must be a multiple of \
                     {SUPER}, {SUPER_BYTES} bytes per {SUPER} weights)",
                    bytes.len()
                ),
            });
        }
        let mut data = vec![0u8; rows.div_ceil(GROUP) * ns * GROUP_SUPER];
        for r in 0..rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            for s in 0..ns {
                let at = (r * ns + s) * SUPER_BYTES;
                let sup = Super::read(&bytes[at..at + SUPER_BYTES]);
                let dst = &mut data[(g * ns + s) * GROUP_SUPER..(g * ns + s + 1) * GROUP_SUPER];
                dst[2 * lane..2 * lane + 2].copy_from_slice(&sup.d);
                for b in 0..SUPER / BLOCK {
                    let blk = &mut dst[16 + b * GROUP_BLOCK..16 + (b + 1) * GROUP_BLOCK];
                    blk[lane] = sup.sc[2 * b] as u8;
                    blk[8 + lane] = sup.sc[2 * b + 1] as u8;
                    for w in 0..BLOCK {
                        let q = sup.q[BLOCK * b + w];
                        let (lo, ls, hi, hs) = code_at(lane, w);
                        blk[lo] |= (q & 0x0F) << ls;
                        blk[hi] |= (q >> 4) << hs;
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
        let src = &self.data[(g * ns + s) * GROUP_SUPER..(g * ns + s + 1) * GROUP_SUPER];
        let mut sup = Super {
            d: [src[2 * lane], src[2 * lane + 1]],
            sc: [0; 16],
            q: [0; SUPER],
        };
        for b in 0..SUPER / BLOCK {
            let blk = &src[16 + b * GROUP_BLOCK..16 + (b + 1) * GROUP_BLOCK];
            sup.sc[2 * b] = blk[lane] as i8;
            sup.sc[2 * b + 1] = blk[8 + lane] as i8;
            for w in 0..BLOCK {
                let (lo, ls, hi, hs) = code_at(lane, w);
                sup.q[BLOCK * b + w] = ((blk[lo] >> ls) & 0x0F) | ((blk[hi] >> hs) & 3) << 4;
            }
        }
        sup
    }

    /// Row `r`'s GGUF bytes, super-block after super-block.
    pub fn row_bytes(&self, r: usize) -> Vec<u8> {
        let ns = self.cols / SUPER;
        let mut out = vec![0u8; ns * SUPER_BYTES];
        for (s, dst) in out.chunks_exact_mut(SUPER_BYTES).enumerate() {
            self.row_super(r, s).write(dst);
        }
        out
    }

    /// The GGUF row-major bytes (the inverse of [`Q6K::pack`]).
    pub fn unpack(&self) -> Vec<u8> {
        (0..self.rows).flat_map(|r| self.row_bytes(r)).collect()
    }

    /// Row `r` dequantized into `out` (`cols` values), as GGUF defines it
    /// (`(d · sc) · (q − 32)` in f32).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (s, o) in out.chunks_exact_mut(SUPER).enumerate() {
            let sup = self.row_super(r, s);
            let d = f16::from_le_bytes(sup.d).to_f32();
            for (i, v) in o.iter_mut().enumerate() {
                *v = d * sup.sc[i / 16] as f32 * (sup.q[i] as i32 - 32) as f32;
            }
        }
    }

    /// Row `r` against one row of activation blocks, in scalar code (the reference for the
    /// SIMD kernel: the same integer sums, the same float operations per block).
    fn dot_scalar(sups: &[Super], acts: &[A8Block]) -> f32 {
        let mut y = 0f32;
        for (s, sup) in sups.iter().enumerate() {
            let d = f16::from_le_bytes(sup.d).to_f32();
            for b in 0..SUPER / BLOCK {
                let a = &acts[s * SUPER / BLOCK + b];
                let mut total = 0i32;
                for v in 0..2 {
                    let mut sum = 0i32;
                    for w in 16 * v..16 * v + 16 {
                        sum += (sup.q[BLOCK * b + w] as i32 - 32) * a.qs[w] as i32;
                    }
                    total += sup.sc[2 * b + v] as i32 * sum;
                }
                y += total as f32 * (d * a.d);
            }
        }
        y
    }
}

/// `W[r] · x_t` for every row `r` in `rows` and every activation row `t < n`, handed to
/// `emit(t, r, value)`; `acts` holds `n` rows of `cols / 32` blocks. Group-aligned ranges run
/// the SIMD kernel.
pub fn q6k_rows(
    isa: Isa,
    w: &Q6K,
    acts: &[A8Block],
    n: usize,
    rows: Range<usize>,
    mut emit: impl FnMut(usize, usize, f32),
) {
    let nb = w.cols / BLOCK;
    let end = rows.end.min(w.rows);
    assert!(
        acts.len() >= n * nb,
        "q6k_rows: {} blocks for n={n}",
        acts.len()
    );
    if isa == Isa::Scalar || !rows.start.is_multiple_of(GROUP) {
        for r in rows.start..end {
            // The row unpacked once for all tokens.
            let sups: Vec<Super> = (0..w.cols / SUPER).map(|s| w.row_super(r, s)).collect();
            for t in 0..n {
                emit(t, r, Q6K::dot_scalar(&sups, &acts[t * nb..(t + 1) * nb]));
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let halves = half_sums(&acts[..n * nb]);
        let kernel = avx2::Kernel { w, halves: &halves };
        crate::groups::run_groups(isa, &kernel, acts, nb, n, rows.start..end, emit);
    }
}

#[cfg(target_arch = "x86_64")]
/// Per activation block, the sums of its two 16-value halves as two `i16` in one word (low
/// half first); each is at most 16 · 127 in magnitude.
fn half_sums(acts: &[A8Block]) -> Vec<u32> {
    acts.iter()
        .map(|a| {
            let h = |v: usize| {
                a.qs[16 * v..16 * v + 16]
                    .iter()
                    .map(|&q| q as i32)
                    .sum::<i32>()
            };
            (h(0) as i16 as u16 as u32) | (h(1) as i16 as u16 as u32) << 16
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::packed::avx2::bcast;

    /// The group kernel (every non-scalar `Isa` has AVX2, FMA and F16C), with the activation
    /// blocks' [`half_sums`].
    pub(super) struct Kernel<'a> {
        pub w: &'a Q6K,
        pub halves: &'a [u32],
    }

    impl crate::groups::GroupKernel for Kernel<'_> {
        fn group<const N: usize>(
            &self,
            g: usize,
            t0: usize,
            acts: [&[A8Block]; N],
        ) -> [[f32; GROUP]; N] {
            let nb = self.w.cols / BLOCK;
            let halves: [&[u32]; N] =
                std::array::from_fn(|k| &self.halves[(t0 + k) * nb..(t0 + k + 1) * nb]);
            // SAFETY: `q6k_rows` only runs this for non-scalar `Isa`s, which `dot::isa` picks
            // when the CPU has AVX2, FMA and F16C; it checked the activation lengths (and the
            // half sums are one per block), and `run_groups` passes groups below
            // `rows.div_ceil(8)`.
            unsafe { group(self.w, g, t0 == 0, acts, halves) }
        }
    }

    /// Rows `8g..8g+8` against `N` activation rows: `[token][row]`.
    ///
    /// The codes stay unsigned (`0..64`, as `vpmaddubsw` wants them); the `− 32` is applied
    /// once per block and token: `Σ_v sc_v·Σ (q − 32)·a = Σ_v sc_v·Σ q·a − 32·Σ_v sc_v·h_v`
    /// with `h_v` the activations' half sums, one `vpmaddwd` for all eight rows.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `g` is a valid group; each `acts[k]` and `halves[k]`
    /// holds `cols / 32` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<const N: usize>(
        w: &Q6K,
        g: usize,
        prefetch: bool,
        acts: [&[A8Block]; N],
        halves: [&[u32]; N],
    ) -> [[f32; GROUP]; N] {
        let ns = w.cols / SUPER;
        let base = w.data.as_ptr().add(g * ns * GROUP_SUPER);
        let next = base.wrapping_add(ns * GROUP_SUPER);
        let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let mut facc = [_mm256_setzero_ps(); N];
        for s in 0..ns {
            let sup = base.add(s * GROUP_SUPER);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(sup as *const __m128i));
            for b in 0..SUPER / BLOCK {
                // One eighth of the next group's super-block per block: the next group is
                // in flight by the time it is read (as in `packed`).
                let mut off = b * SUPER_BYTES;
                while prefetch && off < (b + 1) * SUPER_BYTES {
                    let at = next.wrapping_add(s * GROUP_SUPER + off);
                    _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
                    off += 64;
                }
                let blk = sup.add(16 + b * GROUP_BLOCK);
                let s0 = _mm_loadl_epi64(blk as *const __m128i);
                let s1 = _mm_loadl_epi64(blk.add(8) as *const __m128i);
                // Each row's scale of half `v` in both 16-bit lanes of its 32-bit lane, and
                // both of its scales side by side (for the half sums).
                let sc = [
                    _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(s0, s0)),
                    _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(s1, s1)),
                ];
                let pair = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(s0, s1));
                // The 6-bit codes, 4 of each row per vector: half `v`, chunk `j` at `4v + j`.
                let mut q = [_mm256_setzero_si256(); 8];
                for v in 0..2 {
                    let qh = _mm256_loadu_si256(blk.add(144 + 32 * v) as *const __m256i);
                    // Bits 2j..2j+2 moved to bits 4..6 of each byte.
                    let hi = [
                        _mm256_slli_epi16::<4>(qh),
                        _mm256_slli_epi16::<2>(qh),
                        qh,
                        _mm256_srli_epi16::<2>(qh),
                    ];
                    for j in 0..4 {
                        let ql = _mm256_loadu_si256(blk.add(16 + 32 * j) as *const __m256i);
                        let lo = if v == 0 {
                            _mm256_and_si256(ql, m4)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql), m4)
                        };
                        q[4 * v + j] = _mm256_or_si256(lo, _mm256_and_si256(hi[j], m30));
                    }
                }
                let ab = s * SUPER / BLOCK + b;
                for k in 0..N {
                    let a = &acts[k][ab];
                    let mut iacc = _mm256_setzero_si256();
                    for (c, &qc) in q.iter().enumerate() {
                        let p = _mm256_maddubs_epi16(qc, bcast(a, 4 * c));
                        iacc = _mm256_add_epi32(iacc, _mm256_madd_epi16(p, sc[c / 4]));
                    }
                    let h = _mm256_set1_epi32(halves[k][ab] as i32);
                    let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(pair, h));
                    let iacc = _mm256_sub_epi32(iacc, off);
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                    facc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), scale, facc[k]);
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

    /// Random GGUF `Q6_K` bytes for a `(rows, cols)` matrix: every code, signed scales and
    /// finite `d`s.
    fn random_q6k(rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / SUPER {
            let mut blk = [0u8; SUPER_BYTES];
            for b in blk[..208].iter_mut() {
                *b = (rng.next() >> 24) as u8;
            }
            let d = f16::from_f32(0.001 + rng.f().abs() * 0.01);
            blk[208..].copy_from_slice(&d.to_le_bytes());
            bytes.extend_from_slice(&blk);
        }
        bytes
    }

    #[test]
    fn pack_round_trips_and_rejects_bad_sizes() {
        let mut rng = Rng(3);
        let bytes = random_q6k(13, 512, &mut rng);
        let w = Q6K::pack(13, 512, &bytes).unwrap();
        assert_eq!(w.unpack(), bytes);
        assert_eq!(w.size_in_bytes(), 16 * 2 * SUPER_BYTES);
        assert!(Q6K::pack(13, 512, &bytes[1..]).is_err());
        let e = Q6K::pack(13, 576, &bytes).unwrap_err().to_string();
        assert!(e.contains("multiple of 256"), "{e}");
    }

    /// The SIMD kernels against the scalar reference, and the scalar reference against the
    /// dequantized weights times the dequantized activations (both exact up to f32 rounding).
    #[test]
    fn kernels_match_the_reference_on_every_isa() {
        let mut rng = Rng(11);
        for &(rows, cols, n) in &[(19, 256, 1), (8, 512, 3), (37, 768, 9), (24, 256, 13)] {
            let w = Q6K::pack(rows, cols, &random_q6k(rows, cols, &mut rng)).unwrap();
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
                            v as f64 * (a[i / BLOCK].d * a[i / BLOCK].qs[i % BLOCK] as f32) as f64
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
                        q6k_rows(isa, &w, &acts, n, part, |t, r, v| got[t * rows + r] = v);
                    }
                    for (g, e) in got.iter().zip(&want) {
                        assert!(
                            (g - e).abs() <= 1e-5 * scale,
                            "{isa:?} ({rows},{cols},{n}): {g} vs {e}"
                        );
                    }
                }
            }
        }
    }
}
