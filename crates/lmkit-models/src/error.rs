//! Errors of model loading and running.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] lmkit_core::Error),
    #[error(transparent)]
    Format(#[from] lmkit_formats::Error),
    #[error("{path}: unknown architecture `{arch}` (lmkit runs the Llama family: {known})")]
    UnknownArchitecture {
        path: PathBuf,
        arch: String,
        known: String,
    },
    #[error("{path}: bad model config: {why}")]
    Config { path: PathBuf, why: String },
    #[error("{path}: tensor `{tensor}`: expected shape {expected:?}, found {got:?}")]
    TensorShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: not a model: expected a .gguf file or an HF folder with config.json")]
    NotAModel { path: PathBuf },
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },
    #[error("sequence of {needed} tokens exceeds the context length {context}")]
    ContextOverflow { needed: usize, context: usize },
    #[error("{0}")]
    Unsupported(String),
    #[error("KV cache: {0}")]
    Kv(String),
    #[error("token id {id} is out of range for vocabulary size {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
}

impl From<lmkit_core::candle::Error> for Error {
    fn from(e: lmkit_core::candle::Error) -> Self {
        Error::Core(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
