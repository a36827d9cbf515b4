//! Where a model's weights come from: a GGUF file, an HF folder, or an in-memory map (tests).
//! Models ask for tensors by HF key; GGUF names come from the one table in
//! `lmkit_formats::names`. Shapes are checked here, so a wrong file fails at load, by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lmkit_core::candle::quantized::ggml_file::qtensor_from_ggml;
use lmkit_core::linear::Weight;
use lmkit_core::{DType, Device, Embedding, GgmlDType, Linear, Tensor};
use lmkit_formats::gguf::{GgufFile, TensorType};
use lmkit_formats::hf::HfCheckpoint;
use lmkit_formats::names::hf_to_gguf;
use lmkit_kernels::{LowBit, LowBitLinear, Rotation};

use crate::{Error, Result};

pub enum WeightSource {
    Gguf(Box<GgufFile>),
    Hf(Box<HfCheckpoint>),
    /// HF-keyed dense tensors (tiny random models in tests).
    Map(HashMap<String, Tensor>),
}

/// Options that change how weights are materialized.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Dequantize every weight to dense f32 (the reference path).
    pub dequantize: bool,
    /// Precision of dense weights and of the computation (`None`: f32). Block-quantized
    /// weights stay quantized; on a GPU their products take f32 inputs.
    pub dtype: Option<DType>,
}

impl WeightSource {
    pub fn path(&self) -> PathBuf {
        match self {
            WeightSource::Gguf(g) => g.path().into(),
            WeightSource::Hf(h) => h.dir.clone(),
            WeightSource::Map(_) => PathBuf::from("<memory>"),
        }
    }

    fn gguf_name(g: &GgufFile, hf: &str) -> Result<String> {
        hf_to_gguf(hf).ok_or_else(|| {
            Error::Format(lmkit_formats::Error::Missing {
                path: g.path().into(),
                what: format!("a GGUF name for `{hf}`"),
            })
        })
    }

    pub fn contains(&self, hf: &str) -> bool {
        match self {
            WeightSource::Gguf(g) => hf_to_gguf(hf).is_some_and(|n| g.tensor_info(&n).is_some()),
            WeightSource::Hf(h) => h.contains(hf),
            WeightSource::Map(m) => m.contains_key(hf),
        }
    }

    fn missing(&self, hf: &str) -> Error {
        Error::Format(lmkit_formats::Error::Missing {
            path: self.path(),
            what: format!("tensor `{hf}`"),
        })
    }

    fn check_shape(&self, hf: &str, got: &[usize], expected: &[usize]) -> Result<()> {
        if got != expected {
            return Err(Error::TensorShape {
                path: self.path(),
                tensor: hf.into(),
                expected: expected.to_vec(),
                got: got.to_vec(),
            });
        }
        Ok(())
    }

    /// A dense f32 tensor of the given row-major shape.
    pub fn tensor_f32(&self, hf: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = match self {
            WeightSource::Gguf(g) => g.tensor_f32(&Self::gguf_name(g, hf)?, device)?,
            WeightSource::Hf(h) => h.tensor_f32(hf, device)?,
            WeightSource::Map(m) => m.get(hf).ok_or_else(|| self.missing(hf))?.clone(),
        };
        self.check_shape(hf, t.dims(), shape)?;
        Ok(t)
    }

