//! HF checkpoints: a folder with `config.json`, `*.safetensors` (mmap) and `tokenizer.json`.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::{Error, Result};

/// The fields of an HF `config.json` that the Llama family uses (Llama, Mistral, Qwen2, SmolLM).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_ctx() -> usize {
    2048
}

impl HfConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.into(),
            err: source,
        })
    }
}

/// A half-precision tensor of a checkpoint, see [`HfCheckpoint::half_tensor`].
pub struct HalfTensor<'a> {
    /// `F16` or `BF16`.
    pub dtype: GgmlDType,
    pub shape: Vec<usize>,
    /// Little-endian values, row-major.
    pub bytes: &'a [u8],
}

/// An HF model folder, its safetensors memory-mapped.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub config: HfConfig,
    tensors: MmapedSafetensors,
    names: std::collections::HashSet<String>,
}

impl HfCheckpoint {
    /// Opens `dir/config.json` and every `dir/*.safetensors`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::Missing {
                path: dir.clone(),
                what: "config.json (an HF model folder needs config.json, *.safetensors and tokenizer.json)".into(),
            });
        }
        let config = HfConfig::from_file(&cfg_path)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Missing {
                path: dir,
                what: "*.safetensors weight files".into(),
            });
        }
        // SAFETY: read-only maps of files lmkit does not modify while they are open.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::corrupt(&dir, format!("cannot read safetensors: {e}")))?;
        let names = tensors.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            dir,
            config,
            tensors,
            names,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.iter()
    }

    /// A tensor converted to f32.
    pub fn tensor_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(Error::Missing {
                path: self.dir.clone(),
                what: format!("tensor `{name}`"),
            });
        }
        let map = |source| Error::Tensor {
            path: self.dir.clone(),
            tensor: name.into(),
            err: Box::new(source),
        };
        self.tensors
            .load(name, device)
            .map_err(map)?
            .to_dtype(DType::F32)
            .map_err(map)
    }

    /// A tensor stored in f16 or bf16, as its raw bytes borrowed from the memory map (`None`
    /// when it is stored in another dtype).
    pub fn half_tensor(&self, name: &str) -> Result<Option<HalfTensor<'_>>> {
        if !self.contains(name) {
            return Err(Error::Missing {
                path: self.dir.clone(),
                what: format!("tensor `{name}`"),
            });
        }
        let view = self.tensors.get(name).map_err(|source| Error::Tensor {
            path: self.dir.clone(),
            tensor: name.into(),
            err: Box::new(source),
        })?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F16 => GgmlDType::F16,
            safetensors::Dtype::BF16 => GgmlDType::BF16,
            _ => return Ok(None),
        };
        let shape = view.shape().to_vec();
        let want = shape.iter().product::<usize>() * 2;
        if view.data().len() != want {
            return Err(Error::corrupt(
                &self.dir,
                format!(
                    "tensor `{name}`: {} bytes for shape {shape:?} in {dtype:?} (expected {want})",
                    view.data().len()
                ),
            ));
        }
        Ok(Some(HalfTensor {
            dtype,
            shape,
            bytes: view.data(),
        }))
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
}
