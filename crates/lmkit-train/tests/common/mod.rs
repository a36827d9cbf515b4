//! Models and batches shared by the tests of lmkit's own backward (`body_cpu`, `body_gpu`).

use std::collections::HashMap;

use lmkit_core::{DType, Device, Tensor};
use lmkit_models::LlamaConfig;
use lmkit_train::Trainable;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Random weights (std 0.1), with the norms and biases moved off their init values so that
/// their gradients are tested.
pub fn random(cfg: LlamaConfig, seed: u64) -> Res<Trainable> {
    let t = Trainable::init(cfg.clone(), 0.1, seed)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, (n, v)) in t.params.iter().enumerate() {
        let x = v.as_tensor();
        let x = if n.ends_with("norm.weight") || n.ends_with(".bias") {
            let k = x.dims()[0];
            let bump: Vec<f32> = (0..k).map(|j| ((i * 31 + j) as f32 * 0.7).sin()).collect();
            (x + Tensor::from_vec(bump, k, &Device::Cpu)? * 0.3)?
        } else {
            x.clone()
        };
        tensors.insert(n.clone(), x);
    }
    Ok(Trainable::from_tensors(cfg, tensors)?)
}

pub fn ids(cfg: &LlamaConfig, b: usize, t1: usize) -> Res<Tensor> {
    let v: Vec<u32> = (0..b * t1)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    Ok(Tensor::from_vec(v, (b, t1), &Device::Cpu)?)
}

/// Every linear layer of a block, as LoRA targets name them.
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A model on plain tensors (nothing of the base trains) with `cfg`'s random weights, LoRA
/// adapters on `targets` (random A and B, so every adapter gradient is nonzero) and dropout
/// at micro-batch 3: the adapters' variables.
pub fn lora_model(
    cfg: &LlamaConfig,
    targets: &[&str],
    dropout: f64,
    dtype: DType,
) -> Res<Trainable> {
    lora_model_stored(cfg, targets, dropout, dtype, DType::F32)
}

/// [`lora_model`] with the base's matrices stored in `stored` (the norms stay f32), as
/// `lmkit train --lora` loads a base in the compute dtype.
pub fn lora_model_stored(
    cfg: &LlamaConfig,
    targets: &[&str],
    dropout: f64,
    dtype: DType,
    stored: DType,
) -> Res<Trainable> {
    let base = random(cfg.clone(), 9)?;
    let plain: HashMap<String, Tensor> = base
        .params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    let mut model = lmkit_models::Llama::load(
        cfg.clone(),
        &lmkit_models::WeightSource::Map(plain),
        lmkit_models::LoadOptions {
            dtype: Some(stored),
            ..Default::default()
        },
        &Device::Cpu,
    )?;
    // The weights stay in `stored` and the products run in `dtype` (as `Trainable::to_device`
    // does).
    model.set_dtype(dtype)?;
    let lc = lmkit_train::lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        targets: targets.iter().map(|s| s.to_string()).collect(),
    };
    let params = lmkit_train::lora::attach(&mut model, &lc, 4)?;
    for (i, (_, v)) in params.iter().enumerate() {
        let x = v.as_tensor();
        let n = x.elem_count();
        let vals: Vec<f32> = (0..n)
            .map(|j| ((i * 131 + j) as f32 * 0.37).sin() * 0.2)
            .collect();
        v.set(&Tensor::from_vec(vals, x.shape(), &Device::Cpu)?)?;
    }
    if let Some(d) = model.lora_dropout() {
        d.train(3);
    }
    Ok(Trainable { model, params })
}
