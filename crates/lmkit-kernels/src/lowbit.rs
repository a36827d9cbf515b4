//! 2-, 3- and 4-bit integer codes with one affine scale per (row, group): lmkit's low-bit
//! format for the weights its quantizers write (RTN, GPTQ, QuIP; see `lmkit-quant`).
//!
//! A weight is `w = a·q + b` with code `q ∈ [0, 2^bits)` and `(a, b)` shared by the `group`
//! consecutive weights of a row (`group` a multiple of 32 dividing the row length; the whole
//! row by default). Each row is stored as blocks of 32 codes in `4·bits` bytes, built from bit
//! planes:
//!
//! | bits | bytes | layout |
//! |---|---|---|
//! | 2 | 8 | 2-bit plane: byte `j` holds codes `j, j+8, j+16, j+24` in bits `0-1, 2-3, 4-5, 6-7` |
//! | 3 | 12 | the low 2 bits as a 2-bit plane, then a `u32` (LE) whose bit `i` is code `i`'s bit 2 |
//! | 4 | 16 | the low 2 bits as a 2-bit plane, then the high 2 bits as a second 2-bit plane |
//!
//! Against 8-bit activation blocks (`x ≈ d·q_a`, [`A8Block`]) a row's product is exact integer
//! sums times float scales: `Σ_i w_i x_i = Σ_g [a_g · Σ_{blocks ∈ g} d·Σ q_i q_a,i + b_g · Σ_{blocks ∈ g} s]`
//! with `s = d·Σ q_a` the block's sum.
//!
//! The SIMD kernels read a copy with eight rows interleaved ([`crate::lowbit_lanes`]); this
//! row-major layout is the file format and the scalar reference.

use std::ops::Range;

use crate::act::A8Block;
use crate::dot::Isa;
use crate::hadamard::Rotation;
use crate::{Error, Result, BLOCK};

/// Bytes of one block of 32 codes.
pub fn block_bytes(bits: u8) -> usize {
    4 * bits as usize
}

/// Packs 32 codes (each `< 2^bits`) into `out` (`block_bytes(bits)` bytes).
pub fn pack_block(bits: u8, q: &[u8; BLOCK], out: &mut [u8]) {
    let plane = |shift: u32, out: &mut [u8]| {
        for (j, o) in out[..8].iter_mut().enumerate() {
            *o = (0..4).fold(0u8, |acc, k| {
                acc | (((q[j + 8 * k] >> shift) & 3) << (2 * k))
            });
        }
    };
    plane(0, out);
    match bits {
        3 => {
            let h = (0..BLOCK).fold(0u32, |acc, i| acc | (u32::from((q[i] >> 2) & 1) << i));
            out[8..12].copy_from_slice(&h.to_le_bytes());
        }
        4 => plane(2, &mut out[8..16]),
        _ => {}
    }
}

/// Unpacks one block into 32 codes.
pub fn unpack_block(bits: u8, b: &[u8], q: &mut [u8; BLOCK]) {
    for (i, slot) in q.iter_mut().enumerate() {
        *slot = (b[i % 8] >> (2 * (i / 8))) & 3;
    }
    match bits {
        3 => {
            let h = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
            for (i, slot) in q.iter_mut().enumerate() {
                *slot |= (((h >> i) & 1) as u8) << 2;
            }
        }
        4 => {
            for (i, slot) in q.iter_mut().enumerate() {
                *slot |= ((b[8 + i % 8] >> (2 * (i / 8))) & 3) << 2;
            }
        }
        _ => {}
    }
}

/// A `(rows, cols)` low-bit matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct LowBit {
    pub bits: u8,
    pub rows: usize,
    pub cols: usize,
    /// Weights per `(a, b)` pair along a row.
    pub group: usize,
    /// `rows × cols/32` blocks of `block_bytes(bits)`.
    pub codes: Vec<u8>,
    /// `(a, b)` per `(row, group)`, row-major: `rows × cols/group` pairs.
    pub scales: Vec<[f32; 2]>,
    /// The codes and scales with eight rows interleaved, for the SIMD kernels
    /// ([`crate::lowbit_lanes`]).
    pub(crate) lanes: Vec<u8>,
    pub(crate) lane_scales: Vec<f32>,
}

