//! A model's trainable variables: every weight as a candle `Var` that the model's layers share,
//! so gradients of `Llama::forward_train` land on them.

use std::collections::HashMap;

use lmkit_core::candle::Var;
use lmkit_core::{DType, Device, Tensor};
use lmkit_models::{Llama, LlamaConfig, LoadOptions, WeightSource};

use crate::Result;

/// A model built on variables, with their HF names.
pub struct Trainable {
    pub model: Llama,
    pub params: Vec<(String, Var)>,
}

/// Deterministic normal samples (xorshift64* and Box–Muller), independent of candle's RNG.
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

impl Trainable {
    /// Fresh weights, deterministic in `seed`: `N(0, std²)` for the embedding and every matrix
    /// (HF's `initializer_range`, 0.02 by default), ones for norms, zeros for biases.
    pub fn init(cfg: LlamaConfig, std: f64, seed: u64) -> Result<Self> {
        let mut rng = Normal(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut tensors = HashMap::new();
        for (name, shape) in cfg.parameter_shapes() {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (rng.sample() * std) as f32).collect()
            };
            tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
        }
        Self::from_tensors(cfg, tensors)
    }

    /// Variables initialized from an existing model's weights (dequantized to f32), for
    /// fine-tuning it.
    pub fn from_model(model: &Llama) -> Result<Self> {
        let mut tensors = HashMap::new();
        for (n, w) in model.named_weights() {
            tensors.insert(n, w.to_f32()?);
        }
        for (n, v) in model.named_vectors() {
            tensors.insert(n, v.to_dtype(DType::F32)?);
        }
        Self::from_tensors(model.config().clone(), tensors)
    }

    /// The same weights as f32 variables on `device`, computing in `dtype` (mixed precision:
    /// the master weights and the optimizer state stay f32, products run in `dtype`).
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<Self> {
        let tensors = self
            .params
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let mut t = Self::from_tensors(self.model.config().clone(), tensors)?;
        t.model.set_dtype(dtype)?;
        Ok(t)
    }

    /// A model on variables initialized from `tensors` (HF names, f32), on their device.
    pub fn from_tensors(cfg: LlamaConfig, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let device = tensors
            .values()
            .next()
            .map_or(Device::Cpu, |t| t.device().clone());
        let mut params = Vec::with_capacity(tensors.len());
        let mut shared = HashMap::with_capacity(tensors.len());
        for (name, _) in cfg.parameter_shapes() {
            let Some(t) = tensors.get(&name) else {
                return Err(crate::Error::Option {
                    option: "weights".into(),
                    why: format!("no tensor `{name}`"),
                });
            };
            let var = Var::from_tensor(&t.to_dtype(lmkit_core::DType::F32)?)?;
            shared.insert(name.clone(), var.as_tensor().clone());
            params.push((name, var));
        }
        let model = Llama::load(
            cfg,
            &WeightSource::Map(shared),
            LoadOptions::default(),
            &device,
        )?;
        Ok(Self { model, params })
    }

    /// Variables with whether weight decay applies: matrices yes, embeddings, norms and biases
    /// no (the common default).
    pub fn decay_groups(&self) -> Vec<(Var, bool)> {
        self.params
            .iter()
            .map(|(n, v)| {
                let matrix = v.as_tensor().rank() >= 2 && !n.contains("embed_tokens");
                (v.clone(), matrix)
            })
            .collect()
    }

    /// The name of a variable that holds a NaN or an infinity, if any ([`first_non_finite`]).
    pub fn first_non_finite(&self) -> Result<Option<String>> {
        first_non_finite(&self.params)
    }

    /// Scalar parameters (tied weights once).
    pub fn num_parameters(&self) -> usize {
        self.params
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }
}

/// The name of the first of `vars` that holds a NaN or an infinity, if any: a trained model is
/// checked before it is saved. `0·x` is 0 for every finite value and NaN otherwise, so one
/// sum per variable tells.
pub fn first_non_finite(vars: &[(String, Var)]) -> Result<Option<String>> {
    for (name, v) in vars {
        let x = v.as_tensor().to_dtype(DType::F32)?;
        if (&x * 0.0)?.sum_all()?.to_scalar::<f32>()? != 0.0 {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}
