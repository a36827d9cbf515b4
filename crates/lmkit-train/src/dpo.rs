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

use lmkit_core::candle::backprop::GradStore;
use lmkit_core::candle::Var;
use lmkit_core::candle_nn::ops::log_softmax;
use lmkit_core::{DType, Tensor, D};
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

/// `log σ(x) = −log(1 + e^{−x})`, with `x` clamped at −80 inside the exponential and the rest
/// carried by a linear term (below −80, `log σ(x) = x` to f32 precision), so any `x` is finite.
/// The formula is smooth at 0, so autograd gives σ(0) = ½ there, as torch's `logsigmoid` does.
/// (The kinked form `min(x, 0) − log(1 + e^{−|x|})` got 1 at exactly 0, which is where every
/// pair starts: the policy is the reference at DPO's first step.)
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let x = &x.to_dtype(DType::F32)?; // e^{80} overflows f16
    let e = x.maximum(-80f32)?.neg()?.exp()?; // e^{−x}, at most e^{80}
    let tail = (x + 80.0)?.minimum(0f32)?; // x + 80 below −80, else 0
    Ok(((e + 1.0)?.log()?.neg()? + tail)?)
}

/// The DPO loss of a batch of pairs; every argument is `(pairs,)` summed log-probs.
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
) -> Result<DpoOutput> {
    let (loss, stats) = dpo_terms(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta,
    )?;
    Ok(DpoOutput {
        loss,
        metrics: DpoMetrics::read(&stats)?,
    })
}

/// The DPO loss and its metrics as one detached `(7,)` tensor on the same device (in
/// [`DpoMetrics`]' field order), so that a training step reads them back once, after the
/// optimizer's update is queued, instead of waiting for the device before the backward.
fn dpo_terms(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
) -> Result<(Tensor, Tensor)> {
    let r_w = ((policy_chosen - ref_chosen)? * beta)?;
    let r_l = ((policy_rejected - ref_rejected)? * beta)?;
    let margin = (&r_w - &r_l)?;
    let loss = log_sigmoid(&margin)?.mean_all()?.neg()?;
    let (rw, rl) = (r_w.detach(), r_l.detach());
    let mean = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.mean_all()?) };
    let stats = Tensor::stack(
        &[
            loss.detach().to_dtype(DType::F32)?,
            mean(&rw)?,
            mean(&rl)?,
            mean(&rw.gt(&rl)?)?,
            mean(&margin.detach())?,
            mean(&policy_chosen.detach())?,
            mean(&policy_rejected.detach())?,
        ],
        0,
    )?;
    Ok((loss, stats))
}

impl DpoMetrics {
    /// From [`dpo_terms`]' `(7,)` tensor.
    fn read(stats: &Tensor) -> Result<Self> {
        let v = stats.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let [loss, rewards_chosen, rewards_rejected, rewards_accuracies, rewards_margins, logps_chosen, logps_rejected] =
            v[..]
        else {
            return Err(crate::Error::Data(format!(
                "{} DPO metrics, not 7",
                v.len()
            )));
        };
        Ok(Self {
            loss,
            rewards_chosen,
            rewards_rejected,
            rewards_accuracies,
            rewards_margins,
            logps_chosen,
            logps_rejected,
        })
    }
}

/// Summed log-probs of the completion tokens: for `ids (b, t)` and `completion (b, t)` (1 where
/// token `j` belongs to the completion, 0 for the prompt and padding), `Σ_j completion[j] ·
/// log p(ids[j] | ids[..j])`. Differentiable through `model`.
///
/// # Shapes
/// `ids`, `completion`: `(b, t)` → `(b,)`.
pub fn sequence_logps(model: &Llama, ids: &Tensor, completion: &Tensor) -> Result<Tensor> {
    logps(model, ids, completion, true)
}

