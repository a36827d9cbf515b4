//! `y = x Wᵀ` for a block-quantized `W (rows, cols)` and f32 `x (n, cols)`, multi-threaded over
//! weight rows on rayon's pool; each weight row is decoded once per group of four activation rows.

use std::ops::Range;

use rayon::prelude::*;

use crate::act::{quantize_activations, A8Block};
use crate::dot::{dot, dot_rows, isa, Isa};
use crate::{Error, Result, BLOCK};

/// Weight block formats with a native kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QFormat {
    /// Bytes per 32-weight block.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
        }
    }
}

/// A borrowed quantized matrix in GGUF row-major block layout.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl QMatrix<'_> {
    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }
}

/// Fewest rows of W per parallel task.
const MIN_ROWS_PER_TASK: usize = 32;
/// Parallel tasks per worker thread: enough to balance load, few enough that per-task
/// overhead (scheduling, buffers) stays small next to the work.
const TASKS_PER_THREAD: usize = 8;

/// Rows per task for a matrix of `rows` rows (a multiple of 4, for the decode kernel).
fn rows_per_task(rows: usize) -> usize {
    let tasks = rayon::current_num_threads().max(1) * TASKS_PER_THREAD;
    rows.div_ceil(tasks)
        .next_multiple_of(4)
        .max(MIN_ROWS_PER_TASK)
}

/// `y (n, rows) = x (n, cols) · Wᵀ`.
pub fn matmul(w: &QMatrix, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    matmul_with(isa(), w, x, n, y)
}

/// [`matmul`] with an explicit implementation (tests compare them).
pub fn matmul_with(isa: Isa, w: &QMatrix, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    matmul_many_with(isa, &[*w], x, n, &mut [y])
}

/// Several matrices applied to the same input (q/k/v, gate/up) in one parallel pass: the
/// activations are quantized once and all row ranges share one set of parallel tasks.
/// `ys[i]` is `(n, ws[i].rows)`.
pub fn matmul_many(ws: &[QMatrix], x: &[f32], n: usize, ys: &mut [&mut [f32]]) -> Result<()> {
    matmul_many_with(isa(), ws, x, n, ys)
}

/// [`matmul_many`] with an explicit implementation.
pub fn matmul_many_with(
    isa: Isa,
    ws: &[QMatrix],
    x: &[f32],
    n: usize,
    ys: &mut [&mut [f32]],
) -> Result<()> {
    let bad = |why: String| Err(Error::Shape { op: "qmatmul", why });
    if ws.len() != ys.len() || ws.is_empty() {
        return bad(format!("{} matrices, {} outputs", ws.len(), ys.len()));
    }
    let cols = ws[0].cols;
    for (w, y) in ws.iter().zip(ys.iter()) {
        if w.cols != cols {
            return bad(format!(
                "matrices with {} and {} columns share an input",
                cols, w.cols
            ));
        }
        if !w.cols.is_multiple_of(BLOCK) {
            return bad(format!("cols {} not a multiple of {BLOCK}", w.cols));
        }
        if w.data.len() != w.rows * w.row_bytes() {
            return bad(format!(
                "{} bytes of weights for {}x{} {:?}",
                w.data.len(),
                w.rows,
                w.cols,
                w.format
            ));
        }
        if x.len() != n * w.cols || y.len() != n * w.rows {
            return bad(format!(
                "x has {} values, y {} for n={n}, W {}x{}",
                x.len(),
                y.len(),
                w.rows,
                w.cols
            ));
        }
    }
    let mut acts = Vec::new();
    quantize_activations(x, &mut acts);
    let rows: Vec<usize> = ws.iter().map(|w| w.rows).collect();
    parallel_rows(&rows, rows_per_task, n, ys, |i, r| {
        chunk_rows(isa, &ws[i], r, &acts, n)
    });
    Ok(())
}

/// Runs `compute(matrix, row range)` (returning `(range rows, n)` outputs) as parallel tasks of
/// `step(rows)` rows over several matrices, and scatters the results into each `ys[i]`
/// `(n, rows[i])`.
pub(crate) fn parallel_rows(
    rows: &[usize],
    step: impl Fn(usize) -> usize,
    n: usize,
    ys: &mut [&mut [f32]],
    compute: impl Fn(usize, Range<usize>) -> Vec<f32> + Sync,
) {
    let tasks: Vec<(usize, Range<usize>)> = rows
        .iter()
        .enumerate()
        .flat_map(|(i, &total)| {
            let step = step(total).max(1);
            (0..total)
                .step_by(step)
                .map(move |r| (i, r..(r + step).min(total)))
        })
        .collect();
    let outs: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|(i, r)| compute(*i, r.clone()))
        .collect();
    // Scatter each matrix's task outputs into its y (n, rows), one token row per parallel task.
    for (i, (&total, y)) in rows.iter().zip(ys.iter_mut()).enumerate() {
        let mine: Vec<&Vec<f32>> = tasks
            .iter()
            .zip(&outs)
            .filter(|((j, _), _)| *j == i)
            .map(|(_, o)| o)
            .collect();
        scatter(&mine, n, total, y);
    }
}

