//! What the fused-decoding test binaries share: a random model, and the comparison of fused
//! decoding against the reference path.
#![allow(dead_code)]

use std::collections::HashMap;

use std::path::Path;

use lmkit_core::{DType, Device, GgmlDType, Tensor};
use lmkit_models::testing::{qkv_biases, random_weights, write_tiny_gguf};
use lmkit_models::{load, KvCache, Llama, LlamaConfig, LoadOptions, WeightSource};

/// A tiny GGUF of block type `t` written into `dir`, loaded as it is and dequantized to f32:
/// `(dequantized, quantized)`.
pub fn quantized_pair(dir: &Path, cfg: &LlamaConfig, seed: u64, t: GgmlDType) -> (Llama, Llama) {
    let p = dir.join(format!("{t:?}-{seed}.gguf"));
    write_tiny_gguf(&p, cfg, seed, t).unwrap();
    let q = load(&p, LoadOptions::default()).unwrap().model;
    let opts = LoadOptions {
        dequantize: true,
        ..Default::default()
    };
    (load(&p, opts).unwrap().model, q)
}

pub fn model(cfg: &LlamaConfig, dtype: DType, bias: bool) -> Llama {
    let mut tensors: HashMap<String, Tensor> = random_weights(cfg, 11)
        .into_iter()
        .map(|(n, s, v)| (n, Tensor::from_vec(v, s, &Device::Cpu).unwrap()))
        .collect();
    if bias {
        for (name, b) in qkv_biases(cfg) {
            let n = b.len();
            tensors.insert(name, Tensor::from_vec(b, n, &Device::Cpu).unwrap());
        }
    }
    let opts = LoadOptions {
        dtype: Some(dtype),
        ..Default::default()
    };
    Llama::load(cfg.clone(), &WeightSource::Map(tensors), opts, &Device::Cpu).unwrap()
}

pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs a prompt of `prompt` tokens per sequence and then `steps` single-token steps on both
/// caches, feeding both the reference path's greedy tokens; returns the largest logit
/// difference relative to the largest logit, and the share of equal argmaxes.
pub fn compare(m: &Llama, batch: usize, prompt: usize, steps: usize, reserve: usize) -> (f32, f32) {
    compare_models(m, m, batch, prompt, steps, reserve)
}

/// [`compare`] with the reference path on `r` and fused decoding on `m`.
pub fn compare_models(
    r: &Llama,
    m: &Llama,
    batch: usize,
    prompt: usize,
    steps: usize,
    reserve: usize,
) -> (f32, f32) {
    let vocab = m.config().vocab_size;
    let mut reference = r.new_reference_cache();
    let mut fused: KvCache = m.new_fused_cache().unwrap();
    assert!(fused.is_slab());
    if reserve > 0 {
        fused.reserve(reserve);
    }
    let ids: Vec<u32> = (0..batch * prompt)
        .map(|i| ((i * 37 + 5) % vocab) as u32)
        .collect();
    let mut x = Tensor::from_vec(ids, (batch, prompt), &Device::Cpu).unwrap();
    let (mut worst, mut same, mut total) = (0f32, 0usize, 0usize);
    for _ in 0..=steps {
        let a = r.forward_last(&x, &mut reference).unwrap();
        let b = m.forward_last(&x, &mut fused).unwrap();
        assert_eq!(a.dims(), &[batch, vocab]);
        assert_eq!(b.dims(), &[batch, vocab]);
        let a: Vec<Vec<f32>> = a.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let b: Vec<Vec<f32>> = b.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let mut next = Vec::with_capacity(batch);
        for (ra, rb) in a.iter().zip(&b) {
            let scale = ra.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-6);
            let d = ra
                .iter()
                .zip(rb)
                .fold(0f32, |s, (p, q)| s.max((p - q).abs()));
            assert!(d.is_finite(), "non-finite logits");
            worst = worst.max(d / scale);
            same += usize::from(argmax(ra) == argmax(rb));
            total += 1;
            next.push(argmax(ra));
        }
        x = Tensor::from_vec(next, (batch, 1), &Device::Cpu).unwrap();
    }
    assert_eq!(reference.len(), fused.len());
    (worst, same as f32 / total as f32)
}