impl LowBit {
    /// Checks the sizes: `bits ∈ {2,3,4}`, `group` a multiple of 32 dividing `cols`.
    pub fn new(
        bits: u8,
        rows: usize,
        cols: usize,
        group: usize,
        codes: Vec<u8>,
        scales: Vec<[f32; 2]>,
    ) -> Result<Self> {
        let bad = |why: String| {
            Err(Error::Shape {
                op: "low-bit matrix",
                why,
            })
        };
        if !(2..=4).contains(&bits) {
            return bad(format!("{bits} bits (2, 3 or 4 are supported)"));
        }
        if group == 0 || !group.is_multiple_of(BLOCK) || !cols.is_multiple_of(group) {
            return bad(format!(
                "group {group} for {cols} columns (a multiple of {BLOCK} dividing the row)"
            ));
        }
        let want = rows * cols / BLOCK * block_bytes(bits);
        if codes.len() != want {
            return bad(format!(
                "{} code bytes for {rows}x{cols} at {bits} bits, expected {want}",
                codes.len()
            ));
        }
        if scales.len() != rows * (cols / group) {
            return bad(format!(
                "{} scale pairs for {rows} rows of {} groups",
                scales.len(),
                cols / group
            ));
        }
        let mut w = Self {
            bits,
            rows,
            cols,
            group,
            codes,
            scales,
            lanes: Vec::new(),
            lane_scales: Vec::new(),
        };
        w.lanes = crate::lowbit_lanes::interleave(&w);
        w.lane_scales = crate::lowbit_lanes::lane_scales(&w);
        Ok(w)
    }

    /// Packs a row-major `(rows, cols)` array of codes.
    pub fn from_codes(
        bits: u8,
        rows: usize,
        cols: usize,
        group: usize,
        q: &[u8],
        scales: Vec<[f32; 2]>,
    ) -> Result<Self> {
        if q.len() != rows * cols || !cols.is_multiple_of(BLOCK) {
            return Err(Error::Shape {
                op: "low-bit matrix",
                why: format!("{} codes for {rows}x{cols}", q.len()),
            });
        }
        let bb = block_bytes(bits);
        let mut codes = vec![0u8; rows * cols / BLOCK * bb];
        for (blk, out) in q.chunks_exact(BLOCK).zip(codes.chunks_exact_mut(bb)) {
            let mut a = [0u8; BLOCK];
            a.copy_from_slice(blk);
            pack_block(bits, &a, out);
        }
        Self::new(bits, rows, cols, group, codes, scales)
    }

    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.cols / self.group
    }

    fn row_codes(&self, r: usize) -> &[u8] {
        let rb = self.cols / BLOCK * block_bytes(self.bits);
        &self.codes[r * rb..(r + 1) * rb]
    }

    /// Row `r`'s codes, unpacked.
    pub fn codes_of_row(&self, r: usize, out: &mut [u8]) {
        let bb = block_bytes(self.bits);
        for (b, o) in self
            .row_codes(r)
            .chunks_exact(bb)
            .zip(out.chunks_exact_mut(BLOCK))
        {
            let mut q = [0u8; BLOCK];
            unpack_block(self.bits, b, &mut q);
            o.copy_from_slice(&q);
        }
    }

    /// Row `r` as f32 weights.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let mut q = vec![0u8; self.cols];
        self.codes_of_row(r, &mut q);
        let g = self.groups();
        for (i, (o, &c)) in out.iter_mut().zip(&q).enumerate() {
            let [a, b] = self.scales[r * g + i / self.group];
            *o = a * f32::from(c) + b;
        }
    }

    /// Bytes of codes and scales as stored (scales as f16 pairs).
    pub fn size_in_bytes(&self) -> usize {
        self.codes.len() + self.scales.len() * 4
    }
}