    /// A weight matrix `(out, in)`, quantized if stored so (unless `opts.dequantize`).
    ///
    /// `unpermute_heads`: for GGUF `llama` q/k, the rows were permuted at conversion for
    /// interleaved RoPE; give the head count to restore HF's rotate-half row order.
    pub fn weight(
        &self,
        hf: &str,
        shape: (usize, usize),
        unpermute_heads: Option<usize>,
        opts: LoadOptions,
        device: &Device,
    ) -> Result<Weight> {
        let g = match self {
            WeightSource::Gguf(g) => g,
            // HF f16/bf16 weights stay half precision on the CPU, as GGUF's F16 and BF16 do.
            WeightSource::Hf(h) if device.is_cpu() && !opts.dequantize => {
                let Some(t) = h.half_tensor(hf)? else {
                    let t = self.tensor_f32(hf, &[shape.0, shape.1], device)?;
                    return dense(t, opts);
                };
                self.check_shape(hf, &t.shape, &[shape.0, shape.1])?;
                let q = qtensor_from_ggml(t.dtype, t.bytes, t.shape, device).map_err(|source| {
                    lmkit_formats::Error::Tensor {
                        path: h.dir.clone(),
                        tensor: hf.into(),
                        err: Box::new(source),
                    }
                })?;
                return Ok(Weight::quantized(q)?);
            }
            _ => {
                let t = self.tensor_f32(hf, &[shape.0, shape.1], device)?;
                return dense(t, opts);
            }
        };
        let name = Self::gguf_name(g, hf)?;
        let info = g.tensor_info(&name).ok_or_else(|| self.missing(hf))?;
        self.check_shape(hf, &info.shape(), &[shape.0, shape.1])?;
        let dtype = match info.dtype {
            TensorType::Ggml(t) => t,
            TensorType::LowBit(bits) => {
                let l = Arc::new(lowbit_layer(g, &name, info, bits, shape)?);
                return if opts.dequantize || !device.is_cpu() {
                    dense(Weight::LowBit(l).to_f32()?.to_device(device)?, opts)
                } else {
                    Ok(Weight::LowBit(l))
                };
            }
        };
        let bytes = g.tensor_bytes(info);
        let bytes: std::borrow::Cow<[u8]> = match unpermute_heads {
            Some(heads) => std::borrow::Cow::Owned(unpermute_rows(bytes, shape.0, heads)),
            None => std::borrow::Cow::Borrowed(bytes),
        };
        let q =
            qtensor_from_ggml(dtype, &bytes, vec![shape.0, shape.1], device).map_err(|source| {
                lmkit_formats::Error::Tensor {
                    path: g.path().into(),
                    tensor: name.clone(),
                    err: Box::new(source),
                }
            })?;
        g.release(info);
        // On the CPU F16 and BF16 stay half precision (lmkit's dense kernel widens them in
        // registers); F32 runs as dense f32. On a GPU every float format is a dense tensor in
        // the compute dtype.
        let float = dtype == GgmlDType::F32
            || (matches!(dtype, GgmlDType::F16 | GgmlDType::BF16) && !device.is_cpu());
        if opts.dequantize || float {
            dense(q.dequantize(device)?, opts)
        } else {
            Ok(Weight::quantized(q)?)
        }
    }

    pub fn linear(
        &self,
        prefix: &str,
        shape: (usize, usize),
        bias: bool,
        unpermute_heads: Option<usize>,
        opts: LoadOptions,
        device: &Device,
    ) -> Result<Linear> {
        let w = self.weight(
            &format!("{prefix}.weight"),
            shape,
            unpermute_heads,
            opts,
            device,
        )?;
        let b = if bias {
            let b = self.tensor_f32(&format!("{prefix}.bias"), &[shape.0], device)?;
            Some(match unpermute_heads {
                Some(h) if matches!(self, WeightSource::Gguf(_)) => unpermute_bias(&b, h)?,
                _ => b,
            })
        } else {
            None
        };
        Ok(Linear::new(w, b)?)
    }

    pub fn embedding(
        &self,
        hf: &str,
        shape: (usize, usize),
        opts: LoadOptions,
        device: &Device,
    ) -> Result<Embedding> {
        Ok(Embedding::new(self.weight(hf, shape, None, opts, device)?)?)
    }
}

/// Suffixes of the companion tensors of a low-bit layer `<name>` (docs/formats.md): its
/// `(a, b)` scale pairs `(rows, groups, 2)` and the diagonals of its input and output rotations.
pub const LOWBIT_SCALE: &str = ".lb_scale";
pub const LOWBIT_IN: &str = ".lb_in";
pub const LOWBIT_OUT: &str = ".lb_out";

