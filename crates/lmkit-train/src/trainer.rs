//! The training loop, in the shape of nanoGPT's: one loop, commented phases.

use std::time::Instant;

use lmkit_core::candle_nn::loss::cross_entropy;
use lmkit_core::Tensor;
use lmkit_models::Llama;
use serde::{Deserialize, Serialize};

use crate::adamw::{AdamW, AdamWConfig};
use crate::data::{Batches, Sequences};
use crate::loss_scale::{LossScale, LossScaler, Outcome};
use crate::params::Trainable;
use crate::schedule::Schedule;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step (gradients are averaged over them).
    pub accumulate: usize,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this (none if `None`).
    pub clip: Option<f64>,
    /// Evaluate every this many steps (and at the end); 0 never.
    pub eval_every: usize,
    /// Sequences of the evaluation set used per evaluation.
    pub eval_sequences: usize,
    /// Loss scaling ([`crate::loss_scale`]): by default dynamic when the model computes in
    /// f16, off otherwise.
    #[serde(default)]
    pub loss_scale: LossScale,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub lr: f64,
    /// Mean training loss over the step's micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    pub eval_loss: Option<f64>,
    /// The loss scale of the step, when the loss is scaled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Steps skipped (gradients not finite) since the last applied one, retried by this one.
    pub skipped: usize,
}

/// Mean next-token cross-entropy over the targets where `mask (b, t)` is 1 (chat/SFT data:
/// the assistant's tokens), or over all of them without a mask.
pub fn loss_masked(model: &Llama, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    loss_masked_with(model, ids, mask, Some(1.0))
}

/// [`loss_masked`] times `scale`, its gradients computed at that scale (loss scaling:
/// [`crate::loss_scale`]).
pub fn loss_masked_scaled(
    model: &Llama,
    ids: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    loss_masked_with(model, ids, mask, Some(scale))
}

/// [`loss_masked`] times the scale in `grad`; without one, the output layer skips the
/// gradients it would otherwise prepare in its forward pass (evaluation).
fn loss_masked_with(
    model: &Llama,
    ids: &Tensor,
    mask: Option<&Tensor>,
    grad: Option<f64>,
) -> Result<Tensor> {
    let scale = grad.unwrap_or(1.0);
    let scaled = |l: Tensor| -> Result<Tensor> {
        Ok(match scale == 1.0 {
            true => l,
            false => (l * scale)?,
        })
    };
    // A dense output layer without an adapter or bias: the fused, chunked head + loss.
    if let Some(w) = crate::head_loss::dense_head(model) {
        let (b, t1) = ids.dims2()?;
        let t = t1 - 1;
        let h = model.forward_train_hidden(&ids.narrow(1, 0, t)?)?; // (b, t, c)
        let (h, w) = match grad {
            Some(_) => (h, w.clone()),
            None => (h.detach(), w.detach()),
        };
        let w = &w;
        let c = h.dims()[2];
        let targets = ids.narrow(1, 1, t)?.flatten_all()?;
        let weights = match mask {
            Some(m) => Some(m.flatten_all()?),
            None => None,
        };
        return crate::head_loss::output_cross_entropy(
            &h.reshape((b * t, c))?,
            w,
            &targets,
            weights.as_ref(),
            scale,
        );
    }
    let Some(mask) = mask else {
        return scaled(loss(model, ids)?);
    };
    let t = ids.dims2()?.1 - 1;
    let dev = model.device();
    let logits = model.forward_train(&ids.narrow(1, 0, t)?)?; // (b, t, v)
    let logp = lmkit_core::candle_nn::ops::log_softmax(&logits, lmkit_core::D::Minus1)?;
    let targets = ids.narrow(1, 1, t)?.unsqueeze(2)?.to_device(dev)?; // (b, t, 1)
    let nll = logp.gather(&targets.contiguous()?, 2)?.squeeze(2)?.neg()?; // (b, t)
    let mask = mask.to_device(dev)?;
    let count = mask.sum_all()?.maximum(1f32)?;
    scaled((nll * &mask)?.sum_all()?.broadcast_div(&count)?)
}

/// Mean next-token cross-entropy of `ids (b, t + 1)`: inputs `[.., :t]`, targets `[.., 1:]`.
pub fn loss(model: &Llama, ids: &Tensor) -> Result<Tensor> {
    let (b, t1) = ids.dims2()?;
    let t = t1 - 1;
    let logits = model.forward_train(&ids.narrow(1, 0, t)?)?; // (b, t, v)
    let v = logits.dims()[2];
    let targets = ids
        .narrow(1, 1, t)?
        .flatten_all()?
        .to_device(model.device())?;
    Ok(cross_entropy(&logits.reshape((b * t, v))?, &targets)?)
}