/// A linear layer stored as [`LowBit`] codes between two rotations: `W = Rₒᵀ Ŵ Rᵢ`, so
/// `y = W x = Rₒᵀ (Ŵ (Rᵢ x))` (QuIP's incoherence processing; RTN and GPTQ have neither).
#[derive(Debug, Clone, PartialEq)]
pub struct LowBitLinear {
    pub w: LowBit,
    /// `Rᵢ` (width `cols`), applied to the input.
    pub input: Option<Rotation>,
    /// `Rₒ` (width `rows`); its transpose is applied to the output.
    pub output: Option<Rotation>,
}

impl LowBitLinear {
    /// Checks that the rotations fit the matrix.
    pub fn new(w: LowBit, input: Option<Rotation>, output: Option<Rotation>) -> Result<Self> {
        if input.as_ref().is_some_and(|r| r.len() != w.cols)
            || output.as_ref().is_some_and(|r| r.len() != w.rows)
        {
            return Err(Error::Shape {
                op: "low-bit layer",
                why: format!(
                    "rotations of widths {:?} / {:?} for a {}x{} matrix",
                    input.as_ref().map(|r| r.len()),
                    output.as_ref().map(|r| r.len()),
                    w.rows,
                    w.cols
                ),
            });
        }
        Ok(Self { w, input, output })
    }

    /// The layer as a dense row-major `(rows, cols)` f32 matrix: `Rₒᵀ Ŵ Rᵢ`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = (self.w.rows, self.w.cols);
        let mut m = vec![0f32; rows * cols];
        for (r, row) in m.chunks_exact_mut(cols).enumerate() {
            self.w.dequantize_row(r, row);
        }
        // Ŵ Rᵢ = (Rᵢᵀ Ŵᵀ)ᵀ.
        if let Some(ri) = &self.input {
            let mut t = transpose(&m, rows, cols);
            ri.apply_t_cols(&mut t, rows);
            m = transpose(&t, cols, rows);
        }
        if let Some(ro) = &self.output {
            ro.apply_t_cols(&mut m, cols);
        }
        m
    }

    /// Bytes as stored: codes, f16 scale pairs and f16 rotation diagonals.
    pub fn size_in_bytes(&self) -> usize {
        self.w.size_in_bytes()
            + 2 * (self.input.as_ref().map_or(0, |r| r.len())
                + self.output.as_ref().map_or(0, |r| r.len()))
    }

    /// `y = W x` for `n` rows of `x (n, cols)` into `y (n, rows)`, on the calling thread pool.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        use rayon::prelude::*;
        let (rows, cols) = (self.w.rows, self.w.cols);
        let nb = cols / BLOCK;
        let mut acts = vec![crate::act::A8Block::default(); n * nb];
        // Rotated inputs: all rows at once as the columns of xᵀ (contiguous inner loops).
        let rotated = self.input.as_ref().map(|ri| {
            let mut t = transpose(&x[..n * cols], n, cols);
            ri.apply_cols(&mut t, n);
            transpose(&t, cols, n)
        });
        let xin = rotated.as_deref().unwrap_or(x);
        acts.par_chunks_mut(nb)
            .zip(xin.par_chunks(cols))
            .for_each(|(a, xr)| crate::act::quantize_into(xr, a));
        let isa = crate::dot::isa();
        // Rows in chunks across the pool; each chunk writes its own columns of `y`.
        let chunk = 64usize;
        let parts: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(chunk))
            .into_par_iter()
            .map(|c| {
                let r0 = c * chunk;
                let r1 = (r0 + chunk).min(rows);
                let mut out = vec![0f32; n * (r1 - r0)];
                lowbit_rows(isa, &self.w, &acts, n, r0..r1, |t, r, v| {
                    out[t * (r1 - r0) + (r - r0)] = v
                });
                (r0, out)
            })
            .collect();
        for (r0, out) in parts {
            let w = out.len() / n.max(1);
            for t in 0..n {
                y[t * rows + r0..t * rows + r0 + w].copy_from_slice(&out[t * w..(t + 1) * w]);
            }
        }
        if let Some(ro) = &self.output {
            let mut t = transpose(&y[..n * rows], n, rows);
            ro.apply_t_cols(&mut t, n);
            y[..n * rows].copy_from_slice(&transpose(&t, rows, n));
        }
    }
}

