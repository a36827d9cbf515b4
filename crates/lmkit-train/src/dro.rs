//! DoReMi's proxy training as a source of batches (the weight update itself is
//! `lmkit_data::doremi`; Xie et al., NeurIPS 2023, arXiv 2305.10429).
//!
//! Each batch comes from a [`Mixture`] of the domains (the reference mixture, uniform by
//! default). Before the batch goes to the trainer, the proxy (sharing its weights with the
//! model being trained) and the fixed reference model score every token without a graph; the
//! excess losses `ℓ_proxy − ℓ_ref` update the domain weights α, and the batch's token weights
//! become `α_{d(t)}`, scaled so that the trainer's weighted mean cross-entropy is
//! `Σ_t α_{d(t)} ℓ_t / Σ_t α_{d(t)}`: the proxy's Group-DRO objective.
//!
//! With [`DroBatches::update_every`] `K > 1` the excess losses of `K` batches are pooled into
//! one weight update (a larger effective batch for λ, as the paper's proxy sees 512 times more
//! tokens per update than a small CPU run); the token weights use the latest α throughout.
//!
//! Deviations: the proxy's per-token losses come from a separate forward pass without a graph
//! (one more forward per step than the reference code, which reuses the training forward).
//! The DRO state is not checkpointed: a resumed run starts its weights over.

use lmkit_core::{Device, Tensor};
use lmkit_data::doremi::DomainWeights;
use lmkit_models::Llama;

use crate::data::{Batches, DataPosition};
use crate::head_loss::{dense_head, output_nll};
use crate::mixture::Mixture;
use crate::{Error, Result};

pub struct DroBatches {
    mix: Mixture,
    proxy: Llama,
    reference: Llama,
    pub weights: DomainWeights,
    /// The weights α after each update, and the excess losses λ that made them.
    pub history: Vec<(Vec<f64>, Vec<f64>)>,
    every: usize,
    batches: usize,
    pending: (Vec<f32>, Vec<usize>),
}

impl DroBatches {
    /// `proxy` must share its weights with the model the trainer updates (a clone of it).
    pub fn new(
        mix: Mixture,
        proxy: Llama,
        reference: Llama,
        eta: f64,
        smoothing: f64,
    ) -> Result<Self> {
        let k = mix.names().len();
        let weights =
            DomainWeights::uniform(k, eta, smoothing).map_err(|e| Error::Data(e.to_string()))?;
        Ok(Self {
            mix,
            proxy,
            reference,
            weights,
            history: Vec::new(),
            every: 1,
            batches: 0,
            pending: (Vec::new(), Vec::new()),
        })
    }

    /// Pools the excess losses of `k ≥ 1` batches into each weight update (1: every batch, as
    /// the paper).
    pub fn update_every(mut self, k: usize) -> Result<Self> {
        if k == 0 {
            return Err(Error::Data("DoReMi: update every 0 batches".into()));
        }
        self.every = k;
        Ok(self)
    }

    pub fn names(&self) -> &[String] {
        self.mix.names()
    }
}

/// Each position's next-token loss of `ids (b, t + 1)` under `model`, without a graph,
/// `(b·t)` values in row order.
pub fn token_losses(model: &Llama, ids: &Tensor) -> Result<Vec<f32>> {
    let (b, t1) = ids.dims2()?;
    let t = t1 - 1;
    let inp = ids.narrow(1, 0, t)?;
    let tgt = ids.narrow(1, 1, t)?.flatten_all()?;
    let h = model.forward_train_hidden(&inp)?.detach();
    let c = h.dim(2)?;
    let h = h.reshape((b * t, c))?;
    let w = dense_head(model)
        .ok_or_else(|| Error::Data("DoReMi needs a plain output layer (no adapter)".into()))?
        .detach();
    Ok(output_nll(&h, &w, &tgt)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?)
}

impl Batches for DroBatches {
    fn next_batch(&mut self, b: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (ids, mask, domains) = self.mix.batch_masked(b)?;
        let (rows, t1) = ids.dims2()?;
        let t = t1 - 1;
        let lp = token_losses(&self.proxy, &ids)?;
        let lr = token_losses(&self.reference, &ids)?;
        let keep: Vec<f32> = match &mask {
            Some(m) => m.flatten_all()?.to_vec1::<f32>()?,
            None => vec![1.0; rows * t],
        };
        let dom: Vec<usize> = domains
            .iter()
            .flat_map(|&d| std::iter::repeat_n(d, t))
            .collect();
        for i in 0..rows * t {
            if keep[i] > 0.0 {
                self.pending.0.push(lp[i] - lr[i]);
                self.pending.1.push(dom[i]);
            }
        }
        self.batches += 1;
        if self.batches.is_multiple_of(self.every) {
            let (excess, which) = std::mem::take(&mut self.pending);
            self.weights
                .update(&excess, &which)
                .map_err(|e| Error::Data(e.to_string()))?;
            self.history
                .push((self.weights.weights.clone(), self.weights.scores.clone()));
        }
        // Token weights α_{d(t)} over the kept tokens, scaled to sum to their count.
        let alpha = self
            .weights
            .token_weights(&dom)
            .map_err(|e| Error::Data(e.to_string()))?;
        let kept: f32 = keep.iter().sum();
        let total: f32 = alpha.iter().zip(&keep).map(|(a, k)| a * k).sum();
        let scale = if total > 0.0 { kept / total } else { 0.0 };
        let m: Vec<f32> = alpha
            .iter()
            .zip(&keep)
            .map(|(a, k)| a * k * scale)
            .collect();
        Ok((ids, Some(Tensor::from_vec(m, (rows, t), &Device::Cpu)?)))
    }

    fn data_position(&self) -> DataPosition {
        self.mix.data_position()
    }

    fn seek_to(&mut self, p: &DataPosition) -> Result<()> {
        self.mix.seek_to(p)
    }

    fn sequences(&self) -> usize {
        self.mix.sequences()
    }

    /// `{"domains", "average", "final", "eta", "smoothing", "updates", "update_every", "steps": [{"weights",
    /// "excess"}]}`; `average` (ᾱ) is DoReMi's output, as `[data.weights]` takes it.
    fn report(&self) -> Option<serde_json::Value> {
        let w = &self.weights;
        let named = |v: &[f64]| -> serde_json::Map<String, serde_json::Value> {
            self.names()
                .iter()
                .zip(v)
                .map(|(n, x)| (n.clone(), serde_json::json!(x)))
                .collect()
        };
        let steps: Vec<serde_json::Value> = self
            .history
            .iter()
            .map(|(a, l)| serde_json::json!({"weights": named(a), "excess": named(l)}))
            .collect();
        Some(serde_json::json!({
            "domains": self.names(),
            "average": named(&w.average),
            "final": named(&w.weights),
            "eta": w.eta,
            "smoothing": w.smoothing,
            "updates": w.updates,
            "update_every": self.every,
            "steps": steps,
        }))
    }
}
