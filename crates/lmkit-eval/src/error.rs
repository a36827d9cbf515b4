//! Errors of evaluation.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] lmkit_models::Error),
    /// Boxed: generation errors are large and rare.
    #[error(transparent)]
    Generate(Box<lmkit_generate::Error>),
    #[error("invalid option `{option}`: {why}")]
    Option { option: String, why: String },
    #[error("{0}")]
    Data(String),
    #[error("task `{task}`: {why}")]
    Task { task: String, why: String },
    #[error("{at}: the model's log-likelihood is NaN or infinite: its weights may hold such values (`lmkit info --check` scans them) or its activations overflowed (try --dtype f32)")]
    NonFinite { at: String },
    #[error("the text has {tokens} tokens, fewer than one window of {ctx}; use a longer text or a smaller --ctx")]
    TooShort { tokens: usize, ctx: usize },
}

impl From<lmkit_core::candle::Error> for Error {
    fn from(e: lmkit_core::candle::Error) -> Self {
        Error::Model(e.into())
    }
}

impl From<lmkit_generate::Error> for Error {
    fn from(e: lmkit_generate::Error) -> Self {
        Error::Generate(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, Error>;
