//! One borrowed weight matrix in any format with a kernel, and its row-range product.

use std::ops::Range;

use crate::act::A8Block;
use crate::dense::{self, Dense};
use crate::dot::Isa;
use crate::groups::GROUP;
use crate::kquant::KQuant;
use crate::lowbit::{lowbit_rows, LowBit};
use crate::matmul::{qrows, QMatrix};
use crate::packed::{packed_rows, Packed};
use crate::{Error, Result, BLOCK};

/// A borrowed `(rows, cols)` weight matrix.
#[derive(Debug, Clone, Copy)]
pub enum WeightView<'a> {
    /// Block-quantized, GGUF row-major; runs against 8-bit quantized activations.
    Quant(QMatrix<'a>),
    /// Block-quantized, rows interleaved (see [`crate::packed`]).
    Packed(&'a Packed),
    /// GGUF `Q4_K`/`Q5_K`/`Q6_K`, rows interleaved (see [`crate::kquant`]).
    KQuant(&'a KQuant),
    /// 2–4-bit codes with per-group affine scales ([`crate::lowbit`]); 8-bit activations.
    LowBit(&'a LowBit),
    /// f32 or f16; runs against f32 activations.
    Dense {
        w: Dense<'a>,
        rows: usize,
        cols: usize,
    },
}

impl WeightView<'_> {
    pub fn rows(&self) -> usize {
        match self {
            WeightView::Quant(q) => q.rows,
            WeightView::Packed(p) => p.rows,
            WeightView::KQuant(w) => w.rows(),
            WeightView::LowBit(w) => w.rows,
            WeightView::Dense { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            WeightView::Quant(q) => q.cols,
            WeightView::Packed(p) => p.cols,
            WeightView::KQuant(w) => w.cols(),
            WeightView::LowBit(w) => w.cols,
            WeightView::Dense { cols, .. } => *cols,
        }
    }

    /// Whether the input must be quantized to [`A8Block`]s first.
    pub fn wants_blocks(&self) -> bool {
        matches!(
            self,
            WeightView::Quant(_)
                | WeightView::Packed(_)
                | WeightView::KQuant(_)
                | WeightView::LowBit(_)
        )
    }

    /// Checks that the storage holds `rows × cols` values (and whole blocks).
    pub fn check(&self) -> Result<()> {
        let (rows, cols) = (self.rows(), self.cols());
        let ok = match self {
            WeightView::Quant(q) => {
                cols.is_multiple_of(BLOCK) && q.data.len() == rows * q.row_bytes()
            }
            WeightView::Packed(_) => true, // checked by `Packed::pack`
            WeightView::KQuant(_) => true, // checked when packed
            WeightView::LowBit(_) => true, // checked by `LowBit::new`
            WeightView::Dense { w, .. } => w.len() == rows * cols,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Shape {
                op: "weight",
                why: format!("storage does not hold a {rows}x{cols} matrix"),
            })
        }
    }

    /// `W[r] · x_t` for `r` in `rows`, `t < n`, handed to `emit(t, r, value)`. Quantized
    /// weights read `acts` (`n` rows of `cols / 32` blocks), dense ones read `x` (`(n, cols)`).
    pub fn rows_into(
        &self,
        isa: Isa,
        x: &[f32],
        acts: &[A8Block],
        n: usize,
        rows: Range<usize>,
        emit: impl FnMut(usize, usize, f32),
    ) {
        match self {
            WeightView::Quant(q) => qrows(isa, q, acts, n, rows, emit),
            WeightView::Packed(p) => packed_rows(isa, p, acts, n, rows, emit),
            WeightView::KQuant(w) => w.rows_into(isa, acts, n, rows, emit),
            WeightView::LowBit(w) => lowbit_rows(isa, w, acts, n, rows, emit),
            WeightView::Dense { w, cols, .. } => dense::rows(isa, *w, *cols, x, n, rows, emit),
        }
    }
}

/// Several matrices applied to the same input `x (n, cols)` in one parallel pass on rayon's
/// pool, the activations quantized once; `ys[i]` is `(n, ws[i].rows())`. Tasks start on row
/// group boundaries, so the interleaved formats run their SIMD kernels throughout.
pub fn matmul_many(ws: &[WeightView], x: &[f32], n: usize, ys: &mut [&mut [f32]]) -> Result<()> {
    let bad = |why: String| Err(Error::Shape { op: "matmul", why });
    if ws.is_empty() || ws.len() != ys.len() {
        return bad(format!("{} matrices, {} outputs", ws.len(), ys.len()));
    }
    let cols = ws[0].cols();
    for (w, y) in ws.iter().zip(ys.iter()) {
        w.check()?;
        if w.cols() != cols || x.len() != n * cols || y.len() != n * w.rows() {
            return bad(format!(
                "x has {} values, y {} for n={n}, W {}x{} (shared input of {cols})",
                x.len(),
                y.len(),
                w.rows(),
                w.cols()
            ));
        }
    }
    let isa = crate::dot::isa();
    let mut acts = Vec::new();
    if ws.iter().any(WeightView::wants_blocks) {
        crate::act::quantize_activations(x, &mut acts);
    }
    let per = |rows: usize| {
        (rows.div_ceil(rayon::current_num_threads().max(1) * 8))
            .next_multiple_of(GROUP)
            .max(4 * GROUP)
    };
    let rows: Vec<usize> = ws.iter().map(WeightView::rows).collect();
    crate::matmul::parallel_rows(&rows, per, n, ys, |i, r| {
        let r0 = r.start;
        let mut out = vec![0f32; r.len() * n];
        ws[i].rows_into(isa, x, &acts, n, r, |t, row, v| out[(row - r0) * n + t] = v);
        out
    });
    Ok(())
}
