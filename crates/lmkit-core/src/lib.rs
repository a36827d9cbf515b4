//! lmkit-core: what every other lmkit crate stands on.
//!
//! - [`candle`]: the tensor engine (re-exported so downstream crates use one version);
//! - [`Error`]: the error type of the model-math crates;
//! - [`Linear`]: one linear layer for every weight format (dense f32, quantized GGUF blocks, and
//!   later LoRA, ternary, ...), so a model is written once and quantization lives in the layer;
//! - [`RmsNorm`], [`Embedding`]: the small layers every Llama-family model needs;
//! - [`testing`] (feature `testing`): tolerance helpers for tests.

pub mod attn_softmax;
pub mod block_ops;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda_ops;
pub mod device;
mod elem;
pub mod embed_grad;
pub mod error;
pub mod frozen;
pub mod fused;
pub mod launch;
pub mod linear;
pub mod lora;
pub mod norm;
pub mod sgemm;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod threads;
pub mod xent;

pub use candle_core as candle;
pub use candle_core::quantized::{GgmlDType, QTensor};
pub use candle_core::{DType, Device, Module, Tensor, D};
pub use candle_nn;
pub use error::{Error, Result};
pub use linear::{Embedding, Linear};
pub use lora::{DropoutState, LoraAdapter, LoraDropout};
pub use norm::RmsNorm;
