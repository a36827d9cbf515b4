//! lmkit-generate: sampling, stop rules and streamed generation on any lmkit model.

pub mod error;
pub mod generate;
pub mod sampler;
pub mod stop;

pub use error::{Error, Result};
pub use generate::{generate, FinishReason, GenerateOptions, Generation};
pub use sampler::{Sampler, SamplingParams};