/// [`sequence_logps`]; without `grad`, the output layer prepares no gradients.
fn logps(model: &Llama, ids: &Tensor, completion: &Tensor, grad: bool) -> Result<Tensor> {
    let t = ids.dims2()?.1;
    let dev = model.device();
    let mask = completion.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?; // (b, t−1)
    let Some(w) = crate::head_loss::dense_head(model) else {
        let logits = model.forward_train(&ids.narrow(1, 0, t - 1)?)?; // (b, t−1, v)
        let logp = log_softmax(&logits, D::Minus1)?;
        let target = ids.narrow(1, 1, t - 1)?.unsqueeze(2)?.to_device(dev)?; // (b, t−1, 1)
        let tok = logp.gather(&target.contiguous()?, 2)?.squeeze(2)?; // (b, t−1)
        return Ok((tok * mask.to_device(dev)?)?.sum(1)?);
    };
    // The fused head on the completion's positions only; each row's sum by index_add.
    let h = model.forward_train_hidden(&ids.narrow(1, 0, t - 1)?)?; // (b, t−1, c)
    let (h, w) = match grad {
        true => (h, w.clone()),
        false => (h.detach(), w.detach()),
    };
    logps_of_hidden(&h, &w, ids, completion)
}

/// [`sequence_logps`] from the final hidden states `h (b, t−1, c)` of `ids[.., :t−1]` and the
/// dense output layer `w (v, c)`.
fn logps_of_hidden(h: &Tensor, w: &Tensor, ids: &Tensor, completion: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let dev = h.device();
    let mask = completion.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?; // (b, t−1)
    let c = h.dims()[2];
    let keep: Vec<u32> = mask
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .enumerate()
        .filter(|(_, &m)| m != 0.0)
        .map(|(i, _)| i as u32)
        .collect();
    if keep.is_empty() {
        return Ok(Tensor::zeros(b, DType::F32, dev)?);
    }
    let row: Vec<u32> = keep.iter().map(|&i| i / (t as u32 - 1)).collect();
    let keep = Tensor::new(keep, dev)?;
    let h = h.reshape((b * (t - 1), c))?.index_select(&keep, 0)?;
    let targets = ids
        .narrow(1, 1, t - 1)?
        .flatten_all()?
        .to_device(dev)?
        .index_select(&keep, 0)?;
    let nll = crate::head_loss::output_nll(&h, w, &targets)?; // (kept,)
    let row = Tensor::new(row, dev)?;
    Ok(Tensor::zeros(b, DType::F32, dev)?.index_add(&row, &nll.neg()?, 0)?)
}

/// Pairs per batch when scoring without training (reference log-probs, evaluation).
const SCORE_PAIRS: usize = 8;

/// Each pair's summed completion log-probs `(chosen, rejected)` under `model`, without
/// training: through [`sequence_logps`] (so the reference and the policy's first step compute
/// the same numbers), in batches of pairs of similar length (less padding).
pub fn pair_logps(
    model: &Llama,
    pairs: &[crate::prefs::TokenPair],
    pad: u32,
) -> Result<Vec<(f32, f32)>> {
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by_key(|&i| pairs[i].chosen.0.len().max(pairs[i].rejected.0.len()));
    let mut out = vec![(0f32, 0f32); pairs.len()];
    for idx in order.chunks(SCORE_PAIRS) {
        let mut seqs: Vec<_> = idx.iter().map(|&i| &pairs[i].chosen).collect();
        seqs.extend(idx.iter().map(|&i| &pairs[i].rejected));
        let (ids, mask) = crate::prefs::pad(&seqs, pad)?;
        let lp = sequence_logps(model, &ids, &mask)?
            .detach()
            .to_vec1::<f32>()?;
        let n = idx.len();
        for (k, &i) in idx.iter().enumerate() {
            out[i] = (lp[k], lp[n + k]);
        }
    }
    Ok(out)
}

/// Options of a DPO run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DpoConfig {
    pub beta: f64,
    pub steps: usize,
    /// Pairs per step.
    pub batch: usize,
    pub schedule: crate::Schedule,
    pub adamw: crate::AdamWConfig,
    pub clip: Option<f64>,
    /// Evaluate on the held-out pairs every this many steps (and at the end); 0 never.
    pub eval_every: usize,
    pub seed: u64,
    /// Loss scaling ([`crate::loss_scale`]): by default dynamic when the policy computes in
    /// f16, off otherwise.
    #[serde(default)]
    pub loss_scale: crate::loss_scale::LossScale,
}

/// One DPO step's log.
#[derive(Debug, Clone, Serialize)]
pub struct DpoLog {
    pub step: usize,
    pub lr: f64,
    pub train: DpoMetrics,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub eval: Option<DpoMetrics>,
    pub seconds: f64,
    /// The loss scale of the step, when the loss is scaled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Steps skipped (gradients not finite) since the last applied one, retried by this one.
    pub skipped: usize,
}

