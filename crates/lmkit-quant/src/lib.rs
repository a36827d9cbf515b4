//! lmkit-quant: post-training quantization of linear layers to lmkit's low-bit format
//! ([`lmkit_kernels::lowbit`]), one method per file behind [`Quantizer`]:
//!
//! - [`rtn`]: round to nearest on a per-row (or per-group) min-max grid;
//! - [`gptq`]: OPTQ/GPTQ, i.e. LDLQ adaptive rounding ([`ldlq`]) with the proxy Hessian;
//! - [`quip`]: QuIP, incoherence processing (randomized Hadamard rotations and a diagonal
//!   rescaling) around LDLQ.
//!
//! [`calibrate`] runs a model over calibration text, accumulates each layer's Hessian
//! ([`hessian`]) and quantizes block by block, each block seeing the outputs of the blocks
//! already quantized.

pub mod calibrate;
pub mod error;
pub mod gptq;
pub mod hessian;
pub mod ldlq;
pub mod quip;
pub mod rtn;

pub use error::{Error, Result};
pub use hessian::Hessian;
pub use lmkit_kernels::{LowBit, LowBitLinear};

/// One weight matrix to quantize: `(rows, cols)` row-major f32.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// HF module name (`model.layers.0.self_attn.q_proj`), for messages and seeds.
    pub name: &'a str,
    pub w: &'a [f32],
    pub rows: usize,
}

/// A quantization method. Layers that read the same input (q/k/v, gate/up) come together,
/// with that input's Hessian, so a method may share work or an input transform among them.
pub trait Quantizer: Sync {
    /// `rtn`, `gptq`, `quip`.
    fn name(&self) -> &'static str;

    fn bits(&self) -> u8;

    /// Whether [`Quantizer::quantize`] needs the input Hessian (calibration).
    fn needs_hessian(&self) -> bool;

    /// Quantizes `targets` (all with `cols` columns) given the mean `E[x xᵀ]` of their input.
    fn quantize(
        &self,
        targets: &[Target],
        cols: usize,
        h: Option<&Hessian>,
    ) -> Result<Vec<LowBitLinear>>;
}

/// Checks a bit width.
pub fn check_bits(bits: u8) -> Result<u8> {
    if (2..=4).contains(&bits) {
        Ok(bits)
    } else {
        Err(Error::Invalid(format!(
            "--bits {bits}: lmkit quantizes to 2, 3 or 4 bits"
        )))
    }
}

pub(crate) fn check_target(t: &Target, cols: usize) -> Result<()> {
    if t.w.len() != t.rows * cols || !cols.is_multiple_of(lmkit_kernels::BLOCK) {
        return Err(Error::Shape {
            op: "quantize",
            why: format!(
                "`{}`: {} values for {} rows of {cols} (columns must be a multiple of {})",
                t.name,
                t.w.len(),
                t.rows,
                lmkit_kernels::BLOCK
            ),
        });
    }
    Ok(())
}
