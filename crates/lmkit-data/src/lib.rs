//! lmkit-data: what to train on.
//!
//! - [`corpus`]: text/JSONL files (plain or gzip) and folders read as streams of records;
//! - [`doremi`]: DoReMi's Group-DRO domain reweighting (Xie et al., NeurIPS 2023): the
//!   weight update from per-token excess losses, their running mean, the proxy's token weights;
//! - [`dsir`]: DSIR importance resampling (Xie et al., NeurIPS 2023): hashed n-gram features,
//!   importance weights against a target, Gumbel top-k selection, the KL-reduction metric;
//! - [`scaling`]: the data-constrained scaling law of Muennighoff et al. (NeurIPS 2023): loss
//!   for a model size, a token budget and a unique-data budget; the compute-optimal allocation
//!   under repetition; refitting its constants to one's own runs.

pub mod corpus;
pub mod doremi;
pub mod dsir;
pub mod error;
#[cfg(feature = "parquet")]
pub mod parquet;
pub mod scaling;
pub mod zst;

pub use error::{Error, Result};
