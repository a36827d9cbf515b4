//! Errors of training.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] lmkit_models::Error),
    #[error(transparent)]
    Core(#[from] lmkit_core::Error),
    #[error(transparent)]
    Format(#[from] lmkit_formats::Error),
    #[error("training option `{option}`: {why}")]
    Option { option: String, why: String },
    #[error("training data: {0}")]
    Data(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("training diverged: {0}")]
    Diverged(String),
}

impl From<lmkit_core::candle::Error> for Error {
    fn from(e: lmkit_core::candle::Error) -> Self {
        Error::Core(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
