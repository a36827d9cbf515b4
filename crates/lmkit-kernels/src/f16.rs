//! `y = x Wᵀ` for f16 weights `W (rows, cols)` (GGUF `F16`, row-major) and f32 `x (n, cols)`:
//! weights stay f16 in memory (half the bytes of f32) and are widened in registers (F16C), with
//! f32 accumulation. Multi-threaded over weight rows like the quantized matmul.

use half::f16;
use rayon::prelude::*;

use crate::dot::Isa;
use crate::matmul::scatter;
use crate::{Error, Result};

/// Rows of W per parallel task.
const ROWS_PER_TASK: usize = 32;

/// `y (n, rows) = x (n, cols) · Wᵀ` with `w` the raw little-endian f16 bytes of W.
pub fn matmul_f16(
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) -> Result<()> {
    matmul_f16_with(crate::dot::isa(), w, rows, cols, x, n, y)
}

/// [`matmul_f16`] with an explicit implementation (tests compare them).
pub fn matmul_f16_with(
    isa: Isa,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) -> Result<()> {
    if w.len() != rows * cols * 2 || x.len() != n * cols || y.len() != n * rows {
        return Err(Error::Shape {
            op: "f16 matmul",
            why: format!(
                "{} weight bytes, {} inputs, {} outputs for W {rows}x{cols}, n={n}",
                w.len(),
                x.len(),
                y.len()
            ),
        });
    }
    let rb = cols * 2;
    let simd = isa != Isa::Scalar && cols.is_multiple_of(8);
    let tasks: Vec<Vec<f32>> = w
        .par_chunks(rb * ROWS_PER_TASK)
        .map(|chunk| {
            let nr = chunk.len() / rb;
            let mut out = vec![0f32; nr * n];
            for r in 0..nr {
                let wr = &chunk[r * rb..(r + 1) * rb];
                for t in 0..n {
                    let xt = &x[t * cols..(t + 1) * cols];
                    out[r * n + t] = if simd {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `isa` is not Scalar only when the CPU reports AVX2, FMA and
                        // F16C; lengths are checked above and cols is a multiple of 8.
                        unsafe {
                            avx2::dot(wr, xt)
                        }
                        #[cfg(not(target_arch = "x86_64"))]
                        scalar_dot(wr, xt)
                    } else {
                        scalar_dot(wr, xt)
                    };
                }
            }
            out
        })
        .collect();
    scatter(&tasks.iter().collect::<Vec<_>>(), n, rows, y);
    Ok(())
}

/// Scalar reference: f32 accumulation in element order.
pub fn scalar_dot(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(2)
        .zip(x)
        .map(|(b, &v)| f16::from_le_bytes([b[0], b[1]]).to_f32() * v)
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2, FMA and F16C; `x.len() * 2 == w.len()` and a multiple of 8 elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let wv =
                    _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * (i + 8 * k)) as *const __m128i));
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i + 8 * k)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * i) as *const __m128i));
            acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i)), acc[0]);
            i += 8;
        }
        crate::dot::avx2::hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 accumulation-order differences, relative to Σ|w·x|.
    const F16_REL_TOL: f32 = 1e-5;

    #[test]
    fn simd_equals_scalar_and_exact() {
        for &(rows, cols, n) in &[(37, 64, 1), (33, 576, 3), (40, 96, 6), (5, 20, 2)] {
            let wf: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 2001) as f32 - 1000.0) / 997.0)
                .collect();
            let w: Vec<u8> = wf
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect();
            let wq: Vec<f32> = wf.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0)
                .collect();
            for isa in crate::dot::available() {
                let mut y = vec![0f32; n * rows];
                matmul_f16_with(isa, &w, rows, cols, &x, n, &mut y).unwrap();
                for t in 0..n {
                    for r in 0..rows {
                        let terms = (0..cols).map(|c| wq[r * cols + c] * x[t * cols + c]);
                        let exact: f32 = terms.clone().sum();
                        let mag: f32 = terms.map(f32::abs).sum();
                        let got = y[t * rows + r];
                        assert!(
                            (got - exact).abs() <= F16_REL_TOL * mag.max(1e-6),
                            "{isa:?} {got} vs {exact}"
                        );
                    }
                }
            }
        }
        let mut y = vec![0f32; 2];
        assert!(matmul_f16(&[0u8; 10], 2, 4, &[0.0; 4], 1, &mut y).is_err());
    }
}
