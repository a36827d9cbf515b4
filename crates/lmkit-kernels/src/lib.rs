//! lmkit-kernels: lmkit's own CPU hot paths for block-quantized weights.
//!
//! Formats (GGUF block layouts, 32 weights per block):
//! - `Q4_0`: `d: f16, qs: [u8; 16]`, `w = d·(q − 8)`;
//! - `Q4_1`: `d: f16, m: f16, qs: [u8; 16]`, `w = d·q + m`;
//! - `Q8_0`: `d: f16, qs: [i8; 32]`, `w = d·q`.
//!
//! In 4-bit blocks, byte `j` holds weight `j` in its low nibble and weight `j + 16` in its high
//! nibble. Activations are quantized per 32-block to 8 bits ([`A8Block`]: `x ≈ d·q`), so every
//! block dot product is an exact integer sum times float scales:
//! - `Q4_0 · A8 = d_w·d_a·(Σ q_w q_a − 8 Σ q_a)`
//! - `Q4_1 · A8 = d_w·d_a·Σ q_w q_a + m_w·d_a·Σ q_a`
//! - `Q8_0 · A8 = d_w·d_a·Σ q_w q_a`
//!
//! GGUF `Q4_K`, `Q5_K` and `Q6_K` (256-weight super-blocks, a scale per 32 or 16 weights) have
//! their own layouts and kernels ([`q4k_q5k`], [`q6k`], one type for all: [`KQuant`]), with the
//! same exact integer sums.
//!
//! Dense f32/f16/bf16 weights ([`dense`]), attention ([`attn`]), row ops ([`ops`]) and a spinning
//! thread team for whole forward passes ([`team`]) complete the CPU path.
//!
//! Every kernel has a scalar reference; SIMD versions (AVX2 on x86-64) are chosen at run time
//! and can be turned off with `LMKIT_FORCE_SCALAR=1`.

pub mod act;
pub mod attn;
pub mod convert;
pub mod dense;
pub mod dot;
pub mod gemm;
pub mod groups;
pub mod hadamard;
pub mod kquant;
pub mod lowbit;
pub mod lowbit_lanes;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod q4k_q5k;
pub mod q6k;
pub mod roofline;
pub mod team;
pub mod weight;

pub use act::{quantize_activations, A8Block};
pub use dense::Dense;
pub use dot::{isa, Isa};
pub use hadamard::{Hadamard, Rotation};
pub use kquant::KQuant;
pub use lowbit::{LowBit, LowBitLinear};
pub use matmul::{matmul, QFormat, QMatrix};
pub use packed::Packed;
pub use q4k_q5k::{Q4K, Q5K};
pub use q6k::Q6K;
pub use weight::WeightView;

/// Weights per block in every format here.
pub const BLOCK: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {why}")]
    Shape { op: &'static str, why: String },
}

pub type Result<T> = std::result::Result<T, Error>;