/// Pairs with their reference log-probs `(chosen, rejected)`.
pub struct PrefData {
    pub pairs: Vec<crate::prefs::TokenPair>,
    pub reference: Vec<(f32, f32)>,
}

impl PrefData {
    /// Tokenized pairs and the reference model's log-probs of their responses.
    pub fn new(
        reference_model: &Llama,
        pairs: Vec<crate::prefs::TokenPair>,
        pad: u32,
    ) -> Result<Self> {
        let reference = pair_logps(reference_model, &pairs, pad)?;
        Ok(Self { pairs, reference })
    }

    /// Token ids and completion masks (on the host), and the reference log-probs on `dev`.
    fn batch(
        &self,
        idx: &[usize],
        pad: u32,
        dev: &lmkit_core::Device,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let mut seqs = Vec::with_capacity(2 * idx.len());
        for &i in idx {
            seqs.push(&self.pairs[i].chosen);
        }
        for &i in idx {
            seqs.push(&self.pairs[i].rejected);
        }
        let (ids, mask) = crate::prefs::pad(&seqs, pad)?;
        let rc: Vec<f32> = idx.iter().map(|&i| self.reference[i].0).collect();
        let rr: Vec<f32> = idx.iter().map(|&i| self.reference[i].1).collect();
        Ok((ids, mask, Tensor::new(rc, dev)?, Tensor::new(rr, dev)?))
    }
}

/// The forward pass of lmkit's own backward of the blocks, on the CPU or a GPU.
enum OwnPass<'a> {
    Cpu(crate::body_cpu::Pass<'a>),
    Gpu(crate::body_gpu::Pass),
}

impl OwnPass<'_> {
    fn hidden(&self) -> &Tensor {
        match self {
            OwnPass::Cpu(p) => p.hidden(),
            OwnPass::Gpu(p) => p.hidden(),
        }
    }

    fn backward(self, dh: &Tensor, grads: &mut GradStore) -> Result<()> {
        match self {
            OwnPass::Cpu(p) => p.backward(dh, grads),
            OwnPass::Gpu(p) => p.backward(dh, grads),
        }
    }
}

/// The DPO loss of the pairs `idx` and its gradient for `vars`: through lmkit's own backward
/// of the blocks where it applies ([`crate::body_cpu`], [`crate::body_gpu`]), else candle's
/// autograd.
fn policy_loss_and_grads(
    policy: &Llama,
    vars: &[Var],
    data: &PrefData,
    idx: &[usize],
    (beta, pad): (f64, u32),
    scale: f64,
) -> Result<(Tensor, GradStore)> {
    let (ids, mask, rc, rr) = data.batch(idx, pad, policy.device())?;
    // The loss times `scale` (loss scaling), so that every gradient is computed at that scale.
    let scaled = |l: Tensor| -> Result<Tensor> {
        Ok(match scale == 1.0 {
            true => l,
            false => (l * scale)?,
        })
    };
    let n = idx.len();
    let t = ids.dims2()?.1;
    let head = crate::head_loss::dense_head(policy);
    let pass = match (head, t > 1) {
        (Some(_), true) => {
            let inputs = ids.narrow(1, 0, t - 1)?;
            match crate::body_gpu::forward_on_device(policy, vars, &inputs)? {
                Some(p) => Some(OwnPass::Gpu(p)),
                None => crate::body_cpu::forward(policy, vars, &inputs)?.map(OwnPass::Cpu),
            }
        }
        _ => None,
    };
    let (Some(pass), Some(w)) = (pass, head) else {
        let lp = sequence_logps(policy, &ids, &mask)?; // (2n,): chosen rows, then rejected
        let (loss, stats) = dpo_terms(&lp.narrow(0, 0, n)?, &lp.narrow(0, n, n)?, &rc, &rr, beta)?;
        let grads = scaled(loss)?.backward()?;
        return Ok((stats, grads));
    };
    let lp = logps_of_hidden(pass.hidden(), w, &ids, &mask)?;
    let (loss, stats) = dpo_terms(&lp.narrow(0, 0, n)?, &lp.narrow(0, n, n)?, &rc, &rr, beta)?;
    let mut grads = scaled(loss)?.backward()?;
    // No completion token in the batch: nothing flows back, and no variable gets a gradient
    // (as on the autograd path, so AdamW leaves them alone).
    if let Some(dh) = grads.remove(pass.hidden()) {
        pass.backward(&dh, &mut grads)?;
    }
    Ok((stats, grads))
}

