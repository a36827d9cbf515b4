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
    #[error("{0}")]
    NonFinite(NonFinite),
}

/// Logits that hold NaN or infinite values: the model is broken (a NaN weight) or overflowed
/// (f16 activations), and no token can be drawn from them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the model's logits at position {position} are NaN or infinite ({count} of {vocab}): its weights may hold such values (`lmkit info --check` scans them) or its activations overflowed (try --dtype f32)")]
pub struct NonFinite {
    pub position: usize,
    pub count: usize,
    pub vocab: usize,
}

impl NonFinite {
    /// `Err` when some logit of the row at `position` is NaN or infinite.
    pub fn check(logits: &[f32], position: usize) -> std::result::Result<(), NonFinite> {
        // All exponent bits set means NaN or ±∞; the integer max vectorizes, so the check of
        // a 49,152-wide row costs a few µs per token.
        const EXP: u32 = 0x7f80_0000;
        if logits.iter().map(|x| x.to_bits() & EXP).max().unwrap_or(0) != EXP {
            return Ok(());
        }
        match logits.iter().filter(|x| !x.is_finite()).count() {
            0 => Ok(()),
            count => Err(NonFinite {
                position,
                count,
                vocab: logits.len(),
            }),
        }
    }
}

impl From<lmkit_core::candle::Error> for Error {
    fn from(e: lmkit_core::candle::Error) -> Self {
        Error::Model(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::NonFinite;

    #[test]
    fn non_finite_logits_are_found_and_counted() {
        let mut row = vec![0.5f32; 1000];
        row[3] = f32::MAX;
        row[4] = -f32::MAX;
        row[5] = f32::MIN_POSITIVE / 4.0; // subnormal
        assert_eq!(NonFinite::check(&row, 7), Ok(()));
        assert_eq!(NonFinite::check(&[], 0), Ok(()));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut r = row.clone();
            r[999] = bad;
            r[0] = bad;
            let e = NonFinite::check(&r, 7).unwrap_err();
            assert_eq!((e.position, e.count, e.vocab), (7, 2, 1000));
            assert!(e.to_string().contains("lmkit info --check"), "{e}");
        }
    }
}
