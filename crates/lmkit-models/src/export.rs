//! Writing a model as GGUF, the file llama.cpp, lmkit and the tools built on ggml load.
//!
//! The layout is what llama.cpp's `convert_hf_to_gguf.py` writes for a Llama: the `llama.*`
//! hyperparameters, the tokenizer as `tokenizer.ggml.*` (byte-level BPE), GGUF tensor names,
//! and q/k rows permuted to the interleaved RoPE order (for `qwen2`, which llama.cpp runs with
//! NeoX RoPE, the rows stay as they are and the keys use the `qwen2.` prefix). Norms and
//! biases are f32; matrices take the requested type. The file is written atomically.

use std::borrow::Cow;
use std::path::Path;

use lmkit_core::{GgmlDType, QTensor, Tensor};
use lmkit_formats::gguf::Value;
use lmkit_formats::names::hf_to_gguf;
use lmkit_formats::tokenizer::LoadedTokenizer;
use lmkit_formats::write::{write_gguf, GgufTensor};

use crate::config::{LlamaConfig, RopeScaling};
use crate::weights::{permute_for_gguf, LOWBIT_IN, LOWBIT_OUT, LOWBIT_SCALE};
use crate::{Error, Llama, Result};
use lmkit_core::linear::Weight;
use lmkit_formats::gguf::TensorType;
use lmkit_kernels::LowBitLinear;

/// The matrix types GGUF export writes.
pub const EXPORT_TYPES: [(&str, GgmlDType); 6] = [
    ("f32", GgmlDType::F32),
    ("f16", GgmlDType::F16),
    ("bf16", GgmlDType::BF16),
    ("q8_0", GgmlDType::Q8_0),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
];

/// Parses an export type name (`f32`, `f16`, `bf16`, `q8_0`, `q4_0`, `q4_1`).
pub fn export_type(name: &str) -> Result<GgmlDType> {
    let lower = name.to_ascii_lowercase();
    EXPORT_TYPES
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "GGUF type `{name}` (expected one of {})",
                EXPORT_TYPES.map(|t| t.0).join(", ")
            ))
        })
}

/// Writes `model` with its tokenizer to `path`, matrices as `wtype`.
pub fn save_gguf(
    path: &Path,
    model: &Llama,
    tok: &LoadedTokenizer,
    wtype: GgmlDType,
) -> Result<()> {
    save_gguf_with(path, model, tok, &|_| wtype, Vec::new())
}

/// [`save_gguf`] with a type per matrix (`wtype_of(hf_name)`) and extra metadata. Low-bit
/// layers (lmkit-quant's output) are written in lmkit's own `LB2`/`LB3`/`LB4` types with their
/// companion tensors, whatever `wtype_of` says (docs/formats.md).
pub fn save_gguf_with(
    path: &Path,
    model: &Llama,
    tok: &LoadedTokenizer,
    wtype_of: &dyn Fn(&str) -> GgmlDType,
    extra: Vec<(String, Value)>,
) -> Result<()> {
    let cfg = model.config();
    let a = arch(cfg);
    let wtype = wtype_of("model.embed_tokens.weight");
    let mut meta = hyperparameters(cfg);
    meta.push(("general.name".into(), Value::String("lmkit export".into())));
    meta.push(("general.file_type".into(), Value::U32(file_type(wtype))));
    match &cfg.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            meta.push((
                format!("{a}.rope.scaling.type"),
                Value::String("linear".into()),
            ));
            meta.push((
                format!("{a}.rope.scaling.factor"),
                Value::F32(*factor as f32),
            ));
        }
        Some(RopeScaling::Llama3 { .. }) => {
            return Err(Error::Unsupported(
                "GGUF export of Llama 3 RoPE scaling (llama.cpp stores it as a rope_freqs \
                 tensor, which lmkit does not write yet)"
                    .into(),
            ))
        }
    }
    if wtype.block_size() > 1 {
        meta.push(("general.quantization_version".into(), Value::U32(2)));
    }
    meta.extend(tok.gguf_metadata()?);
    meta.extend(extra);

    let permute = a == "llama";
    let heads_of = |name: &str| -> Option<usize> {
        if !permute {
            None
        } else if name.contains("q_proj") {
            Some(cfg.num_heads)
        } else if name.contains("k_proj") {
            Some(cfg.num_kv_heads)
        } else {
            None
        }
    };
    let mut tensors = Vec::new();
    for (name, w) in model.named_weights() {
        if let Weight::LowBit(l) = w {
            tensors.extend(lowbit_tensors(&name, l)?);
            continue;
        }
        let wtype = wtype_of(&name);
        let (rows, cols) = w.dims2()?;
        let mut v = w.to_f32()?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(h) = heads_of(&name) {
            v = permute_for_gguf(&v, rows, cols, h);
        }
        if wtype.block_size() > 1 && !cols.is_multiple_of(wtype.block_size()) {
            return Err(Error::Unsupported(format!(
                "{name}: {cols} columns are not a multiple of the {wtype:?} block ({})",
                wtype.block_size()
            )));
        }
        let t = Tensor::from_vec(v, (rows, cols), &lmkit_core::Device::Cpu)?;
        tensors.push(tensor(&name, vec![rows, cols], &t, wtype)?);
    }
    for (name, t) in model.named_vectors() {
        let n = t.elem_count();
        let mut v = t.to_dtype(lmkit_core::DType::F32)?.to_vec1::<f32>()?;
        if let Some(h) = heads_of(&name) {
            v = permute_for_gguf(&v, n, 1, h);
        }
        let t = Tensor::from_vec(v, n, &lmkit_core::Device::Cpu)?;
        tensors.push(tensor(&name, vec![n], &t, GgmlDType::F32)?);
    }
    write_gguf(path, &meta, &tensors)?;
    Ok(())
}