/// Mean loss over the first `n` evaluation sequences, in batches of `batch`.
pub fn evaluate(model: &Llama, data: &Sequences, n: usize, batch: usize) -> Result<f64> {
    let (ids, mask) = data.first_masked(n)?;
    let rows = ids.dims()[0];
    let (mut sum, mut count) = (0f64, 0f64);
    for start in (0..rows).step_by(batch.max(1)) {
        let b = batch.min(rows - start);
        let m = match &mask {
            Some(m) => Some(m.narrow(0, start, b)?),
            None => None,
        };
        // Weighted by targets, so the result is the mean over all evaluated targets.
        let w = match &m {
            Some(m) => m.sum_all()?.to_scalar::<f32>()? as f64,
            None => b as f64,
        };
        let l = loss_masked_with(model, &ids.narrow(0, start, b)?, m.as_ref(), None)?;
        sum += l.to_scalar::<f32>()? as f64 * w;
        count += w;
    }
    Ok(sum / count.max(f64::MIN_POSITIVE))
}

/// Per-phase wall time of a step (forward, backward, optimizer), when `LMKIT_STEP_TIMES` is
/// set: each lap waits for the device, so this slows a GPU step down a little; off, it costs
/// nothing. Logged at info level (`-v`).
struct PhaseClock<'a> {
    device: Option<&'a lmkit_core::Device>,
    last: Instant,
    laps: Vec<(&'static str, f64)>,
}

impl<'a> PhaseClock<'a> {
    fn new(device: &'a lmkit_core::Device) -> Self {
        let on = std::env::var_os("LMKIT_STEP_TIMES").is_some();
        Self {
            device: on.then_some(device),
            last: Instant::now(),
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, phase: &'static str) -> Result<()> {
        if let Some(d) = self.device {
            lmkit_core::device::synchronize(d)?;
            let now = Instant::now();
            self.laps.push((phase, (now - self.last).as_secs_f64()));
            self.last = now;
        }
        Ok(())
    }

    fn report(&self, step: usize) {
        if self.device.is_some() {
            let parts: Vec<String> = self
                .laps
                .iter()
                .map(|(p, s)| format!("{p} {:.1} ms", s * 1e3))
                .collect();
            tracing::info!("step {step}: {}", parts.join(", "));
        }
    }
}

/// Turns LoRA dropout off when dropped.
struct DropoutOff(std::sync::Arc<lmkit_core::DropoutState>);

impl Drop for DropoutOff {
    fn drop(&mut self) {
        self.0.eval();
    }
}

/// A training run in progress: the model, its optimizer, and the steps taken.
pub struct Trainer {
    pub t: Trainable,
    pub opt: AdamW,
    pub cfg: TrainConfig,
    pub scaler: LossScaler,
}

impl Trainer {
    pub fn new(t: Trainable, cfg: TrainConfig) -> Result<Self> {
        if cfg.batch == 0 || cfg.accumulate == 0 {
            return Err(Error::Option {
                option: "batch/accumulate".into(),
                why: "must be at least 1".into(),
            });
        }
        let opt = AdamW::new(t.decay_groups(), cfg.adamw)?;
        let f16 = t.model.dtype() == lmkit_core::DType::F16;
        let scaler = LossScaler::new(cfg.loss_scale, f16);
        Ok(Self {
            t,
            opt,
            cfg,
            scaler,
        })
    }

