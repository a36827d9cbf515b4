//! Errors of generation.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] lmkit_models::Error),
    #[error(transparent)]
    Format(#[from] lmkit_formats::Error),
    #[error("invalid sampling option `{option}`: {why}")]
    Option { option: String, why: String },
    #[error("the prompt has {prompt} tokens and asks for {new} more, but the context is {context} tokens; shorten the prompt, lower max tokens, or allow truncation")]
    PromptTooLong {
        prompt: usize,
        new: usize,
        context: usize,
    },
    #[error("KV cache: {0}")]
    Kv(String),
    #[error("empty prompt: nothing to condition on")]
    EmptyPrompt,
}

impl From<lmkit_core::candle::Error> for Error {
    fn from(e: lmkit_core::candle::Error) -> Self {
        Error::Model(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
