//! Block-quantized matrices repacked with eight rows interleaved, so one SIMD register holds
//! four weights of each of eight rows and every integer dot product, scale and offset is
//! computed for eight outputs at once (the row-major kernels in [`crate::dot`] reduce a register
//! to one output per block instead).
//!
//! Layout: rows are taken in groups of [`GROUP`] = 8 (the last group padded with zero rows);
//! for each group and each 32-weight block `b` there is one *group block* of `8 × block bytes`:
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | the 8 rows' scales `d`, f16 |
//! | 16..32 | `Q4_1` only: the 8 rows' offsets `m`, f16 |
//! | then | chunks of 32 bytes: chunk `c` holds bytes `4c..4c+4` of each row's quants, row by row |
//!
//! `Q8_0` has 8 chunks (byte `4c+i` is weight `4c+i`); `Q4_0`/`Q4_1` have 4 (byte `4c+i` holds
//! weight `4c+i` in its low nibble and `16+4c+i` in its high nibble). Sizes equal the GGUF
//! row-major sizes (plus padding rows), and [`Packed::unpack`] restores the GGUF bytes exactly.
//!
//! Per block and token, with `a` the activation block broadcast 4 bytes at a time:
//! `acc[row] += Σ_c dot4(w_c[row], a_c)`, then `y[row] += d_w[row]·d_a·acc[row]`
//! (`+ m[row]·s_a` for `Q4_1`, `− 8·d_w[row]·s_a` for `Q4_0`, `s_a = d_a·Σ q_a`).

use std::ops::Range;

use half::f16;

use crate::act::A8Block;
use crate::dot::{scalar, Isa};
use crate::matmul::QFormat;
use crate::{Error, Result, BLOCK};

/// Rows interleaved per group.
pub const GROUP: usize = crate::groups::GROUP;

/// A block-quantized `(rows, cols)` matrix in the interleaved layout.
#[derive(Debug, Clone)]
pub struct Packed {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    data: Vec<u8>,
}

/// Offset of the quants within a group block.
fn quant_offset(format: QFormat) -> usize {
    if format == QFormat::Q4_1 {
        32
    } else {
        16
    }
}

/// `(scale bytes, offset bytes, quant bytes)` ranges within one GGUF block.
fn block_parts(format: QFormat) -> (Range<usize>, Option<Range<usize>>, Range<usize>) {
    match format {
        QFormat::Q4_0 => (0..2, None, 2..18),
        QFormat::Q4_1 => (0..2, Some(2..4), 4..20),
        QFormat::Q8_0 => (0..2, None, 2..34),
    }
}

impl Packed {
    /// Repacks GGUF row-major blocks (`rows × cols/32` blocks of `format`).
    pub fn pack(format: QFormat, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let bb = format.block_bytes();
        let nb = cols / BLOCK;
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * nb * bb {
            return Err(Error::Shape {
                op: "pack",
                why: format!(
                    "{} bytes for a {rows}x{cols} {format:?} matrix (cols must be a multiple of \
                     {BLOCK})",
                    bytes.len()
                ),
            });
        }
        let gb = GROUP * bb;
        let mut data = vec![0u8; rows.div_ceil(GROUP) * nb * gb];
        let (ds, ms, qs) = block_parts(format);
        let qoff = quant_offset(format);
        for r in 0..rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            for b in 0..nb {
                let src = &bytes[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                let dst = &mut data[(g * nb + b) * gb..(g * nb + b + 1) * gb];
                dst[2 * lane..2 * lane + 2].copy_from_slice(&src[ds.clone()]);
                if let Some(ms) = &ms {
                    dst[16 + 2 * lane..16 + 2 * lane + 2].copy_from_slice(&src[ms.clone()]);
                }
                for (c, chunk) in src[qs.clone()].chunks_exact(4).enumerate() {
                    let at = qoff + c * 32 + lane * 4;
                    dst[at..at + 4].copy_from_slice(chunk);
                }
            }
        }
        Ok(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    /// Bytes held (including padding rows).
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    fn group_block(&self, g: usize, b: usize) -> &[u8] {
        let gb = GROUP * self.format.block_bytes();
        let nb = self.cols / BLOCK;
        &self.data[(g * nb + b) * gb..(g * nb + b + 1) * gb]
    }

    /// Row `r`'s GGUF block bytes, block after block.
    pub fn row_bytes(&self, r: usize) -> Vec<u8> {
        let bb = self.format.block_bytes();
        let nb = self.cols / BLOCK;
        let (ds, ms, qs) = block_parts(self.format);
        let qoff = quant_offset(self.format);
        let (g, lane) = (r / GROUP, r % GROUP);
        let mut out = vec![0u8; nb * bb];
        for b in 0..nb {
            let src = self.group_block(g, b);
            let dst = &mut out[b * bb..(b + 1) * bb];
            dst[ds.clone()].copy_from_slice(&src[2 * lane..2 * lane + 2]);
            if let Some(ms) = &ms {
                dst[ms.clone()].copy_from_slice(&src[16 + 2 * lane..16 + 2 * lane + 2]);
            }
            for (c, chunk) in dst[qs.clone()].chunks_exact_mut(4).enumerate() {
                let at = qoff + c * 32 + lane * 4;
                chunk.copy_from_slice(&src[at..at + 4]);
            }
        }
        out
    }

    /// The GGUF row-major bytes (the inverse of [`Packed::pack`]).
    pub fn unpack(&self) -> Vec<u8> {
        (0..self.rows).flat_map(|r| self.row_bytes(r)).collect()
    }

    /// Row `r` dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bytes = self.row_bytes(r);
        let bb = self.format.block_bytes();
        for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            match self.format {
                QFormat::Q8_0 => {
                    for (v, &q) in o.iter_mut().zip(&blk[2..34]) {
                        *v = d * (q as i8) as f32;
                    }
                }
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    let (m, qs) = if self.format == QFormat::Q4_1 {
                        (f16::from_le_bytes([blk[2], blk[3]]).to_f32(), &blk[4..20])
                    } else {
                        (-8.0 * d, &blk[2..18])
                    };
                    for (j, &q) in qs.iter().enumerate() {
                        o[j] = d * (q & 0x0F) as f32 + m;
                        o[j + 16] = d * (q >> 4) as f32 + m;
                    }
                }
            }
        }
    }
}

