//! lmkit-generate: sampling, stop rules and streamed generation on any lmkit model.

pub mod engine;
pub mod error;
pub mod generate;
pub mod h2o;
pub mod kv;
pub mod sampler;
pub mod stop;

pub use error::{Error, NonFinite, Result};
pub use generate::{generate, FinishReason, GenerateOptions, Generation};
pub use kv::{Budget, KvPolicy};
pub use sampler::{Sampler, SamplingParams};
