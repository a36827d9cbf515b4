//! Tiny random models for tests: a deterministic GGUF file with a small byte-level BPE
//! tokenizer, so tests exercise the same load path as real models without any download.

use std::path::Path;

use lmkit_core::{GgmlDType, QTensor, Tensor};
use lmkit_formats::gguf::Value;
use lmkit_formats::names::hf_to_gguf;
use lmkit_formats::write::{write_gguf, GgufTensor};

use crate::config::LlamaConfig;
use crate::Result;

/// SplitMix64: a tiny deterministic generator for test weights.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(lmkit_rand::GAMMA);
        lmkit_rand::finalize(self.0)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// The tiny test vocabulary: `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, the printable ASCII
/// characters in GPT-2 byte-level form, and a few merges.
pub fn tiny_vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    tokens.push("\u{0120}".into()); // space
    tokens.push("\u{010A}".into()); // newline
    types.extend([1, 1]);
    for b in b'!'..=b'~' {
        tokens.push((b as char).to_string());
        types.push(1);
    }
    let merges = [
        "\u{0120} t",
        "h e",
        "\u{0120}t he",
        "i n",
        "e r",
        "a n",
        "o n",
        "r e",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (
        tokens,
        merges.iter().map(|s| s.to_string()).collect(),
        types,
    )
}

/// HF-keyed random weights for `cfg` with the given seed (std ≈ 0.02·√3 uniform, norms ≈ 1).
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng::new(seed);
    cfg.parameter_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name == "model.norm.weight" {
                vec![1.0; n]
            } else if name.ends_with("layernorm.weight") {
                (0..n).map(|_| 1.0 + 0.1 * rng.uniform()).collect()
            } else {
                let scale = if name == "model.embed_tokens.weight" {
                    1.0
                } else {
                    0.2
                };
                (0..n).map(|_| rng.uniform() * scale).collect()
            };
            (name, shape, v)
        })
        .collect()
}

pub use crate::weights::permute_for_gguf;

/// Writes a tiny random Llama as GGUF; matrices stored as `wtype` (F32, Q8_0, Q4_1, ...).
pub fn write_tiny_gguf(path: &Path, cfg: &LlamaConfig, seed: u64, wtype: GgmlDType) -> Result<()> {
    write_tiny_gguf_with(path, cfg, seed, wtype, |_, _| {})
}

/// [`write_tiny_gguf`] with `edit(hf_name, values)` applied to each tensor's values (HF
/// layout) before it is stored: a way to make a broken model (a NaN weight, say).
pub fn write_tiny_gguf_with(
    path: &Path,
    cfg: &LlamaConfig,
    seed: u64,
    wtype: GgmlDType,
    mut edit: impl FnMut(&str, &mut [f32]),
) -> Result<()> {
    let dev = lmkit_core::Device::Cpu;
    let (tokens, merges, types) = tiny_vocab();
    let s = |v: &str| Value::String(v.into());
    let u = |v: usize| Value::U32(v as u32);
    let mut meta = crate::export::hyperparameters(cfg);
    meta.push(("general.name".into(), s("tiny-random-llama")));
    meta.extend([
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u(1)),
        ("tokenizer.ggml.eos_token_id".into(), u(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]);
    let mut tensors = Vec::new();
    for (name, shape, mut data) in random_weights(cfg, seed) {
        edit(&name, &mut data);
        let gname = hf_to_gguf(&name).unwrap_or(name.clone());
        if name.ends_with("q_proj.weight") {
            data = permute_for_gguf(&data, shape[0], shape[1], cfg.num_heads);
        } else if name.ends_with("k_proj.weight") {
            data = permute_for_gguf(&data, shape[0], shape[1], cfg.num_kv_heads);
        }
        let t = Tensor::from_vec(data, shape.clone(), &dev)?;
        let dtype = if shape.len() == 2 {
            wtype
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&t, dtype)?;
        tensors.push(GgufTensor {
            name: gname,
            shape,
            dtype: dtype.into(),
            data: std::borrow::Cow::Owned(q.data()?.into_owned()),
        });
    }
    write_gguf(path, &meta, &tensors)?;
    Ok(())
}

/// Deterministic q/k/v biases (the Qwen2 layout), `(name, values)` for every layer of `cfg`.
pub fn qkv_biases(cfg: &LlamaConfig) -> Vec<(String, Vec<f32>)> {
    let d = cfg.head_dim;
    let mut out = Vec::new();
    for i in 0..cfg.num_layers {
        for (name, n) in [
            ("q_proj", cfg.num_heads * d),
            ("k_proj", cfg.num_kv_heads * d),
            ("v_proj", cfg.num_kv_heads * d),
        ] {
            let b = (0..n)
                .map(|j| ((j * 7 + i) % 11) as f32 / 10.0 - 0.5)
                .collect();
            out.push((format!("model.layers.{i}.self_attn.{name}.bias"), b));
        }
    }
    out
}
