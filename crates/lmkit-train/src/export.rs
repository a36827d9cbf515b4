//! Saving a trained model as an HF folder that lmkit, transformers and llama.cpp's converter
//! read: `config.json`, `model.safetensors` (f32, HF names; a tied output layer is not stored
//! twice), `tokenizer.json` and `tokenizer_config.json`. The folder is written under a
//! temporary name and renamed into place, so it is complete or absent.

use std::collections::HashMap;
use std::path::Path;

use lmkit_core::candle::safetensors;
use lmkit_core::Tensor;
use lmkit_formats::tokenizer::LoadedTokenizer;
use lmkit_models::config::RopeScaling;
use lmkit_models::{Llama, LlamaConfig};

use crate::params::Trainable;
use crate::{Error, Result};

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Data(format!("{}: {e}", path.display()))
}

/// HF `config.json` for `cfg`.
pub fn hf_config(cfg: &LlamaConfig, tok: &LoadedTokenizer) -> serde_json::Value {
    let mut v = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": if cfg.arch == "qwen2" { "qwen2" } else { "llama" },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "torch_dtype": "float32",
        "bos_token_id": tok.special.bos,
        "eos_token_id": tok.special.eos,
    });
    if let Some(RopeScaling::Linear { factor }) = &cfg.rope_scaling {
        v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor});
    }
    v
}

/// Writes `t` and its tokenizer to the HF folder `dir` (replacing it).
pub fn save_hf(dir: &Path, t: &Trainable, tok: &LoadedTokenizer) -> Result<()> {
    save_hf_model(dir, &t.model, tok)
}

/// Writes any model (f32 weights, dequantized if needed; a merged LoRA model, say) and its
/// tokenizer to the HF folder `dir` (replacing it).
pub fn save_hf_model(dir: &Path, model: &Llama, tok: &LoadedTokenizer) -> Result<()> {
    let cfg = model.config();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let write = || -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (n, w) in model.named_weights() {
            tensors.insert(n, w.to_f32()?.to_device(&lmkit_core::Device::Cpu)?);
        }
        for (n, v) in model.named_vectors() {
            let v = v.to_dtype(lmkit_core::DType::F32)?;
            tensors.insert(n, v.to_device(&lmkit_core::Device::Cpu)?);
        }
        safetensors::save(&tensors, tmp.join("model.safetensors"))?;
        let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).map_err(|e| io(&tmp, e));
        std::fs::write(tmp.join("config.json"), json(&hf_config(cfg, tok))?)
            .map_err(|e| io(&tmp, e))?;
        lmkit_formats::tokenizer_train::save_folder(tok, &tmp)?;
        for f in std::fs::read_dir(&tmp).map_err(|e| io(&tmp, e))? {
            let p = f.map_err(|e| io(&tmp, e))?.path();
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&p, e))?;
        }
        if dir.exists() {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
            let _ = std::fs::remove_dir_all(&old);
        }
        std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}
