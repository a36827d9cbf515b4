//! lmkit-eval: perplexity (and, later, the benchmark harness, probes and analyses).

pub mod error;
pub mod perplexity;

pub use error::{Error, Result};
pub use perplexity::{perplexity, PplOptions, PplReport};
