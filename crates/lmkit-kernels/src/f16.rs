//! `y = x Wᵀ` for f16 weights `W (rows, cols)` (GGUF `F16`, row-major) and f32 `x (n, cols)`:
//! weights stay f16 in memory (half the bytes of f32) and are widened in registers (F16C), with
//! f32 accumulation. Multi-threaded over weight rows like the quantized matmul.

use rayon::prelude::*;

use crate::dense::{self, Dense};
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
    let tasks: Vec<Vec<f32>> = (0..rows)
        .into_par_iter()
        .step_by(ROWS_PER_TASK)
        .map(|r0| {
            let range = r0..(r0 + ROWS_PER_TASK).min(rows);
            let mut out = vec![0f32; range.len() * n];
            dense::rows(isa, Dense::F16(w), cols, x, n, range, |t, r, v| {
                out[(r - r0) * n + t] = v
            });
            out
        })
        .collect();
    scatter(&tasks.iter().collect::<Vec<_>>(), n, rows, y);
    Ok(())
}

/// Scalar reference: f32 accumulation in element order.
pub fn scalar_dot(w: &[u8], x: &[f32]) -> f32 {
    dense::scalar_dot(Dense::F16(w), 0, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

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
