//! A safe f32 matrix product on slices, `dst (m, n) [+]= lhs (m, k) · rhs (k, n)`, through the
//! `gemm` crate (AVX-512 where the CPU has it), for the CPU paths that work on their own buffers
//! instead of candle tensors (the frozen-weight product, the fused output layer).
//!
//! Each operand is a slice with a row stride and a column stride, so transposes are free:
//! `Wᵀ` of a row-major `W (n, k)` is `View { data: w, rows: k, cols: n, rs: 1, cs: k }`.

use crate::{Error, Result};

/// A read-only matrix over a slice: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `(rows, cols)` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// This matrix transposed (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// The largest index read, +1 (0 for an empty matrix); None when it overflows or a stride
    /// does not fit an `isize`.
    fn extent(&self) -> Option<usize> {
        if self.rs > isize::MAX as usize || self.cs > isize::MAX as usize {
            return None;
        }
        if self.rows == 0 || self.cols == 0 {
            return Some(0);
        }
        (self.rows - 1)
            .checked_mul(self.rs)?
            .checked_add((self.cols - 1).checked_mul(self.cs)?)?
            .checked_add(1)
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` with `accumulate`), `dst` row-major `(m, n)`.
pub fn sgemm(dst: &mut [f32], lhs: View, rhs: View, accumulate: bool) -> Result<()> {
    product(dst, rhs.cols, lhs, rhs, accumulate, true)
}

/// [`sgemm`] on the calling thread only: for many small products that run in parallel
/// themselves (one attention head each).
pub fn sgemm_serial(dst: &mut [f32], lhs: View, rhs: View, accumulate: bool) -> Result<()> {
    product(dst, rhs.cols, lhs, rhs, accumulate, false)
}

/// [`sgemm_serial`] into rows `dst_rs` floats apart (a block of a wider matrix).
pub fn sgemm_serial_into(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: View,
    rhs: View,
    accumulate: bool,
) -> Result<()> {
    product(dst, dst_rs, lhs, rhs, accumulate, false)
}

fn product(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: View,
    rhs: View,
    accumulate: bool,
    threads: bool,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let bad = |what: &str| Error::Shape {
        op: "sgemm".into(),
        expected: format!("({m}, {k}) · ({k}, {n}) into rows {dst_rs} apart"),
        got: what.to_string(),
    };
    if rhs.rows != k {
        return Err(bad(&format!("rhs has {} rows", rhs.rows)));
    }
    let fits = |v: &View| v.extent().is_some_and(|e| e <= v.data.len());
    // The last element written is at (m − 1)·dst_rs + n − 1.
    let end = m
        .saturating_sub(1)
        .checked_mul(dst_rs)
        .and_then(|e| e.checked_add(n))
        .filter(|&e| (m == 0 || e <= dst.len()) && dst_rs >= n && dst_rs <= isize::MAX as usize);
    if end.is_none() || !fits(&lhs) || !fits(&rhs) {
        return Err(bad(
            "a buffer too short for its view (or sizes that overflow)",
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    // SAFETY: the checks above keep every index each operand's strides reach inside its slice;
    // `dst` is written with row stride `dst_rs` and column stride 1, up to `end`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            match threads {
                true => parallelism(m * n * k),
                false => gemm::Parallelism::None,
            },
        );
    }
    Ok(())
}

/// Threads for a product of `work` multiply-adds (small ones run on the calling thread, as
/// candle does).
fn parallelism(work: usize) -> gemm::Parallelism {
    match rayon::current_num_threads() {
        n if n > 1 && work >= 1 << 15 => gemm::Parallelism::Rayon(n),
        _ => gemm::Parallelism::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every transpose combination against the triple loop, overwrite and accumulate.
    #[test]
    fn matches_the_definition() -> Result<()> {
        let (m, k, n) = (13, 29, 7);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: Vec<f32> = (0..m * n)
            .map(|ij| (0..k).map(|p| a[ij / n * k + p] * b[p * n + ij % n]).sum())
            .collect();
        // The same matrices stored transposed.
        let at: Vec<f32> = (0..k * m).map(|i| a[i % m * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[i % k * n + i / k]).collect();
        let lhs = [View::rows(&a, m, k), View::rows(&at, k, m).t()];
        let rhs = [View::rows(&b, k, n), View::rows(&bt, n, k).t()];
        for l in lhs {
            for r in rhs {
                let mut d = vec![1.0f32; m * n];
                sgemm(&mut d, l, r, true)?;
                for (x, y) in d.iter().zip(&want) {
                    assert!((x - 1.0 - y).abs() < 1e-4, "{x} vs {y} + 1");
                }
                sgemm(&mut d, l, r, false)?;
                for (x, y) in d.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-4, "{x} vs {y}");
                }
            }
        }
        let mut short = vec![0f32; 3];
        assert!(sgemm(&mut short, lhs[0], rhs[0], false).is_err());
        // Strides whose extent overflows are refused, not wrapped.
        let huge = View {
            rs: usize::MAX / 2,
            ..lhs[0]
        };
        let mut d = vec![0f32; m * n];
        assert!(sgemm(&mut d, huge, rhs[0], false).is_err());

        // Into a block of a wider matrix: the other columns stay as they were.
        let wide = n + 5;
        let mut d = vec![7f32; m * wide];
        sgemm_serial_into(&mut d, wide, lhs[1], rhs[1], false)?;
        for (i, row) in d.chunks(wide).enumerate() {
            for (j, x) in row.iter().enumerate() {
                match j < n {
                    true => assert!((x - want[i * n + j]).abs() < 1e-4, "{x}"),
                    false => assert_eq!(*x, 7.0),
                }
            }
        }
        // Rows closer than a row's width, or a buffer one float short, are refused.
        assert!(sgemm_serial_into(&mut d, n - 1, lhs[0], rhs[0], false).is_err());
        let mut d = vec![0f32; (m - 1) * wide + n - 1];
        assert!(sgemm_serial_into(&mut d, wide, lhs[0], rhs[0], false).is_err());
        Ok(())
    }
}
