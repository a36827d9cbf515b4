//! Errors of lmkit-quant.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {why}")]
    Shape { op: &'static str, why: String },
    #[error("{what}: the Hessian is not positive definite (pivot {pivot} at column {col}); raise the damping")]
    NotPositiveDefinite {
        what: String,
        col: usize,
        pivot: f64,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Kernels(#[from] lmkit_kernels::Error),
    #[error(transparent)]
    Core(#[from] lmkit_core::Error),
    #[error(transparent)]
    Model(#[from] lmkit_models::Error),
    #[error(transparent)]
    Candle(#[from] lmkit_core::candle::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
