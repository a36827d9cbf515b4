//! Weights as the decoding kernels read them: dense matrices in place, and GGUF block formats
//! repacked once into quants and f32 scales (layouts in `decode.cu`):
//!
//! ```text
//! Q8_0  block [d: f16][q: 32 × i8]            w = d·q          → q: i8 (n, k),  s = d
//! Q4_1  block [d: f16][m: f16][16 bytes]      w = d·q + m      → q: u8 (n, k/2), s = d, m
//! Q4_0  block [d: f16][16 bytes]              w = d·(q − 8)    → as Q4_1 with m = −8d
//! ```
//!
//! (4-bit element i < 16 of a block is the low nibble of byte i, element i ≥ 16 the high
//! nibble of byte i − 16.)

use half::f16;
use lmkit_core::launch::{kernel_suffix, Launcher};
use lmkit_core::linear::Weight;
use lmkit_core::{Device, GgmlDType, Tensor};
use lmkit_kernels::matmul::QFormat;

use crate::{Error, Result};

/// Weights per block of the GGUF formats taken here.
const BLOCK: usize = 32;

/// A matrix for the kernels: addresses of tensors kept alive by the caller.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Mat {
    /// Dense `(n, k)`; `sfx` names its dtype in the kernels.
    Dense { w: u64, sfx: &'static str },
    /// Repacked quants, scales and (Q4) offsets; `fmt` is `q8_0` or `q4_1`.
    Quant {
        q: u64,
        s: u64,
        m: u64,
        fmt: &'static str,
    },
}

/// A GGUF block format the kernels take, and its block bytes.
fn quant_format(w: &Weight) -> Option<(QFormat, usize)> {
    let f = match w {
        Weight::Quantized(q) => match q.dtype() {
            GgmlDType::Q8_0 => QFormat::Q8_0,
            GgmlDType::Q4_1 => QFormat::Q4_1,
            GgmlDType::Q4_0 => QFormat::Q4_0,
            _ => return None,
        },
        Weight::Packed(p) => p.format,
        _ => return None,
    };
    Some((f, f.block_bytes()))
}

/// Why the kernels cannot read `w`; None when they can.
pub(crate) fn unsupported_weight(w: &Weight) -> Option<String> {
    match w {
        Weight::Dense(t) => kernel_suffix(t.dtype()).err().map(|e| e.to_string()),
        _ if quant_format(w).is_some() => match w.dims2() {
            Ok((_, k)) if k.is_multiple_of(BLOCK) => None,
            Ok((_, k)) => Some(format!("{k} columns, not whole blocks of {BLOCK}")),
            Err(e) => Some(e.to_string()),
        },
        _ => Some(format!(
            "a {} weight (the fused kernels take dense, Q8_0, Q4_0 and Q4_1)",
            w.type_name()
        )),
    }
}

/// `w` on `device` for the kernels; new tensors (repacked quants) go to `keep`.
pub(crate) fn mat(
    w: &Weight,
    launcher: &Launcher,
    device: &Device,
    keep: &mut Vec<Tensor>,
) -> Result<Mat> {
    if let Some(why) = unsupported_weight(w) {
        return Err(Error::Unsupported(format!("fused decoding: {why}")));
    }
    let mut hold = |t: Tensor| -> Result<u64> {
        let p = launcher.ptr(&t)?;
        keep.push(t);
        Ok(p)
    };
    if let Weight::Dense(t) = w {
        let t = t.contiguous()?;
        let sfx = kernel_suffix(t.dtype())?;
        return Ok(Mat::Dense { w: hold(t)?, sfx });
    }
    let (format, _) =
        quant_format(w).ok_or_else(|| Error::Unsupported(format!("a {} weight", w.type_name())))?;
    let (rows, cols) = w.dims2()?;
    let bytes: Vec<u8> = match w {
        Weight::Quantized(q) => q.data().map_err(lmkit_core::Error::from)?.into_owned(),
        Weight::Packed(p) => p.unpack(),
        _ => Vec::new(),
    };
    let r = repack(format, &bytes, rows, cols)?;
    let q = hold(Tensor::from_vec(r.q, rows * r.row_bytes, device)?)?;
    let s = hold(Tensor::from_vec(r.s, rows * cols / BLOCK, device)?)?;
    let (m, fmt) = match r.m {
        Some(m) => (
            hold(Tensor::from_vec(m, rows * cols / BLOCK, device)?)?,
            "q4_1",
        ),
        None => (0, "q8_0"),
    };
    Ok(Mat::Quant { q, s, m, fmt })
}

/// Repacked quants of one matrix.
pub(crate) struct Repacked {
    pub q: Vec<u8>,
    pub row_bytes: usize,
    pub s: Vec<f32>,
    pub m: Option<Vec<f32>>,
}

/// GGUF row-major blocks of a `(rows, cols)` matrix → the kernels' layout.
pub(crate) fn repack(format: QFormat, bytes: &[u8], rows: usize, cols: usize) -> Result<Repacked> {
    let bb = format.block_bytes();
    let blocks = rows * cols / BLOCK;
    if !cols.is_multiple_of(BLOCK) || bytes.len() != blocks * bb {
        return Err(Error::Unsupported(format!(
            "a {format:?} matrix of {rows} × {cols} has {} bytes, expected {}",
            bytes.len(),
            blocks * bb
        )));
    }
    let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let mut s = Vec::with_capacity(blocks);
    match format {
        QFormat::Q8_0 => {
            let mut q = Vec::with_capacity(rows * cols);
            for blk in bytes.chunks_exact(bb) {
                s.push(half(blk, 0));
                q.extend_from_slice(&blk[2..2 + BLOCK]);
            }
            Ok(Repacked {
                q,
                row_bytes: cols,
                s,
                m: None,
            })
        }
        QFormat::Q4_1 | QFormat::Q4_0 => {
            let mut q = Vec::with_capacity(rows * cols / 2);
            let mut m = Vec::with_capacity(blocks);
            for blk in bytes.chunks_exact(bb) {
                let d = half(blk, 0);
                s.push(d);
                let at = if format == QFormat::Q4_1 {
                    m.push(half(blk, 2));
                    4
                } else {
                    m.push(-8.0 * d);
                    2
                };
                q.extend_from_slice(&blk[at..at + BLOCK / 2]);
            }
            Ok(Repacked {
                q,
                row_bytes: cols / 2,
                s,
                m: Some(m),
            })
        }
    }
}
