//! The error type of lmkit's model-math crates.

/// Errors raised by tensor math, layers and models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from the tensor engine, with the op that raised it.
    #[error("{op}: {source}")]
    Candle {
        op: String,
        #[source]
        source: candle_core::Error,
    },
    /// Two tensors or a tensor and a layer disagree on shape.
    #[error("{op}: shape mismatch: expected {expected}, got {got}")]
    Shape {
        op: String,
        expected: String,
        got: String,
    },
    /// An option or an input value outside its valid range.
    #[error("invalid {what}: {why}")]
    Invalid { what: String, why: String },
    /// A weight format this build cannot run.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl From<candle_core::Error> for Error {
    fn from(source: candle_core::Error) -> Self {
        Error::Candle {
            op: "tensor op".into(),
            source,
        }
    }
}

/// Adds the name of the op to a candle error.
pub trait OpContext<T> {
    fn op(self, op: &str) -> Result<T>;
}

impl<T> OpContext<T> for std::result::Result<T, candle_core::Error> {
    fn op(self, op: &str) -> Result<T> {
        self.map_err(|source| Error::Candle {
            op: op.to_string(),
            source,
        })
    }
}

pub type Result<T> = std::result::Result<T, Error>;
