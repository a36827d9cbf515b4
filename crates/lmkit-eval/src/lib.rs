//! lmkit-eval: perplexity and the benchmark harness (tasks as data, log-likelihood scoring as
//! lm-evaluation-harness does it).

pub mod arithmetic;
pub mod error;
pub mod generation;
pub mod harness;
pub mod kv_perplexity;
pub mod loglik;
pub mod perplexity;
pub mod task;
pub mod tokenizer_parity;

pub use error::{Error, Result};
pub use kv_perplexity::{kv_perplexity, KvPplOptions, KvPplReport};
pub use perplexity::{perplexity, PplOptions, PplReport};
