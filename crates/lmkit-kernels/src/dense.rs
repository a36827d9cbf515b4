//! `W[rows] · x_t` for dense weights, f32 (GGUF `F32`), f16 (GGUF `F16`, widened in registers
//! with F16C) or bf16 (GGUF `BF16` and HF safetensors, widened by a 16-bit shift), with f32
//! activations and f32 accumulation. [`matmul`] is the whole product on rayon's pool.
//!
//! The AVX2 micro-kernel keeps a 4-weight-row × 3-token tile of accumulators in registers, so
//! each weight vector loaded is used three times and each activation vector four times; tokens
//! are walked in tiles of [`TOKEN_TILE`] so a tile's activations stay in L2 while all the rows
//! stream past. Scalar reference: [`scalar_dot`] (f32 accumulation in element order).

use std::ops::Range;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::dot::Isa;
use crate::matmul::scatter;
use crate::{Error, Result};

/// Tokens whose activations are reused across all rows before moving on.
const TOKEN_TILE: usize = 64;

/// Dense weight storage.
#[derive(Debug, Clone, Copy)]
pub enum Dense<'a> {
    /// Row-major f32.
    F32(&'a [f32]),
    /// Row-major little-endian f16 bytes.
    F16(&'a [u8]),
    /// Row-major little-endian bf16 bytes (the upper half of an f32).
    BF16(&'a [u8]),
}

impl Dense<'_> {
    /// Stored values (rows × cols).
    pub fn len(&self) -> usize {
        match self {
            Dense::F32(w) => w.len(),
            Dense::F16(w) | Dense::BF16(w) => w.len() / 2,
        }
    }

    /// Bytes per stored value.
    pub fn value_bytes(&self) -> usize {
        match self {
            Dense::F32(_) => 4,
            Dense::F16(_) | Dense::BF16(_) => 2,
        }
    }

    /// The first byte.
    fn as_ptr(&self) -> *const u8 {
        match self {
            Dense::F32(w) => w.as_ptr() as *const u8,
            Dense::F16(w) | Dense::BF16(w) => w.as_ptr(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Scalar reference for one row: f32 accumulation in element order.
pub fn scalar_dot(w: Dense, row: usize, x: &[f32]) -> f32 {
    let c = x.len();
    match w {
        Dense::F32(w) => w[row * c..(row + 1) * c]
            .iter()
            .zip(x)
            .map(|(a, b)| a * b)
            .sum(),
        Dense::F16(w) => w[2 * row * c..2 * (row + 1) * c]
            .chunks_exact(2)
            .zip(x)
            .map(|(b, &v)| f16::from_le_bytes([b[0], b[1]]).to_f32() * v)
            .sum(),
        Dense::BF16(w) => w[2 * row * c..2 * (row + 1) * c]
            .chunks_exact(2)
            .zip(x)
            .map(|(b, &v)| bf16::from_le_bytes([b[0], b[1]]).to_f32() * v)
            .sum(),
    }
}

/// Rows of W per parallel task in [`matmul`].
const ROWS_PER_TASK: usize = 32;

/// `y (n, rows) = x (n, cols) · Wᵀ` on rayon's pool, rows in tasks of 32.
pub fn matmul(
    w: Dense,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) -> Result<()> {
    matmul_with(crate::dot::isa(), w, rows, cols, x, n, y)
}

/// [`matmul`] with an explicit implementation (tests compare them).
pub fn matmul_with(
    isa: Isa,
    w: Dense,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) -> Result<()> {
    if w.len() != rows * cols || x.len() != n * cols || y.len() != n * rows {
        return Err(Error::Shape {
            op: "dense matmul",
            why: format!(
                "{} weights, {} inputs, {} outputs for W {rows}x{cols}, n={n}",
                w.len(),
                x.len(),
                y.len()
            ),
        });
    }
    let tasks: Vec<Vec<f32>> = (0..rows)
        .into_par_iter()
        .step_by(ROWS_PER_TASK)
        .map(|r0| {
            let range = r0..(r0 + ROWS_PER_TASK).min(rows);
            let mut out = vec![0f32; range.len() * n];
            self::rows(isa, w, cols, x, n, range, |t, r, v| {
                out[(r - r0) * n + t] = v
            });
            out
        })
        .collect();
    scatter(&tasks.iter().collect::<Vec<_>>(), n, rows, y);
    Ok(())
}

/// `W[r] · x_t` for `r` in `rows` and `t < n`, handed to `emit(t, r, value)`. `x` is
/// `(n, cols)`; `w` holds at least `rows.end` rows of `cols`.
pub fn rows(
    isa: Isa,
    w: Dense,
    cols: usize,
    x: &[f32],
    n: usize,
    rows: Range<usize>,
    mut emit: impl FnMut(usize, usize, f32),
) {
    if crate::gemm::rows(isa, w, cols, x, n, rows.clone(), &mut emit) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && cols.is_multiple_of(16) {
        // SAFETY: `Avx512` is only selected when the CPU has AVX-512 F/VL/BW (and AVX2, FMA,
        // F16C); `cols` is a multiple of 16 and the caller guarantees the lengths.
        unsafe { avx512::rows(w, cols, x, n, rows, &mut emit) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && cols.is_multiple_of(8) {
        // SAFETY: a non-scalar `Isa` is only selected when the CPU has AVX2, FMA and F16C;
        // `cols` is a multiple of 8 and the caller guarantees the lengths.
        unsafe { avx2::rows(w, cols, x, n, rows, &mut emit) };
        return;
    }
    let _ = isa;
    for t0 in (0..n).step_by(TOKEN_TILE) {
        for r in rows.clone() {
            for t in t0..(t0 + TOKEN_TILE).min(n) {
                emit(t, r, scalar_dot(w, r, &x[t * cols..(t + 1) * cols]));
            }
        }
    }
}

/// One x86 implementation of the tiled kernel per vector width: `R` weight rows × `N` tokens of
/// accumulators, each weight vector loaded once per tile and used `N` times.
macro_rules! dense_kernels {
    (
        $module:ident, $doc:literal, $features:literal, lanes: $lanes:literal,
        tokens: $tokens:literal, $vec:ty, $zero:ident, $loadu:ident, $fmadd:ident,
        widen: |$h:ident| $widen:expr, widen_bf16: |$hb:ident| $widen_bf16:expr,
        reduce: |$s:ident| $reduce:expr
    ) => {
        #[cfg(target_arch = "x86_64")]
        #[doc = $doc]
        mod $module {
            use std::arch::x86_64::*;

            use super::*;

            #[inline(always)]
            unsafe fn load(w: Dense, at: usize) -> $vec {
                match w {
                    Dense::F32(w) => $loadu(w.as_ptr().add(at)),
                    Dense::F16(w) => {
                        let $h = w.as_ptr().add(2 * at);
                        $widen
                    }
                    Dense::BF16(w) => {
                        let $hb = w.as_ptr().add(2 * at);
                        $widen_bf16
                    }
                }
            }

            /// An `R × N` tile: rows `r0..r0+R` against tokens `t0..t0+N`.
            #[inline(always)]
            unsafe fn tile<const R: usize, const N: usize>(
                w: Dense,
                cols: usize,
                x: &[f32],
                r0: usize,
                t0: usize,
            ) -> [[f32; N]; R] {
                let mut acc = [[$zero(); N]; R];
                let xp = x.as_ptr().add(t0 * cols);
                // Prefetch the next tile's rows, one cache line per 64 bytes read here: rows of
                // a few hundred weights are too short for the hardware prefetcher to train on
                // (F16 decoding streamed 7.5 GiB/s without this, 13 with it, on a 15 GB/s VM).
                // Past the last row the addresses are never dereferenced (prefetch cannot fault).
                let (base, esize) = (w.as_ptr() as *const i8, w.value_bytes());
                let next = base.wrapping_add((r0 + R) * cols * esize);
                let mut i = 0;
                while i < cols {
                    let ahead = next.wrapping_add(R * i * esize);
                    let mut b = 0;
                    while b < R * $lanes * esize {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(b));
                        b += 64;
                    }
                    let mut xv = [$zero(); N];
                    for (k, v) in xv.iter_mut().enumerate() {
                        *v = $loadu(xp.add(k * cols + i));
                    }
                    for (r, row) in acc.iter_mut().enumerate() {
                        let wv = load(w, (r0 + r) * cols + i);
                        for (a, xk) in row.iter_mut().zip(xv.iter()) {
                            *a = $fmadd(wv, *xk, *a);
                        }
                    }
                    i += $lanes;
                }
                let mut out = [[0f32; N]; R];
                for (o, a) in out.iter_mut().zip(acc.iter()) {
                    for (v, s) in o.iter_mut().zip(a.iter()) {
                        let $s = *s;
                        *v = $reduce;
                    }
                }
                out
            }

            #[inline(always)]
            unsafe fn rows_tokens<const N: usize>(
                w: Dense,
                cols: usize,
                x: &[f32],
                rows: Range<usize>,
                t0: usize,
                emit: &mut impl FnMut(usize, usize, f32),
            ) {
                let mut r = rows.start;
                while r + 4 <= rows.end {
                    let v = tile::<4, N>(w, cols, x, r, t0);
                    for (k, row) in v.iter().enumerate() {
                        for (j, &y) in row.iter().enumerate() {
                            emit(t0 + j, r + k, y);
                        }
                    }
                    r += 4;
                }
                while r < rows.end {
                    let v = tile::<1, N>(w, cols, x, r, t0);
                    for (j, &y) in v[0].iter().enumerate() {
                        emit(t0 + j, r, y);
                    }
                    r += 1;
                }
            }

            /// # Safety
            /// The CPU has the enabled features; `cols` is a multiple of the lane count,
            /// `x.len() ≥ n·cols`, `w` holds `rows.end` rows.
            #[target_feature(enable = $features)]
            pub unsafe fn rows(
                w: Dense,
                cols: usize,
                x: &[f32],
                n: usize,
                rows: Range<usize>,
                emit: &mut impl FnMut(usize, usize, f32),
            ) {
                assert!(x.len() >= n * cols && w.len() >= rows.end * cols);
                for tt in (0..n).step_by(TOKEN_TILE) {
                    let end = (tt + TOKEN_TILE).min(n);
                    let mut t = tt;
                    while t + $tokens <= end {
                        rows_tokens::<$tokens>(w, cols, x, rows.clone(), t, emit);
                        t += $tokens;
                    }
                    while t < end {
                        rows_tokens::<1>(w, cols, x, rows.clone(), t, emit);
                        t += 1;
                    }
                }
            }
        }
    };
}

dense_kernels!(
    avx2, "AVX2 + FMA + F16C: 8-lane registers, 4 rows × 3 tokens.", "avx2,fma,f16c",
    lanes: 8, tokens: 3, __m256, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps,
    widen: |h| _mm256_cvtph_ps(_mm_loadu_si128(h as *const __m128i)),
    widen_bf16: |h| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
        _mm_loadu_si128(h as *const __m128i)
    ))),
    reduce: |s| crate::dot::avx2::hsum(s)
);
dense_kernels!(
    avx512, "AVX-512: 16-lane registers (32 of them), 4 rows × 4 tokens.",
    "avx2,fma,f16c,avx512f,avx512vl,avx512bw",
    lanes: 16, tokens: 4, __m512, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps,
    widen: |h| _mm512_cvtph_ps(_mm256_loadu_si256(h as *const __m256i)),
    widen_bf16: |h| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
        _mm256_loadu_si256(h as *const __m256i)
    ))),
    reduce: |s| _mm512_reduce_add_ps(s)
);

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 accumulation-order differences, relative to Σ|w·x|.
    const REL_TOL: f32 = 1e-5;

    /// A `rows × cols` test matrix in f32, and its f16 and bf16 bytes; inputs `(n, cols)`.
    fn case(rows: usize, cols: usize, n: usize) -> (Vec<f32>, Vec<u8>, Vec<u8>, Vec<f32>) {
        let wf: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 2001) as f32 - 1000.0) / 997.0)
            .collect();
        let wh = wf.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes());
        let wb = wf.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes());
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0)
            .collect();
        (wf.clone(), wh.collect(), wb.collect(), x)
    }

    #[test]
    fn simd_equals_scalar_for_f32_f16_and_bf16() {
        for &(nrows, cols, n) in &[
            (37, 64, 1),
            (33, 576, 5),
            (9, 96, 70),
            (5, 20, 2),
            (6, 40, 9),
        ] {
            let (wf, wh, wb, x) = case(nrows, cols, n);
            for w in [Dense::F32(&wf), Dense::F16(&wh), Dense::BF16(&wb)] {
                for isa in crate::dot::available() {
                    let mut y = vec![f32::NAN; n * nrows];
                    // Two calls on split row ranges cover everything.
                    let mid = nrows / 2;
                    for part in [0..mid, mid..nrows] {
                        rows(isa, w, cols, &x, n, part, |t, r, v| y[t * nrows + r] = v);
                    }
                    for t in 0..n {
                        for r in 0..nrows {
                            let xt = &x[t * cols..(t + 1) * cols];
                            let exact = scalar_dot(w, r, xt);
                            let mag: f32 =
                                (0..cols).map(|c| (wf[r * cols + c] * xt[c]).abs()).sum();
                            let got = y[t * nrows + r];
                            assert!(
                                (got - exact).abs() <= REL_TOL * mag.max(1e-6),
                                "{isa:?} {got} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_is_exact_for_each_type_and_checks_shapes() {
        for &(rows, cols, n) in &[(37, 64, 1), (33, 576, 3), (40, 96, 6), (5, 20, 2)] {
            let (wf, wh, wb, x) = case(rows, cols, n);
            // The values each type stores, widened exactly.
            let stored: [Vec<f32>; 3] = [
                wf.clone(),
                wf.iter().map(|v| f16::from_f32(*v).to_f32()).collect(),
                wf.iter().map(|v| bf16::from_f32(*v).to_f32()).collect(),
            ];
            for (w, wq) in [Dense::F32(&wf), Dense::F16(&wh), Dense::BF16(&wb)]
                .into_iter()
                .zip(stored.iter())
            {
                for isa in crate::dot::available() {
                    let mut y = vec![0f32; n * rows];
                    matmul_with(isa, w, rows, cols, &x, n, &mut y).unwrap();
                    for t in 0..n {
                        for r in 0..rows {
                            let terms = (0..cols).map(|c| wq[r * cols + c] * x[t * cols + c]);
                            let exact: f32 = terms.clone().sum();
                            let mag: f32 = terms.map(f32::abs).sum();
                            let got = y[t * rows + r];
                            assert!(
                                (got - exact).abs() <= REL_TOL * mag.max(1e-6),
                                "{w:?} {isa:?} {got} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
        let mut y = vec![0f32; 2];
        assert!(matmul(Dense::F16(&[0u8; 10]), 2, 4, &[0.0; 4], 1, &mut y).is_err());
        assert!(matmul(Dense::BF16(&[0u8; 16]), 2, 4, &[0.0; 4], 1, &mut y[..1]).is_err());
    }
}
