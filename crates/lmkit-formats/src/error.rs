//! Errors of the format readers and writers; every variant names the file. The underlying
//! error's text is part of each message (`err`), and not also chained as a `source`, so that a
//! report of the whole chain says it once.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// The file is not what it claims to be (bad magic, truncated, out-of-range field).
    #[error("{path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    /// A required metadata key, config field or tensor is missing.
    #[error("{path}: missing {what}")]
    Missing { path: PathBuf, what: String },
    /// A field has the wrong type or an unusable value.
    #[error("{path}: field `{field}`: {why}")]
    Field {
        path: PathBuf,
        field: String,
        why: String,
    },
    #[error("{path}: unsupported: {why}")]
    Unsupported { path: PathBuf, why: String },
    #[error("{path}: invalid JSON: {err}")]
    Json {
        path: PathBuf,
        err: serde_json::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{path}: tensor `{tensor}`: {err}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        err: Box<candle_core::Error>,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub fn corrupt(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            why: why.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