/// A low-bit layer as GGUF tensors: the codes, `(a, b)` scales as f16 `(rows, groups, 2)`,
/// and the rotation diagonals as f16. Rows stay in HF order.
fn lowbit_tensors(hf: &str, l: &LowBitLinear) -> Result<Vec<GgufTensor<'static>>> {
    let name = hf_to_gguf(hf)
        .ok_or_else(|| Error::Unsupported(format!("no GGUF name for tensor `{hf}`")))?;
    let (rows, cols) = (l.w.rows, l.w.cols);
    let f16s = |v: &mut dyn Iterator<Item = f32>| -> Vec<u8> {
        v.flat_map(|x| half::f16::from_f32(x).to_le_bytes())
            .collect()
    };
    let mut out = vec![GgufTensor {
        name: name.clone(),
        shape: vec![rows, cols],
        dtype: TensorType::LowBit(l.w.bits),
        data: Cow::Owned(l.w.codes.clone()),
    }];
    out.push(GgufTensor {
        name: format!("{name}{LOWBIT_SCALE}"),
        shape: vec![rows, l.w.groups(), 2],
        dtype: GgmlDType::F16.into(),
        data: Cow::Owned(f16s(&mut l.w.scales.iter().flatten().copied())),
    });
    for (suffix, rot) in [(LOWBIT_IN, &l.input), (LOWBIT_OUT, &l.output)] {
        if let Some(r) = rot {
            out.push(GgufTensor {
                name: format!("{name}{suffix}"),
                shape: vec![r.len()],
                dtype: GgmlDType::F16.into(),
                data: Cow::Owned(f16s(&mut r.diag.iter().copied())),
            });
        }
    }
    Ok(out)
}

fn tensor(
    hf: &str,
    shape: Vec<usize>,
    t: &Tensor,
    dtype: GgmlDType,
) -> Result<GgufTensor<'static>> {
    let name = hf_to_gguf(hf)
        .ok_or_else(|| Error::Unsupported(format!("no GGUF name for tensor `{hf}`")))?;
    let q = QTensor::quantize(t, dtype)?;
    Ok(GgufTensor {
        name,
        shape,
        dtype: dtype.into(),
        data: Cow::Owned(q.data()?.into_owned()),
    })
}

/// The GGUF architecture name for a config (`qwen2` keeps its own; the rest are `llama`).
fn arch(cfg: &LlamaConfig) -> &'static str {
    match cfg.arch.as_str() {
        "qwen2" => "qwen2",
        _ => "llama",
    }
}

/// `general.architecture` and the `<arch>.*` hyperparameters llama.cpp reads.
pub fn hyperparameters(cfg: &LlamaConfig) -> Vec<(String, Value)> {
    let a = arch(cfg);
    let u = |v: usize| Value::U32(v as u32);
    vec![
        ("general.architecture".to_string(), Value::String(a.into())),
        (format!("{a}.block_count"), u(cfg.num_layers)),
        (
            format!("{a}.context_length"),
            u(cfg.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u(cfg.hidden_size)),
        (format!("{a}.feed_forward_length"), u(cfg.intermediate_size)),
        (format!("{a}.attention.head_count"), u(cfg.num_heads)),
        (format!("{a}.attention.head_count_kv"), u(cfg.num_kv_heads)),
        (format!("{a}.attention.key_length"), u(cfg.head_dim)),
        (format!("{a}.attention.value_length"), u(cfg.head_dim)),
        (format!("{a}.rope.dimension_count"), u(cfg.head_dim)),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (format!("{a}.vocab_size"), u(cfg.vocab_size)),
    ]
}

/// `general.file_type` (llama.cpp's `llama_ftype`) for a matrix type.
fn file_type(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::BF16 => 32,
        _ => 0,
    }
}