/// `W[r] · x_t` for every row `r` in `rows` and every activation row `t < n`, handed to
/// `emit(t, r, value)`. `rows.start` must be a multiple of [`GROUP`] (chunks are split on group
/// boundaries); `acts` holds `n` rows of `cols / 32` blocks.
pub fn packed_rows(
    isa: Isa,
    p: &Packed,
    acts: &[A8Block],
    n: usize,
    rows: Range<usize>,
    mut emit: impl FnMut(usize, usize, f32),
) {
    let nb = p.cols / BLOCK;
    let end = rows.end.min(p.rows);
    if isa == Isa::Scalar || !rows.start.is_multiple_of(GROUP) {
        for r in rows.start..end {
            let w = p.row_bytes(r);
            for t in 0..n {
                emit(
                    t,
                    r,
                    scalar::dot(p.format, &w, [&acts[t * nb..(t + 1) * nb]])[0],
                );
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    crate::groups::run_groups(isa, &Kernel(isa, p), acts, nb, n, rows.start..end, emit);
}

/// The SIMD group kernel for one matrix.
#[cfg(target_arch = "x86_64")]
struct Kernel<'a>(Isa, &'a Packed);

#[cfg(target_arch = "x86_64")]
impl crate::groups::GroupKernel for Kernel<'_> {
    fn group<const N: usize>(
        &self,
        g: usize,
        t0: usize,
        acts: [&[A8Block]; N],
    ) -> [[f32; GROUP]; N] {
        avx2::group(self.0, self.1, g, t0 == 0, acts)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    /// Four activation bytes `4c..4c+4` of a block in every 32-bit lane.
    #[inline(always)]
    pub(crate) unsafe fn bcast(a: &A8Block, byte: usize) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(
            a.qs.as_ptr().add(byte) as *const i32
        ))
    }

    macro_rules! group_kernel {
        ($name:ident, $features:literal, |$acc:ident, $u:ident, $s:ident| $dp:expr) => {
            /// One group of 8 rows against `N` activation rows: `[token][row]`. With
            /// `prefetch`, the next group's bytes are requested as this one's are read (the
            /// first pass over a group; later token tiles find the group in cache).
            ///
            /// # Safety
            /// The CPU supports the features; `g` is a valid group; each `acts[k]` holds
            /// `cols / 32` blocks.
            #[target_feature(enable = $features)]
            unsafe fn $name<const F: u8, const N: usize>(
                p: &Packed,
                g: usize,
                prefetch: bool,
                acts: [&[A8Block]; N],
            ) -> [[f32; GROUP]; N] {
                let nb = p.cols / BLOCK;
                let gb = GROUP * p.format.block_bytes();
                let base = p.data.as_ptr().add(g * nb * gb);
                let mask = _mm256_set1_epi8(0x0F);
                let mut facc = [_mm256_setzero_ps(); N];
                // The next group, as far along as this one: its lines are in flight by the
                // time they are read (the hardware prefetcher alone left decode ~25% below
                // the copy bandwidth on AVX2 machines).
                let next = base.wrapping_add(nb * gb);
                for b in 0..nb {
                    let blk = base.add(b * gb);
                    let mut off = 0;
                    while prefetch && off < gb {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * gb + off) as *const i8);
                        off += 64;
                    }
                    let wd = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                    let mut iacc = [_mm256_setzero_si256(); N];
                    if F == Q8_0 {
                        for c in 0..8 {
                            let w = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
                            let $u = _mm256_sign_epi8(w, w);
                            for k in 0..N {
                                let $s = _mm256_sign_epi8(bcast(&acts[k][b], 4 * c), w);
                                let $acc = iacc[k];
                                iacc[k] = $dp;
                            }
                        }
                    } else {
                        let qoff = if F == Q4_1 { 32 } else { 16 };
                        for j in 0..4 {
                            let w = _mm256_loadu_si256(blk.add(qoff + 32 * j) as *const __m256i);
                            let lo = _mm256_and_si256(w, mask);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
                            for k in 0..N {
                                let ($acc, $u, $s) = (iacc[k], lo, bcast(&acts[k][b], 4 * j));
                                let t = $dp;
                                let ($acc, $u, $s) = (t, hi, bcast(&acts[k][b], 16 + 4 * j));
                                iacc[k] = $dp;
                            }
                        }
                    }
                    let wm = if F == Q4_1 {
                        _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i))
                    } else {
                        wd
                    };
                    for k in 0..N {
                        let ab = &acts[k][b];
                        let scale = _mm256_mul_ps(wd, _mm256_set1_ps(ab.d));
                        facc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[k]), scale, facc[k]);
                        if F == Q4_1 {
                            facc[k] = _mm256_fmadd_ps(wm, _mm256_set1_ps(ab.s), facc[k]);
                        } else if F == Q4_0 {
                            facc[k] = _mm256_fmadd_ps(wd, _mm256_set1_ps(-8.0 * ab.s), facc[k]);
                        }
                    }
                }
                let mut out = [[0f32; GROUP]; N];
                for (o, f) in out.iter_mut().zip(facc.iter()) {
                    _mm256_storeu_ps(o.as_mut_ptr(), *f);
                }
                out
            }
        };
    }

    group_kernel!(plain, "avx2,fma,f16c", |acc, u, s| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    ));
    group_kernel!(vnni, "avx2,fma,f16c,avxvnni", |acc, u, s| {
        _mm256_dpbusd_avx_epi32(acc, u, s)
    });
    group_kernel!(
        vnni512,
        "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni",
        |acc, u, s| _mm256_dpbusd_epi32(acc, u, s)
    );

    /// Dispatches on format and implementation.
    #[inline]
    pub(super) fn group<const N: usize>(
        isa: Isa,
        p: &Packed,
        g: usize,
        prefetch: bool,
        acts: [&[A8Block]; N],
    ) -> [[f32; GROUP]; N] {
        macro_rules! by_format {
            ($k:ident) => {
                // SAFETY: `isa` is only non-scalar when the CPU reports the kernel's features
                // (see `dot::isa`); `packed_rows` checked the group and activation lengths.
                unsafe {
                    match p.format {
                        QFormat::Q4_0 => $k::<Q4_0, N>(p, g, prefetch, acts),
                        QFormat::Q4_1 => $k::<Q4_1, N>(p, g, prefetch, acts),
                        QFormat::Q8_0 => $k::<Q8_0, N>(p, g, prefetch, acts),
                    }
                }
            };
        }
        match isa {
            Isa::Avx512 => by_format!(vnni512),
            Isa::Avx2Vnni => by_format!(vnni),
            _ => by_format!(plain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::quantize_activations;
    use crate::matmul::tests::{random_matrix, Rng};
    use crate::matmul::{matmul_with, QMatrix};

    #[test]
    fn pack_round_trips_and_dequantizes() {
        let mut rng = Rng(77);
        for format in [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0] {
            let (bytes, vals) = random_matrix(format, 13, 64, &mut rng);
            let p = Packed::pack(format, 13, 64, &bytes).unwrap();
            assert_eq!(p.unpack(), bytes);
            assert_eq!(p.size_in_bytes(), 16 * 2 * format.block_bytes());
            let mut row = vec![0f32; 64];
            p.dequantize_row(12, &mut row);
            assert_eq!(row, vals[12 * 64..13 * 64]);
            assert!(Packed::pack(format, 13, 64, &bytes[1..]).is_err());
        }
    }

    /// Packed kernels against the row-major kernels, which are tested against the scalar
    /// reference: the integer sums are exact, so only f32 accumulation order differs.
    #[test]
    fn packed_equals_row_major_on_every_isa() {
        let mut rng = Rng(5);
        for format in [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0] {
            for &(rows, cols, n) in &[
                (19, 64, 1),
                (8, 96, 3),
                (37, 576, 9),
                (64, 32, 4),
                (24, 64, 13),
            ] {
                let (bytes, _) = random_matrix(format, rows, cols, &mut rng);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f()).collect();
                let w = QMatrix {
                    format,
                    rows,
                    cols,
                    data: &bytes,
                };
                let mut want = vec![0f32; n * rows];
                matmul_with(Isa::Scalar, &w, &x, n, &mut want).unwrap();
                let p = Packed::pack(format, rows, cols, &bytes).unwrap();
                let mut acts = Vec::new();
                quantize_activations(&x, &mut acts);
                for isa in crate::dot::available() {
                    let mut got = vec![f32::NAN; n * rows];
                    // Two group-aligned parts, the second ending at the last row.
                    let mid = (rows / 2) / GROUP * GROUP;
                    for part in [0..mid, mid..rows] {
                        packed_rows(isa, &p, &acts, n, part, |t, r, v| got[t * rows + r] = v);
                    }
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                            "{format:?} {isa:?} ({rows},{cols},{n}): {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