/// The transpose of a row-major `(rows, cols)` matrix.
pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// `W[r] · x_t` for every `r` in `rows` and `t < n`, handed to `emit(t, r, value)`; `acts`
/// holds `n` rows of `cols / 32` blocks.
pub fn lowbit_rows(
    isa: Isa,
    w: &LowBit,
    acts: &[A8Block],
    n: usize,
    rows: Range<usize>,
    mut emit: impl FnMut(usize, usize, f32),
) {
    let nb = w.cols / BLOCK;
    let end = rows.end.min(w.rows);
    assert!(
        acts.len() >= n * nb,
        "lowbit_rows: {} blocks for n={n}",
        acts.len()
    );
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && rows.start.is_multiple_of(crate::lowbit_lanes::GROUP) {
        let kernel = crate::lowbit_lanes::Kernel(isa, w);
        crate::groups::run_groups(isa, &kernel, acts, nb, n, rows.start..end, emit);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        for r in rows.start..end {
            let mut t = 0;
            while t < n {
                let k = (n - t).min(avx2::TILE);
                let mut y = [0f32; avx2::TILE];
                // SAFETY: non-scalar ISAs have AVX2 and FMA; `acts` holds `n` rows (asserted).
                unsafe { avx2::row(w, r, &acts[t * nb..(t + k) * nb], k, &mut y) };
                for (j, v) in y[..k].iter().enumerate() {
                    emit(t + j, r, *v);
                }
                t += k;
            }
        }
        return;
    }
    let _ = isa;
    let bb = block_bytes(w.bits);
    let bpg = w.group / BLOCK;
    let g = w.groups();
    for r in rows.start..end {
        let codes = w.row_codes(r);
        for t in 0..n {
            let act = &acts[t * nb..(t + 1) * nb];
            let mut y = 0f32;
            for gi in 0..g {
                let (mut dot, mut sum) = (0f32, 0f32);
                for b in gi * bpg..(gi + 1) * bpg {
                    let mut q = [0u8; BLOCK];
                    unpack_block(w.bits, &codes[b * bb..(b + 1) * bb], &mut q);
                    let isum: i32 = q
                        .iter()
                        .zip(&act[b].qs)
                        .map(|(&c, &a)| i32::from(c) * i32::from(a))
                        .sum();
                    dot += act[b].d * isum as f32;
                    sum += act[b].s;
                }
                let [a, bb_] = w.scales[r * g + gi];
                y += a * dot + bb_ * sum;
            }
            emit(t, r, y);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{block_bytes, LowBit};
    use crate::act::A8Block;
    use crate::BLOCK;

    /// Tokens per weight load.
    pub const TILE: usize = 4;

    /// 32 codes of a 2-bit plane as bytes `0..=3` in natural order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn plane2(b: &[u8]) -> __m256i {
        let v = i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let x = _mm256_set1_epi64x(v);
        let s = _mm256_srlv_epi64(x, _mm256_set_epi64x(6, 4, 2, 0));
        _mm256_and_si256(s, _mm256_set1_epi8(3))
    }

    /// Bit `i` of a `u32` as byte `i` (0 or `value`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn plane1(h: u32, value: i8) -> __m256i {
        let hv = _mm256_set1_epi32(h as i32);
        let shuf = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let sel = _mm256_and_si256(_mm256_shuffle_epi8(hv, shuf), bits);
        _mm256_and_si256(_mm256_cmpeq_epi8(sel, bits), _mm256_set1_epi8(value))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn unpack(bits: u8, b: &[u8]) -> __m256i {
        let lo = plane2(b);
        match bits {
            3 => {
                let h = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
                _mm256_or_si256(lo, plane1(h, 4))
            }
            4 => _mm256_or_si256(lo, _mm256_slli_epi16(plane2(&b[8..16]), 2)),
            _ => lo,
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Row `r` against `k ≤ TILE` activation rows (`acts` holds `k` rows), into `y[..k]`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row(w: &LowBit, r: usize, acts: &[A8Block], k: usize, y: &mut [f32; TILE]) {
        let nb = w.cols / BLOCK;
        let bb = block_bytes(w.bits);
        let bpg = w.group / BLOCK;
        let g = w.groups();
        let codes = w.row_codes(r);
        let ones = _mm256_set1_epi16(1);
        for gi in 0..g {
            let mut acc = [_mm256_setzero_ps(); TILE];
            let mut sum = [0f32; TILE];
            for b in gi * bpg..(gi + 1) * bpg {
                let q = unpack(w.bits, &codes[b * bb..(b + 1) * bb]);
                for j in 0..k {
                    let a = &acts[j * nb + b];
                    let qa = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, qa), ones);
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(a.d), _mm256_cvtepi32_ps(p), acc[j]);
                    sum[j] += a.s;
                }
            }
            let [sa, sb] = w.scales[r * g + gi];
            for j in 0..k {
                y[j] += sa * hsum(acc[j]) + sb * sum[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::quantize_with;
    use crate::dot::available;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn pack_unpack_is_exact() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for bits in [2u8, 3, 4] {
            for _ in 0..50 {
                let mut q = [0u8; BLOCK];
                q.iter_mut()
                    .for_each(|v| *v = (rng(&mut s) % (1 << bits)) as u8);
                let mut b = vec![0u8; block_bytes(bits)];
                pack_block(bits, &q, &mut b);
                let mut back = [0u8; BLOCK];
                unpack_block(bits, &b, &mut back);
                assert_eq!(q, back, "{bits} bits");
            }
        }
    }

    #[test]
    fn every_isa_matches_the_dequantized_product() {
        let mut s = 7u64;
        for bits in [2u8, 3, 4] {
            for (rows, cols, group) in [(5, 64, 64), (9, 128, 32), (3, 96, 96)] {
                let q: Vec<u8> = (0..rows * cols)
                    .map(|_| (rng(&mut s) % (1 << bits)) as u8)
                    .collect();
                let scales: Vec<[f32; 2]> = (0..rows * cols / group)
                    .map(|_| {
                        let a = (rng(&mut s) % 1000) as f32 / 1000.0 + 0.01;
                        [a, -a * 1.5]
                    })
                    .collect();
                let w = LowBit::from_codes(bits, rows, cols, group, &q, scales).unwrap();
                let n = 11;
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| (rng(&mut s) % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let mut acts = vec![A8Block::default(); n * cols / BLOCK];
                quantize_with(Isa::Scalar, &x, &mut acts);
                // Reference: dequantized weights against the dequantized activations.
                let xq: Vec<f32> = acts
                    .iter()
                    .flat_map(|a| a.qs.iter().map(move |&v| a.d * f32::from(v)))
                    .collect();
                let mut want = vec![0f32; n * rows];
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    w.dequantize_row(r, &mut row);
                    for t in 0..n {
                        want[t * rows + r] =
                            row.iter().zip(&xq[t * cols..]).map(|(a, b)| a * b).sum();
                    }
                }
                // Whole groups of 8 rows (the interleaved kernels) and a range that starts
                // inside a group (the row-by-row kernels).
                for (isa, start) in available().into_iter().flat_map(|i| [(i, 0), (i, 3)]) {
                    let mut got = want.clone();
                    for t in 0..n {
                        for r in start..rows {
                            got[t * rows + r] = f32::NAN;
                        }
                    }
                    lowbit_rows(isa, &w, &acts, n, start..rows, |t, r, v| {
                        got[t * rows + r] = v
                    });
                    for (g, e) in got.iter().zip(&want) {
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{isa:?} {bits} bits {rows}x{cols}/{group}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(LowBit::new(5, 1, 32, 32, vec![0; 20], vec![[0.0; 2]]).is_err());
        assert!(LowBit::new(2, 1, 64, 48, vec![0; 16], vec![[0.0; 2]]).is_err());
        assert!(LowBit::new(2, 1, 64, 64, vec![0; 15], vec![[0.0; 2]]).is_err());
        assert!(LowBit::new(2, 2, 64, 64, vec![0; 32], vec![[0.0; 2]]).is_err());
        assert!(LowBit::new(2, 2, 64, 64, vec![0; 32], vec![[0.0; 2]; 2]).is_ok());
    }
}
