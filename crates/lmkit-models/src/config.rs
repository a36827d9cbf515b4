//! `LlamaConfig`: one config for the Llama family (Llama 1–3, SmolLM, Mistral, Qwen2), read from
//! GGUF metadata or an HF `config.json`. Variants differ only by these fields.

use std::path::Path;

use lmkit_formats::gguf::GgufFile;
use lmkit_formats::hf::HfConfig;
use serde::Serialize;

use crate::{Error, Result};

/// Architectures this config covers, as GGUF `general.architecture` and HF `model_type` name them.
pub const KNOWN_ARCHS: &[&str] = &["llama", "mistral", "qwen2"];

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaConfig {
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v projections (Qwen2).
    pub attention_bias: bool,
}

impl LlamaConfig {
    /// Checks the relations the model code relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |why: String| Error::Config {
            path: path.into(),
            why,
        };
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is 0")));
            }
        }
        // Sizes no model has: a corrupt or mistyped file (these would otherwise be allocations
        // that abort the process, before a missing tensor is noticed).
        for (name, v, most) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 22),
            ("num_layers", self.num_layers, 1 << 12),
            ("num_heads", self.num_heads, 1 << 14),
            ("num_kv_heads", self.num_kv_heads, 1 << 14),
            ("head_dim", self.head_dim, 1 << 14),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 26,
            ),
        ] {
            if v > most {
                return Err(bad(format!(
                    "{name} is {v}, more than any model has ({most})"
                )));
            }
        }
        if self.num_parameters() > 1e13 {
            return Err(bad(format!(
                "the sizes describe {:.3e} parameters",
                self.num_parameters()
            )));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(format!(
                "{} heads are not a multiple of {} kv heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {} is odd", self.head_dim)));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.rope_theta) || !positive(self.rms_norm_eps) {
            return Err(bad("rope_theta and rms_norm_eps must be positive".into()));
        }
        Ok(())
    }

    /// From GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let arch = g.get_str("general.architecture")?.to_string();
        if !KNOWN_ARCHS.contains(&arch.as_str()) {
            return Err(Error::UnknownArchitecture {
                path: path.into(),
                arch,
                known: KNOWN_ARCHS.join(", "),
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let u = |s: &str| -> Result<usize> { Ok(g.get_u64(&k(s))? as usize) };
        let num_heads = u("attention.head_count")?;
        let hidden_size = u("embedding_length")?;
        let num_kv_heads = u("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = match g.get(&k("attention.key_length")).and_then(|v| v.as_u64()) {
            Some(d) => d as usize,
            None => hidden_size.checked_div(num_heads).unwrap_or(0),
        };
        let vocab_size = match g.get(&k("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_scaling = match g.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
            Some("linear") => Some(RopeScaling::Linear {
                factor: g.get_f64(&k("rope.scaling.factor"))?,
            }),
            _ => None,
        };
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta: g
                .get(&k("rope.freq_base"))
                .and_then(|v| v.as_f64())
                .unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: u("context_length")?,
            tie_word_embeddings: g.tensor_info("output.weight").is_none(),
            attention_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
            arch,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// From an HF `config.json`.
    pub fn from_hf(c: &HfConfig, path: &Path) -> Result<Self> {
        let arch = c.model_type.clone().unwrap_or_else(|| "llama".into());
        if !KNOWN_ARCHS.contains(&arch.as_str()) {
            return Err(Error::UnknownArchitecture {
                path: path.into(),
                arch,
                known: KNOWN_ARCHS.join(", "),
            });
        }
        let rope = c.rope_scaling.as_ref().or(c.rope_parameters.as_ref());
        let rope_theta = c
            .rope_theta
            .or_else(|| c.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10_000.0);
        let f = |k: &str| rope.and_then(|r| r.get(k)).and_then(|v| v.as_f64());
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let rope_scaling = match rope_type {
            "linear" => Some(RopeScaling::Linear {
                factor: f("factor").unwrap_or(1.0),
            }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: f("factor").unwrap_or(8.0),
                low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                original_max_position_embeddings: f("original_max_position_embeddings")
                    .unwrap_or(8192.0) as usize,
            }),
            "default" => None,
            other => {
                return Err(Error::Config {
                    path: path.into(),
                    why: format!("rope scaling type `{other}` is not supported"),
                })
            }
        };
        let cfg = Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c
                .head_dim
                .unwrap_or(c.hidden_size / c.num_attention_heads.max(1)),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            attention_bias: c.attention_bias.unwrap_or(arch == "qwen2"),
            arch,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The number of parameters the sizes describe (as f64: no overflow for any input).
    pub fn num_parameters(&self) -> f64 {
        let [v, c, f, l, h, k, d] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        ]
        .map(|x| x as f64);
        let heads = match self.tie_word_embeddings {
            true => 1.0,
            false => 2.0,
        };
        let bias = match self.attention_bias {
            true => (h + 2.0 * k) * d,
            false => 0.0,
        };
        let block = c * (h + 2.0 * k) * d + h * d * c + bias + 3.0 * c * f + 2.0 * c;
        heads * v * c + l * block + c
    }

    /// Every parameter's HF name and shape, in load order (norm weights are `(c,)`; the output
    /// layer is listed only when it is not tied to the embedding).
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = self.hidden_size;
        let (h, k, d, f) = (
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
        );
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, c],
        )];
        for i in 0..self.num_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![c]));
            for (name, rows, cols) in [
                ("self_attn.q_proj", h * d, c),
                ("self_attn.k_proj", k * d, c),
                ("self_attn.v_proj", k * d, c),
                ("self_attn.o_proj", c, h * d),
            ] {
                out.push((format!("{p}.{name}.weight"), vec![rows, cols]));
            }
            if self.attention_bias {
                for (name, rows) in [("q_proj", h * d), ("k_proj", k * d), ("v_proj", k * d)] {
                    out.push((format!("{p}.self_attn.{name}.bias"), vec![rows]));
                }
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![c]));
            for (name, rows, cols) in [
                ("mlp.gate_proj", f, c),
                ("mlp.up_proj", f, c),
                ("mlp.down_proj", c, f),
            ] {
                out.push((format!("{p}.{name}.weight"), vec![rows, cols]));
            }
        }
        out.push(("model.norm.weight".into(), vec![c]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![self.vocab_size, c]));
        }
        out
    }

    /// A tiny random-model config for tests: 2 layers, hidden 64, vocab 128.
    pub fn tiny() -> Self {
        Self {
            arch: "llama".into(),
            vocab_size: 128,
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1.0 / 65536.0, // exact in f32, so GGUF round-trips it
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zero, inconsistent and absurd sizes are refused with the field named; the parameter
    /// count matches the shapes' product.
    #[test]
    fn validate_names_the_bad_field() {
        let p = Path::new("m.gguf");
        let ok = LlamaConfig::tiny();
        assert!(ok.validate(p).is_ok());
        let n: usize = ok
            .parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(ok.num_parameters(), n as f64);
        type Mutate = fn(&mut LlamaConfig);
        let cases: [(&str, Mutate); 5] = [
            ("num_layers is 0", |c| c.num_layers = 0),
            ("num_layers is 4294967295", |c| {
                c.num_layers = u32::MAX as usize
            }),
            ("hidden_size is 1000000000", |c| {
                c.hidden_size = 1_000_000_000
            }),
            ("max_position_embeddings", |c| {
                c.max_position_embeddings = 1 << 40
            }),
            ("not a multiple", |c| c.num_kv_heads = 3),
        ];
        for (want, f) in cases {
            let mut c = LlamaConfig::tiny();
            f(&mut c);
            let e = c.validate(p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("m.gguf"), "{want}: {e}");
        }
        // Each size within its bound, together too many parameters.
        let mut big = LlamaConfig::tiny();
        (big.vocab_size, big.hidden_size, big.num_layers) = (1 << 24, 1 << 20, 1 << 12);
        (big.num_heads, big.num_kv_heads, big.head_dim) = (1 << 10, 1 << 10, 1 << 10);
        let e = big.validate(p).unwrap_err().to_string();
        assert!(e.contains("parameters"), "{e}");
    }
}
