//! DPO: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a
//! Reward Model" (NeurIPS 2023, arXiv 2305.18290; reference code
//! eric-mitchell/direct-preference-optimization).
//!
//! For a prompt `x` with a chosen `y_w` and a rejected `y_l` completion, policy `π_θ` and frozen
//! reference `π_ref` (log-probs summed over the completion's tokens):
//! ```text
//! r_w = β (log π_θ(y_w|x) − log π_ref(y_w|x))      implicit rewards
//! r_l = β (log π_θ(y_l|x) − log π_ref(y_l|x))
//! L   = −mean log σ(r_w − r_l)                      (Eq. 7)
//! ```
//! Logged as TRL's `DPOTrainer` logs them: mean `r_w` and `r_l`, reward accuracy
//! `mean[r_w > r_l]`, margin `mean(r_w − r_l)`, mean policy log-probs.
//!
//! Deviations: none in the loss (the `sigmoid` loss type, no label smoothing); the other loss
//! variants TRL offers (IPO, hinge, robust, …) are not implemented yet.

use lmkit_core::candle_nn::ops::log_softmax;
use lmkit_core::{Tensor, D};
use lmkit_models::Llama;
use serde::Serialize;

use crate::Result;

/// The loss tensor (differentiable through the policy log-probs) and the logged metrics.
pub struct DpoOutput {
    pub loss: Tensor,
    pub metrics: DpoMetrics,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DpoMetrics {
    pub loss: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

/// `log σ(x) = min(x, 0) − log(1 + e^{−|x|})`, stable for any `x`.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0f32)? - soft)?)
}

fn mean(t: &Tensor) -> Result<f64> {
    Ok(t.mean_all()?
        .to_dtype(lmkit_core::DType::F64)?
        .to_scalar::<f64>()?)
}

/// The DPO loss of a batch of pairs; every argument is `(pairs,)` summed log-probs.
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
) -> Result<DpoOutput> {
    let r_w = ((policy_chosen - ref_chosen)? * beta)?;
    let r_l = ((policy_rejected - ref_rejected)? * beta)?;
    let margin = (&r_w - &r_l)?;
    let loss = log_sigmoid(&margin)?.mean_all()?.neg()?;
    let (rw, rl) = (r_w.detach(), r_l.detach());
    let metrics = DpoMetrics {
        loss: loss.to_dtype(lmkit_core::DType::F64)?.to_scalar::<f64>()?,
        rewards_chosen: mean(&rw)?,
        rewards_rejected: mean(&rl)?,
        rewards_accuracies: mean(&rw.gt(&rl)?.to_dtype(lmkit_core::DType::F32)?)?,
        rewards_margins: mean(&margin.detach())?,
        logps_chosen: mean(&policy_chosen.detach())?,
        logps_rejected: mean(&policy_rejected.detach())?,
    };
    Ok(DpoOutput { loss, metrics })
}

/// Summed log-probs of the completion tokens: for `ids (b, t)` and `completion (b, t)` (1 where
/// token `j` belongs to the completion, 0 for the prompt and padding), `Σ_j completion[j] ·
/// log p(ids[j] | ids[..j])`. Differentiable through `model`.
///
/// # Shapes
/// `ids`, `completion`: `(b, t)` → `(b,)`.
pub fn sequence_logps(model: &Llama, ids: &Tensor, completion: &Tensor) -> Result<Tensor> {
    let (_, t) = ids.dims2()?;
    let logits = model.forward_train(&ids.narrow(1, 0, t - 1)?)?; // (b, t−1, v)
    let logp = log_softmax(&logits, D::Minus1)?;
    let target = ids.narrow(1, 1, t - 1)?.unsqueeze(2)?; // (b, t−1, 1)
    let tok = logp.gather(&target.contiguous()?, 2)?.squeeze(2)?; // (b, t−1)
    let mask = completion
        .narrow(1, 1, t - 1)?
        .to_dtype(lmkit_core::DType::F32)?;
    Ok((tok * mask)?.sum(1)?)
}