/// Reads a low-bit layer: codes `<name>` and its companion tensors. Low-bit layers are stored
/// in HF row order (q/k are not permuted: a row permutation does not commute with the output
/// rotation).
fn lowbit_layer(
    g: &GgufFile,
    name: &str,
    info: &lmkit_formats::gguf::TensorInfo,
    bits: u8,
    (rows, cols): (usize, usize),
) -> Result<LowBitLinear> {
    let cpu = Device::Cpu;
    let vec_of = |suffix: &str| -> Result<Option<Vec<f32>>> {
        let full = format!("{name}{suffix}");
        if g.tensor_info(&full).is_none() {
            return Ok(None);
        }
        Ok(Some(
            g.tensor_f32(&full, &cpu)?.flatten_all()?.to_vec1::<f32>()?,
        ))
    };
    let bad = |why: String| {
        Error::Format(lmkit_formats::Error::Field {
            path: g.path().into(),
            field: name.into(),
            why,
        })
    };
    let scales = vec_of(LOWBIT_SCALE)?
        .ok_or_else(|| bad(format!("missing its scale tensor `{name}{LOWBIT_SCALE}`")))?;
    if rows == 0 || scales.is_empty() || scales.len() % (2 * rows) != 0 {
        return Err(bad(format!(
            "{} scale values for {rows} rows (expected rows × groups × 2)",
            scales.len()
        )));
    }
    let groups = scales.len() / (2 * rows);
    let group = cols / groups.max(1);
    let pairs = scales.chunks_exact(2).map(|p| [p[0], p[1]]).collect();
    let codes = g.tensor_bytes(info).to_vec();
    let w = LowBit::new(bits, rows, cols, group, codes, pairs).map_err(|e| bad(e.to_string()))?;
    let rot = |suffix: &str, n: usize| -> Result<Option<Rotation>> {
        match vec_of(suffix)? {
            None => Ok(None),
            Some(d) if d.len() == n => Rotation::new(d)
                .map(Some)
                .ok_or_else(|| bad(format!("no Hadamard transform of width {n}"))),
            Some(d) => Err(bad(format!(
                "`{name}{suffix}` has {} values, expected {n}",
                d.len()
            ))),
        }
    };
    let input = rot(LOWBIT_IN, cols)?;
    let output = rot(LOWBIT_OUT, rows)?;
    LowBitLinear::new(w, input, output).map_err(|e| bad(e.to_string()))
}

/// A dense weight in the load's dtype.
fn dense(t: Tensor, opts: LoadOptions) -> Result<Weight> {
    Ok(Weight::Dense(match opts.dtype {
        Some(dt) if dt != t.dtype() => t.to_dtype(dt)?,
        _ => t,
    }))
}

/// Permutes q/k rows from HF's rotate-half order to GGUF's interleaved order (what llama.cpp's
/// converter does): `gguf[h·d + 2i + j] = hf[h·d + j·d/2 + i]`.
pub fn permute_for_gguf(v: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0.0; v.len()];
    for hh in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let src = hh * d + j * (d / 2) + i;
                let dst = hh * d + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Inverse of llama.cpp's conversion permutation on whole rows (works for any block type, since
/// blocks run along a row): `hf[h·d + j·d/2 + i] = gguf[h·d + 2i + j]`.
fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = bytes.len() / rows.max(1);
    let d = rows / heads.max(1);
    let half = d / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let dst = h * d + j * half + i;
                let src = h * d + 2 * i + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

fn unpermute_bias(b: &Tensor, heads: usize) -> Result<Tensor> {
    let v = b.to_vec1::<f32>()?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let out = unpermute_rows(&bytes, v.len(), heads);
    let vals: Vec<f32> = out
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Tensor::from_vec(vals, v.len(), b.device())?)
}

/// Opens a model path: a `.gguf` file or an HF folder.
pub fn open_source(path: &Path) -> Result<WeightSource> {
    if !path.exists() {
        return Err(Error::NotFound { path: path.into() });
    }
    if path.is_dir() {
        return Ok(WeightSource::Hf(Box::new(HfCheckpoint::open(path)?)));
    }
    Ok(WeightSource::Gguf(Box::new(GgufFile::open(path)?)))
}
