//! A scan of a model's weights for values that are not finite (NaN, ±∞), as llama.cpp's
//! `--check-tensors` does: such a weight makes every logit NaN, which generation and
//! perplexity report without knowing where it came from (`lmkit info --check` names it).

use lmkit_core::DType;

use crate::{Llama, Result};

/// A weight that holds values that are not finite.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BadTensor {
    /// Its HF name.
    pub name: String,
    /// How many of its values are NaN or infinite.
    pub non_finite: usize,
    /// How many values it has.
    pub values: usize,
}

/// Every matrix and vector of `model` (quantized ones dequantized, one at a time) checked for
/// NaN and infinite values; `progress(done, total)` after each. Empty when all are finite.
pub fn non_finite_weights(
    model: &Llama,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<BadTensor>> {
    let matrices = model.named_weights();
    let vectors = model.named_vectors();
    let total = matrices.len() + vectors.len();
    let mut bad = Vec::new();
    let mut check = |name: &str, t: lmkit_core::candle::Tensor| -> Result<()> {
        let v = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())?;
        let non_finite = v.iter().filter(|x| !x.is_finite()).count();
        if non_finite > 0 {
            bad.push(BadTensor {
                name: name.to_string(),
                non_finite,
                values: v.len(),
            });
        }
        Ok(())
    };
    for (i, (name, w)) in matrices.iter().enumerate() {
        check(name, w.to_f32()?)?;
        progress(i + 1, total);
    }
    for (i, (name, t)) in vectors.iter().enumerate() {
        check(name, (*t).clone())?;
        progress(matrices.len() + i + 1, total);
    }
    Ok(bad)
}
