//! lmkit-data: what to train on.
//!
//! - [`scaling`]: the data-constrained scaling law of Muennighoff et al. (NeurIPS 2023): loss
//!   for a model size, a token budget and a unique-data budget; the compute-optimal allocation
//!   under repetition; refitting its constants to one's own runs.

pub mod error;
pub mod scaling;

pub use error::{Error, Result};
