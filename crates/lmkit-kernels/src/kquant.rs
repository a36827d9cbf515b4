//! GGUF K-quant matrices with kernels of their own (`Q4_K` and `Q5_K` in [`crate::q4k_q5k`],
//! `Q6_K` in [`crate::q6k`]), as one type for the layers that hold them. Both keep the file's values
//! exactly ([`KQuant::unpack`] gives back its bytes) and run against 8-bit activations.

use std::ops::Range;

use crate::act::A8Block;
use crate::dot::Isa;
use crate::q4k_q5k::{affine_k_rows, Q4K, Q5K};
use crate::q6k::{q6k_rows, Q6K};

/// A K-quant `(rows, cols)` matrix, rows interleaved for its kernel.
#[derive(Debug, Clone)]
pub enum KQuant {
    Q4K(Q4K),
    Q5K(Q5K),
    Q6K(Q6K),
}

impl KQuant {
    pub fn rows(&self) -> usize {
        match self {
            KQuant::Q4K(w) => w.rows(),
            KQuant::Q5K(w) => w.rows(),
            KQuant::Q6K(w) => w.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            KQuant::Q4K(w) => w.cols(),
            KQuant::Q5K(w) => w.cols(),
            KQuant::Q6K(w) => w.cols(),
        }
    }

    /// The GGUF type name (`Q4_K`, `Q5_K`, `Q6_K`).
    pub fn type_name(&self) -> &'static str {
        match self {
            KQuant::Q4K(w) => w.type_name(),
            KQuant::Q5K(w) => w.type_name(),
            KQuant::Q6K(_) => "Q6_K",
        }
    }

    /// Bytes held (including padding rows).
    pub fn size_in_bytes(&self) -> usize {
        match self {
            KQuant::Q4K(w) => w.size_in_bytes(),
            KQuant::Q5K(w) => w.size_in_bytes(),
            KQuant::Q6K(w) => w.size_in_bytes(),
        }
    }

    /// The GGUF row-major bytes.
    pub fn unpack(&self) -> Vec<u8> {
        match self {
            KQuant::Q4K(w) => w.unpack(),
            KQuant::Q5K(w) => w.unpack(),
            KQuant::Q6K(w) => w.unpack(),
        }
    }

    /// Row `r` dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match self {
            KQuant::Q4K(w) => w.dequantize_row(r, out),
            KQuant::Q5K(w) => w.dequantize_row(r, out),
            KQuant::Q6K(w) => w.dequantize_row(r, out),
        }
    }

    /// `W[r] · x_t` for `r` in `rows`, `t < n`, handed to `emit(t, r, value)`; `acts` holds
    /// `n` rows of `cols / 32` blocks.
    pub fn rows_into(
        &self,
        isa: Isa,
        acts: &[A8Block],
        n: usize,
        rows: Range<usize>,
        emit: impl FnMut(usize, usize, f32),
    ) {
        match self {
            KQuant::Q4K(w) => affine_k_rows(isa, w, acts, n, rows, emit),
            KQuant::Q5K(w) => affine_k_rows(isa, w, acts, n, rows, emit),
            KQuant::Q6K(w) => q6k_rows(isa, w, acts, n, rows, emit),
        }
    }
}