/// Writes per-task outputs, each `(task rows, n)` in row order, into `y (n, rows)`; one token
/// row per parallel task.
pub(crate) fn scatter(outs: &[&Vec<f32>], n: usize, rows: usize, y: &mut [f32]) {
    y.par_chunks_mut(rows).enumerate().for_each(|(t, yrow)| {
        let mut r0 = 0;
        for out in outs {
            let task_rows = out.len() / n;
            for r in 0..task_rows {
                yrow[r0 + r] = out[r * n + t];
            }
            r0 += task_rows;
        }
    });
}

/// `W[rows] · x` for all n activation rows; output `(rows.len(), n)`.
fn chunk_rows(isa: Isa, w: &QMatrix, rows: Range<usize>, acts: &[A8Block], n: usize) -> Vec<f32> {
    let r0 = rows.start;
    let mut out = vec![0f32; rows.len() * n];
    qrows(isa, w, acts, n, rows, |t, r, v| out[(r - r0) * n + t] = v);
    out
}

/// `W[r] · x_t` for every row `r` in `rows` and every activation row `t < n`, handed to
/// `emit(t, r, value)` (single-threaded: the caller splits the rows).
///
/// `acts` holds `n` quantized rows of `w.cols` values each; `rows` must lie within `w.rows`.
pub fn qrows(
    isa: Isa,
    w: &QMatrix,
    acts: &[A8Block],
    n: usize,
    rows: Range<usize>,
    mut emit: impl FnMut(usize, usize, f32),
) {
    let bpr = w.cols / BLOCK; // blocks per row
    let rb = w.row_bytes();
    let row = |r: usize| &w.data[r * rb..(r + 1) * rb];
    let act = |t: usize| -> &[A8Block] { &acts[t * bpr..(t + 1) * bpr] };
    if n < 4 {
        // Decoding: four weight rows per pass over each activation row.
        for t in 0..n {
            let a = act(t);
            let mut r = rows.start;
            while r + 4 <= rows.end {
                let v = dot_rows(
                    isa,
                    w.format,
                    [row(r), row(r + 1), row(r + 2), row(r + 3)],
                    a,
                );
                for (k, v) in v.into_iter().enumerate() {
                    emit(t, r + k, v);
                }
                r += 4;
            }
            while r < rows.end {
                emit(t, r, dot_rows(isa, w.format, [row(r)], a)[0]);
                r += 1;
            }
        }
        return;
    }
    for r in rows {
        let wr = row(r);
        let mut t = 0;
        while t + 8 <= n {
            let v = dot(
                isa,
                w.format,
                wr,
                [
                    act(t),
                    act(t + 1),
                    act(t + 2),
                    act(t + 3),
                    act(t + 4),
                    act(t + 5),
                    act(t + 6),
                    act(t + 7),
                ],
            );
            for (k, v) in v.into_iter().enumerate() {
                emit(t + k, r, v);
            }
            t += 8;
        }
        while t + 4 <= n {
            let v = dot(
                isa,
                w.format,
                wr,
                [act(t), act(t + 1), act(t + 2), act(t + 3)],
            );
            for (k, v) in v.into_iter().enumerate() {
                emit(t + k, r, v);
            }
            t += 4;
        }
        while t < n {
            emit(t, r, dot(isa, w.format, wr, [act(t)])[0]);
            t += 1;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use half::f16;

    pub(crate) struct Rng(pub(crate) u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(crate) fn f(&mut self) -> f32 {
            (self.next() % 20001) as f32 / 10000.0 - 1.0
        }
    }

    /// Random blocks of `format` plus their dequantized values.
    pub(crate) fn random_matrix(
        format: QFormat,
        rows: usize,
        cols: usize,
        rng: &mut Rng,
    ) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = vec![];
        let mut vals = vec![];
        for _ in 0..rows * cols / BLOCK {
            let d = 0.01 + 0.05 * rng.f().abs();
            bytes.extend(f16::from_f32(d).to_le_bytes());
            let d = f16::from_f32(d).to_f32();
            match format {
                QFormat::Q8_0 => {
                    for _ in 0..32 {
                        let q = (rng.next() % 256) as u8 as i8;
                        bytes.push(q as u8);
                        vals.push(d * q as f32);
                    }
                }
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    let m = f16::from_f32(rng.f() * 0.1);
                    if format == QFormat::Q4_1 {
                        bytes.extend(m.to_le_bytes());
                    }
                    let qs: Vec<u8> = (0..16).map(|_| (rng.next() % 256) as u8).collect();
                    let mut block = [0f32; 32];
                    for j in 0..16 {
                        let (lo, hi) = ((qs[j] & 15) as f32, (qs[j] >> 4) as f32);
                        let (a, b) = if format == QFormat::Q4_0 {
                            (d * (lo - 8.0), d * (hi - 8.0))
                        } else {
                            (d * lo + m.to_f32(), d * hi + m.to_f32())
                        };
                        block[j] = a;
                        block[j + 16] = b;
                    }
                    bytes.extend(qs);
                    vals.extend(block);
                }
            }
        }
        (bytes, vals)
    }

    /// Relative tolerance for f32 accumulation-order differences between kernels.
    const KERNEL_REL_TOL: f32 = 1e-5;
    /// Error of 8-bit activation quantization against an f32 matmul, relative to Σ|w·x|.
    const ACT_QUANT_REL_TOL: f32 = 2e-2;

    #[test]
    fn simd_equals_scalar_and_both_approximate_f32() {
        let mut rng = Rng(0x1234_5678);
        for format in [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0] {
            for &(rows, cols, n) in &[(37, 64, 1), (37, 64, 3), (64, 576, 5), (33, 96, 9)] {
                let (bytes, wv) = random_matrix(format, rows, cols, &mut rng);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f()).collect();
                let w = QMatrix {
                    format,
                    rows,
                    cols,
                    data: &bytes,
                };
                let mut ys = vec![0f32; n * rows];
                matmul_with(Isa::Scalar, &w, &x, n, &mut ys).unwrap();
                for which in crate::dot::available() {
                    let mut yf = vec![0f32; n * rows];
                    matmul_with(which, &w, &x, n, &mut yf).unwrap();
                    for t in 0..n {
                        for r in 0..rows {
                            let exact: f32 =
                                (0..cols).map(|c| wv[r * cols + c] * x[t * cols + c]).sum();
                            let mag: f32 = (0..cols)
                                .map(|c| (wv[r * cols + c] * x[t * cols + c]).abs())
                                .sum();
                            let (s, f) = (ys[t * rows + r], yf[t * rows + r]);
                            assert!(
                                (s - f).abs() <= KERNEL_REL_TOL * mag.max(1e-6),
                                "{format:?} {which:?} n={n}: {s} vs {f}"
                            );
                            assert!(
                                (s - exact).abs() <= ACT_QUANT_REL_TOL * mag.max(1e-6),
                                "{format:?} {s} vs exact {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn many_equals_one_at_a_time() {
        let mut rng = Rng(0xABCD);
        let (b1, _) = random_matrix(QFormat::Q4_1, 70, 64, &mut rng);
        let (b2, _) = random_matrix(QFormat::Q8_0, 33, 64, &mut rng);
        let ws = [
            QMatrix {
                format: QFormat::Q4_1,
                rows: 70,
                cols: 64,
                data: &b1,
            },
            QMatrix {
                format: QFormat::Q8_0,
                rows: 33,
                cols: 64,
                data: &b2,
            },
        ];
        for n in [1, 6] {
            let x: Vec<f32> = (0..n * 64).map(|_| rng.f()).collect();
            let (mut y1, mut y2) = (vec![0f32; n * 70], vec![0f32; n * 33]);
            matmul_many(&ws, &x, n, &mut [&mut y1, &mut y2]).unwrap();
            for (w, y) in ws.iter().zip([&y1, &y2]) {
                let mut alone = vec![0f32; n * w.rows];
                matmul(w, &x, n, &mut alone).unwrap();
                assert_eq!(&alone, y);
            }
        }
        let odd = QMatrix {
            format: QFormat::Q8_0,
            rows: 1,
            cols: 32,
            data: &b2[..34],
        };
        let mut y = vec![0f32; 1];
        assert!(matmul_many(
            &[ws[0], odd],
            &[0.0; 64],
            1,
            &mut [&mut vec![0f32; 70], &mut y]
        )
        .is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = QMatrix {
            format: QFormat::Q8_0,
            rows: 2,
            cols: 32,
            data: &[0u8; 68],
        };
        let mut y = vec![0f32; 2];
        assert!(matmul(&w, &[0.0; 31], 1, &mut y).is_err());
        let w = QMatrix {
            format: QFormat::Q8_0,
            rows: 2,
            cols: 32,
            data: &[0u8; 60],
        };
        assert!(matmul(&w, &[0.0; 32], 1, &mut y).is_err());
    }
}
