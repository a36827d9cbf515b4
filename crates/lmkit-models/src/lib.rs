//! lmkit-models: the Llama family and model loading.
//!
//! ```no_run
//! # fn main() -> Result<(), lmkit_models::Error> {
//! let m = lmkit_models::load(std::path::Path::new("model.gguf"), Default::default())?;
//! let ids = m.tokenizer.encode("Hello")?;
//! # Ok(()) }
//! ```

pub mod cache;
pub mod check;
pub mod config;
pub mod error;
pub mod export;
mod flash_cpu;
mod fused_decode;
pub mod kv_policy;
pub mod llama;
pub mod native;
mod tensor_evict;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod weights;

use std::path::{Path, PathBuf};

use lmkit_core::Device;
use lmkit_formats::chat::ChatTemplate;
use lmkit_formats::tokenizer::LoadedTokenizer;

pub use cache::KvCache;
pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use kv_policy::KvPolicy;
pub use llama::{Llama, BLOCK_LINEARS, CAPTURE_SITES};
pub use weights::{open_source, LoadOptions, WeightSource};

/// A model ready to run: weights, tokenizer and chat template.
#[derive(Debug)]
pub struct LoadedModel {
    pub path: PathBuf,
    pub model: Llama,
    pub tokenizer: LoadedTokenizer,
    pub chat: ChatTemplate,
    /// Storage summary of the file it came from.
    pub file: FileSummary,
}

/// What the model file holds (as stored, before any dequantization).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FileSummary {
    pub format: String,
    pub file_bytes: u64,
    /// `(type, tensor count, bytes)`, most bytes first.
    pub tensor_types: Vec<(String, usize, usize)>,
    pub name: Option<String>,
}

/// Loads a `.gguf` file or an HF folder (config.json, *.safetensors, tokenizer.json) on `device`.
pub fn load_on(path: &Path, opts: LoadOptions, device: &Device) -> Result<LoadedModel> {
    let src = open_source(path)?;
    let (cfg, tokenizer, file) = match &src {
        WeightSource::Gguf(g) => {
            let cfg = LlamaConfig::from_gguf(g)?;
            let tok = LoadedTokenizer::from_gguf(g)?;
            let mut types: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
            for t in &g.tensors {
                let e = types.entry(t.dtype.name()).or_default();
                e.0 += 1;
                e.1 += t.size_in_bytes;
            }
            let mut tensor_types: Vec<_> = types.into_iter().map(|(k, (n, b))| (k, n, b)).collect();
            tensor_types.sort_by_key(|t| std::cmp::Reverse(t.2));
            let file = FileSummary {
                format: format!("GGUF v{}", g.version),
                file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
                tensor_types,
                name: g
                    .get("general.name")
                    .and_then(|v| v.as_str())
                    .map(String::from),
            };
            (cfg, tok, file)
        }
        WeightSource::Hf(h) => {
            let cfg = LlamaConfig::from_hf(&h.config, path)?;
            let tok = LoadedTokenizer::from_tokenizer_json(&h.tokenizer_path())?;
            let bytes = std::fs::read_dir(path)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                        .filter_map(|e| e.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            let file = FileSummary {
                format: "HF safetensors".into(),
                file_bytes: bytes,
                tensor_types: vec![],
                name: None,
            };
            (cfg, tok, file)
        }
        WeightSource::Map(_) => {
            return Err(Error::NotAModel { path: path.into() });
        }
    };
    let model = Llama::load(cfg, &src, opts, device)?;
    let eos = tokenizer
        .special
        .eos
        .and_then(|id| tokenizer.tokenizer.id_to_token(id))
        .unwrap_or_default();
    let bos = tokenizer
        .special
        .bos
        .and_then(|id| tokenizer.tokenizer.id_to_token(id))
        .unwrap_or_default();
    let chat = match &tokenizer.chat_template {
        Some(t) => ChatTemplate::new(t, &bos, &eos)?,
        None => ChatTemplate::chatml()?,
    };
    Ok(LoadedModel {
        path: path.into(),
        model,
        tokenizer,
        chat,
        file,
    })
}

/// [`load_on`] the CPU.
pub fn load(path: &Path, opts: LoadOptions) -> Result<LoadedModel> {
    load_on(path, opts, &Device::Cpu)
}