/// DPO metrics of `policy` on every pair of `data` (no gradients kept).
pub fn evaluate(policy: &Llama, data: &PrefData, beta: f64, pad: u32) -> Result<DpoMetrics> {
    let dev = policy.device();
    let (pc, pr): (Vec<f32>, Vec<f32>) = pair_logps(policy, &data.pairs, pad)?.into_iter().unzip();
    let rc: Vec<f32> = data.reference.iter().map(|r| r.0).collect();
    let rr: Vec<f32> = data.reference.iter().map(|r| r.1).collect();
    let t = |v: Vec<f32>| Tensor::new(v, dev);
    Ok(dpo_loss(&t(pc)?, &t(pr)?, &t(rc)?, &t(rr)?, beta)?.metrics)
}

/// Trains the variables `vars` of `policy` (LoRA adapters or all weights) with DPO.
pub fn train(
    policy: &Llama,
    vars: Vec<lmkit_core::candle::Var>,
    data: &PrefData,
    eval: Option<&PrefData>,
    cfg: &DpoConfig,
    pad: u32,
    on_step: &mut dyn FnMut(&DpoLog),
) -> Result<Vec<DpoLog>> {
    if cfg.batch == 0 || data.pairs.is_empty() {
        return Err(crate::Error::Option {
            option: "dpo".into(),
            why: "batch and the data must not be empty".into(),
        });
    }
    let mut opt = crate::AdamW::new(vars.iter().map(|v| (v.clone(), true)).collect(), cfg.adamw)?;
    // A seeded order of the pairs, reshuffled each epoch.
    let mut order: Vec<usize> = Vec::new();
    let mut rng = cfg.seed | 1;
    let mut logs = Vec::with_capacity(cfg.steps);
    let f16 = policy.dtype() == lmkit_core::DType::F16;
    let mut scaler = crate::loss_scale::LossScaler::new(cfg.loss_scale, f16);
    let mut skipped = 0;
    while opt.steps() < cfg.steps {
        let step = opt.steps();
        let t0 = std::time::Instant::now();
        let mut idx = Vec::with_capacity(cfg.batch);
        while idx.len() < cfg.batch {
            if order.is_empty() {
                order = (0..data.pairs.len()).collect();
                for i in (1..order.len()).rev() {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    order.swap(i, (rng % (i as u64 + 1)) as usize);
                }
            }
            idx.extend(order.pop());
        }
        let lr = cfg.schedule.lr(step);
        let dropout = policy.lora_dropout();
        if let Some(d) = &dropout {
            d.train(step as u64);
        }
        let scale = scaler.scale();
        let out = policy_loss_and_grads(policy, &vars, data, &idx, (cfg.beta, pad), scale);
        if let Some(d) = &dropout {
            d.eval();
        }
        let (stats, grads) = out?;
        // Nothing is read back until the update is queued.
        let norm = opt.clipped_step(&grads, lr, 1.0 / scale, cfg.clip)?;
        let train = DpoMetrics::read(&stats)?;
        let grad_norm = norm.to_scalar::<f32>()? as f64;
        // A gradient that is not finite: the update was skipped; the next pairs retry the step.
        let outcome = scaler.update(grad_norm.is_finite());
        if !grad_norm.is_finite() {
            opt.discount_step();
        }
        if outcome? == crate::loss_scale::Outcome::Skipped {
            skipped += 1;
            tracing::info!(
                "DPO step {}: gradients not finite; skipped, loss scale now {}",
                step + 1,
                scaler.scale()
            );
            continue;
        }
        let done = step + 1;
        let eval = match eval {
            Some(e)
                if cfg.eval_every > 0
                    && (done.is_multiple_of(cfg.eval_every) || done == cfg.steps) =>
            {
                Some(evaluate(policy, e, cfg.beta, pad)?)
            }
            _ => None,
        };
        let log = DpoLog {
            step: done,
            lr,
            train,
            grad_norm,
            eval,
            seconds: t0.elapsed().as_secs_f64(),
            loss_scale: scaler.active().then_some(scale),
            skipped: std::mem::take(&mut skipped),
        };
        on_step(&log);
        logs.push(log);
    }
    Ok(logs)
}