    /// Which backward a step runs: lmkit's own on the CPU or the GPU (with flash or
    /// materialized attention), or candle's autograd.
    pub fn backward_path(&self) -> String {
        let m = &self.t.model;
        let vars: Vec<lmkit_core::candle::Var> =
            self.t.params.iter().map(|(_, v)| v.clone()).collect();
        if crate::body_gpu::wanted(m, &vars) {
            let attn = match crate::body_gpu::uses_flash(m) {
                true => "flash",
                false => "materialized",
            };
            return format!("lmkit's GPU backward ({attn} attention)");
        }
        if std::env::var_os("LMKIT_TRAIN_AUTOGRAD").is_none() && crate::body_cpu::applies(m, &vars)
        {
            return "lmkit's CPU backward".into();
        }
        "candle's autograd".into()
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> usize {
        self.opt.steps()
    }

    /// Runs optimizer steps until `cfg.steps` are done or `until` is reached (whichever is
    /// first); `on_step` sees the trainer, the data (for checkpoints) and every step's log, and
    /// may ask to stop by returning false.
    pub fn run(
        &mut self,
        data: &mut dyn Batches,
        eval: Option<&Sequences>,
        until: usize,
        on_step: &mut dyn FnMut(&Self, &dyn Batches, &StepLog) -> bool,
    ) -> Result<Vec<StepLog>> {
        let cfg = self.cfg.clone();
        let mut logs = Vec::new();
        tracing::info!("backward: {}", self.backward_path());
        if self.scaler.active() {
            tracing::info!("loss scale: {}", self.scaler.scale());
        }
        let mut skipped = 0;
        while self.step() < cfg.steps.min(until) {
            let step = self.step();
            let t0 = Instant::now();
            // 1. Learning rate for this step.
            let lr = cfg.schedule.lr(step);
            // 2. Micro-batches: forward, backward, gradients summed.
            //    Nothing is read back from the device until the step is done.
            let mut grads = crate::accumulate::GradSum::default();
            let (mut loss_sum, mut tokens): (Option<Tensor>, usize) = (None, 0);
            let mut phases = PhaseClock::new(self.t.model.device());
            let scale = self.scaler.scale();
            let dropout = self.t.model.lora_dropout();
            // Dropout is on for this step's micro-batches only, whatever way they end.
            let _off = dropout.as_ref().map(|d| DropoutOff(d.clone()));
            for micro in 0..cfg.accumulate {
                if let Some(d) = &dropout {
                    d.train((step * cfg.accumulate + micro) as u64);
                }
                let (ids, mask) = data.next_batch(cfg.batch)?; // (b, t + 1), (b, t)
                tokens += ids.dims()[0] * (ids.dims()[1] - 1);
                // A dense model runs lmkit's own backward: `body_cpu` (f32 on the CPU) or
                // `body_gpu` (a GPU); anything else candle's autograd.
                let mut lap = |p| phases.lap(p);
                // Each gives the loss times `scale`, with its gradients at that scale.
                let own = match crate::body_gpu::loss_and_grads(
                    &self.t,
                    &ids,
                    mask.as_ref(),
                    scale,
                    &mut lap,
                )? {
                    Some(lg) => Some(lg),
                    None => {
                        crate::body_cpu::loss_and_grads_scaled(&self.t, &ids, mask.as_ref(), scale)?
                    }
                };
                let (l, g) = match own {
                    Some(lg) => lg,
                    None => {
                        let l = loss_masked_scaled(&self.t.model, &ids, mask.as_ref(), scale)?;
                        phases.lap("forward")?;
                        let g = l.backward()?;
                        (l, g)
                    }
                };
                phases.lap("backward")?;
                loss_sum = Some(match loss_sum {
                    Some(s) => (s + l.detach())?,
                    None => l.detach(),
                });
                grads.add(g, &self.t.params)?;
            }
            if let Some(d) = &dropout {
                d.eval();
            }
            let grads = grads
                .into_inner()
                .ok_or_else(|| Error::Data("no micro-batch ran".into()))?;
            // 3. Average over micro-batches and undo the loss scale, then clip the global norm
            //    (on the device).
            // 4. Optimizer step; skipped (on the device) when a gradient is not finite.
            let mean = 1.0 / cfg.accumulate as f64;
            let norm = self.opt.clipped_step(&grads, lr, mean / scale, cfg.clip)?;
            phases.lap("optimizer")?;
            phases.report(self.step());
            let grad_norm = norm.to_scalar::<f32>()? as f64;
            let loss_sum = match loss_sum {
                Some(s) => s.to_scalar::<f32>()? as f64 / scale,
                None => 0.0,
            };
            let outcome = self.scaler.update(grad_norm.is_finite());
            if !grad_norm.is_finite() {
                // Not applied (on the device): not counted, even when the run stops here.
                self.opt.discount_step();
            }
            if outcome? == Outcome::Skipped {
                skipped += 1;
                tracing::info!(
                    "step {}: gradients not finite (loss {loss_sum:.4}); skipped, loss scale now {}",
                    self.step() + 1,
                    self.scaler.scale()
                );
                continue;
            }
            // 5. Evaluate now and then.
            let done = self.step();
            let last = done == cfg.steps;
            let eval_loss = match eval {
                Some(e) if cfg.eval_every > 0 && (done.is_multiple_of(cfg.eval_every) || last) => {
                    Some(evaluate(&self.t.model, e, cfg.eval_sequences, cfg.batch)?)
                }
                _ => None,
            };
            // 6. Log (and let the caller checkpoint).
            let log = StepLog {
                step: done,
                lr,
                loss: loss_sum * mean,
                grad_norm,
                tokens_per_sec: tokens as f64 / t0.elapsed().as_secs_f64(),
                eval_loss,
                loss_scale: self.scaler.active().then_some(scale),
                skipped: std::mem::take(&mut skipped),
            };
            let go_on = on_step(self, data, &log);
            logs.push(log);
            if !go_on {
                break;
            }
        }
        Ok(logs)
    }
}

/// Trains `t` on `data` for `cfg.steps` steps; `on_step` sees every step's log. Returns all
/// logs.
pub fn train(
    t: &mut Trainable,
    data: &mut dyn Batches,
    eval: Option<&Sequences>,
    cfg: &TrainConfig,
    on_step: &mut dyn FnMut(&StepLog),
) -> Result<Vec<StepLog>> {
    let placeholder = Trainable {
        model: t.model.clone(),
        params: t.params.clone(),
    };
    let mut tr = Trainer::new(placeholder, cfg.clone())?;
    tr.run(data, eval, usize::MAX, &mut |_, _, l| {
        on_step(l);
        true
    })
}
