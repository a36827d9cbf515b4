//! `Linear` and `Embedding`: one layer type for every weight format.
//!
//! Models hold `Linear`s and never see how a weight is stored. Today a weight is either a dense
//! f32 tensor or a block-quantized GGUF tensor run through quantized matmul; more formats (LoRA,
//! ternary, QuIP lattices, lmkit's own SIMD kernels) slot in as new variants without touching any
//! model file.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Module, Storage, StorageRef, Tensor};

use lmkit_kernels::{
    Dense, KQuant, LowBitLinear, Packed, QFormat, QMatrix, WeightView, Q4K, Q5K, Q6K,
};

use crate::error::OpContext;
use crate::lora::LoraAdapter;
use crate::{Error, Result};

/// How a weight matrix is stored.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Dense `(out, in)` tensor (f32 on CPU).
    Dense(Tensor),
    /// Block-quantized GGUF tensor, logical shape `(out, in)`.
    Quantized(Arc<QTensor>),
    /// Block-quantized with rows interleaved for lmkit's CPU kernels (Q4_0, Q4_1, Q8_0 on the
    /// CPU are stored this way; [`Packed::unpack`] gives back the GGUF bytes).
    Packed(Arc<Packed>),
    /// GGUF `Q4_K`, `Q5_K` or `Q6_K` with rows interleaved for lmkit's CPU kernels (exact;
    /// [`KQuant::unpack`] gives back the GGUF bytes).
    KQuant(Arc<KQuant>),
    /// 2–4-bit codes between optional Hadamard rotations (lmkit-quant's RTN, GPTQ, QuIP).
    LowBit(Arc<LowBitLinear>),
}

impl Weight {
    /// A block-quantized tensor: repacked for lmkit's kernels when it runs on the CPU in a
    /// format they support, else kept as candle's `QTensor`.
    ///
    /// `Q4_K`, `Q5_K` and `Q6_K` keep their own kernels ([`Weight::KQuant`]). Other GGUF types
    /// without a kernel are converted on the CPU: `Q5_0` to `Q8_0` (exact), and `Q5_1`, `Q2_K`,
    /// `Q3_K` requantized to `Q8_0` (8 bits per weight over their 2.6–6: a small added rounding
    /// error; `--dequantize` keeps the exact values).
    pub fn quantized(q: QTensor) -> Result<Self> {
        let device = q.device();
        if !device.is_cpu() {
            return Ok(Weight::Quantized(Arc::new(q)));
        }
        let (rows, cols) = q.shape().dims2().op("weight dims")?;
        let dtype = q.dtype();
        if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K) {
            let b = q.data().op("weight bytes")?;
            let w = match dtype {
                GgmlDType::Q4K => Q4K::pack(rows, cols, &b).map(KQuant::Q4K),
                GgmlDType::Q5K => Q5K::pack(rows, cols, &b).map(KQuant::Q5K),
                _ => Q6K::pack(rows, cols, &b).map(KQuant::Q6K),
            };
            let w = w.map_err(|e| Error::Shape {
                op: format!("pack {} weights", ggml_type_name(dtype)),
                expected: format!("{rows}x{cols}"),
                got: e.to_string(),
            })?;
            return Ok(Weight::KQuant(Arc::new(w)));
        }
        let (format, data): (QFormat, Cow<[u8]>) = match native_format(dtype, &device) {
            Some(Native::Quant(format)) => (format, q.data().op("weight bytes")?),
            _ => match dtype {
                GgmlDType::Q5_0 => {
                    let b = q.data().op("weight bytes")?;
                    let converted =
                        lmkit_kernels::convert::q5_0_to_q8_0(&b).map_err(|e| Error::Shape {
                            op: format!("{} weights", ggml_type_name(dtype)),
                            expected: format!("{rows}x{cols}"),
                            got: e.to_string(),
                        })?;
                    (QFormat::Q8_0, Cow::Owned(converted))
                }
                GgmlDType::Q5_1 | GgmlDType::Q2K | GgmlDType::Q3K if cols.is_multiple_of(32) => {
                    let f = q.dequantize(&device).op("dequantize for Q8_0")?;
                    let q8 = QTensor::quantize(&f, GgmlDType::Q8_0).op("requantize to Q8_0")?;
                    let b = q8.data().op("weight bytes")?.into_owned();
                    (QFormat::Q8_0, Cow::Owned(b))
                }
                _ => return Ok(Weight::Quantized(Arc::new(q))),
            },
        };
        if !matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0) {
            tracing::debug!(
                "{rows}x{cols} {} weight converted to {format:?} for lmkit's kernels",
                ggml_type_name(dtype)
            );
        }
        let p = Packed::pack(format, rows, cols, &data).map_err(|e| Error::Shape {
            op: "pack weights".into(),
            expected: format!("{rows}x{cols} {format:?}"),
            got: e.to_string(),
        })?;
        Ok(Weight::Packed(Arc::new(p)))
    }

    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2().op("weight dims"),
            Weight::Quantized(q) => q.shape().dims2().op("weight dims"),
            Weight::Packed(p) => Ok((p.rows, p.cols)),
            Weight::KQuant(w) => Ok((w.rows(), w.cols())),
            Weight::LowBit(l) => Ok((l.w.rows, l.w.cols)),
        }
    }

    /// The storage type name, as GGUF spells it (`F32`, `Q4_1`, ...).
    pub fn type_name(&self) -> String {
        match self {
            Weight::Dense(t) => format!("{:?}", t.dtype()).to_uppercase(),
            Weight::Quantized(q) => ggml_type_name(q.dtype()).to_string(),
            Weight::Packed(p) => format!("{:?}", p.format),
            Weight::KQuant(w) => w.type_name().into(),
            Weight::LowBit(l) => lowbit_type_name(l),
        }
    }

    /// Bytes this weight occupies in memory.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quantized(q) => q.storage_size_in_bytes(),
            Weight::Packed(p) => p.size_in_bytes(),
            Weight::KQuant(w) => w.size_in_bytes(),
            Weight::LowBit(l) => l.size_in_bytes(),
        }
    }

    /// The weight as a dense f32 tensor (dequantized if needed).
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => t.to_dtype(DType::F32).op("to f32"),
            Weight::Quantized(q) => q.dequantize(&q.device()).op("dequantize"),
            Weight::Packed(_) | Weight::KQuant(_) => {
                let (rows, cols) = self.dims2()?;
                let mut v = vec![0f32; rows * cols];
                for (r, row) in v.chunks_exact_mut(cols).enumerate() {
                    self.dequantize_row(r, row)?;
                }
                Tensor::from_vec(v, (rows, cols), &candle_core::Device::Cpu).op("dequantize")
            }
            Weight::LowBit(l) => Tensor::from_vec(
                l.dequantize(),
                (l.w.rows, l.w.cols),
                &candle_core::Device::Cpu,
            )
            .op("dequantize"),
        }
    }
}

impl Weight {
    /// Row `r` of an interleaved weight ([`Weight::Packed`], [`Weight::KQuant`]) dequantized
    /// into `out`.
    fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Weight::Packed(p) => p.dequantize_row(r, out),
            Weight::KQuant(w) => w.dequantize_row(r, out),
            _ => {
                return Err(Error::Unsupported(format!(
                    "row dequantization of a {} weight",
                    self.type_name()
                )))
            }
        }
        Ok(())
    }

    /// The interleaved weights' kernel view (`None` for other kinds).
    fn interleaved_view(&self) -> Option<WeightView<'_>> {
        match self {
            Weight::Packed(p) => Some(WeightView::Packed(p)),
            Weight::KQuant(w) => Some(WeightView::KQuant(w)),
            _ => None,
        }
    }
}

/// lmkit's name for a low-bit layer: `LB2`/`LB3`/`LB4`, `+R` when it has rotations (QuIP).
pub fn lowbit_type_name(l: &LowBitLinear) -> String {
    let rot = if l.input.is_some() || l.output.is_some() {
        "+R"
    } else {
        ""
    };
    format!("LB{}{rot}", l.w.bits)
}

/// GGUF's name for a block type.
pub fn ggml_type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// A weight format with one of lmkit's own CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Native {
    /// Block-quantized, 8-bit activations.
    Quant(QFormat),
    /// f16 weights widened in registers, f32 activations.
    F16,
    /// bf16 weights widened in registers, f32 activations.
    BF16,
}

impl Native {
    /// `data` as the dense kernel's f16 or bf16 weights (`None` for block-quantized formats).
    fn dense<'a>(&self, data: &'a [u8]) -> Option<Dense<'a>> {
        match self {
            Native::F16 => Some(Dense::F16(data)),
            Native::BF16 => Some(Dense::BF16(data)),
            Native::Quant(_) => None,
        }
    }
}

/// Rows of `x` from which f16/bf16 weights run through a dequantized f32 GEMM instead of the
/// dense kernel (which is a GEMV per row of `x`).
const HALF_GEMM_MIN_ROWS: usize = 16;

/// lmkit's own kernel for a candle block type, when there is one (CPU only).
fn native_format(t: GgmlDType, device: &candle_core::Device) -> Option<Native> {
    if !device.is_cpu() {
        return None;
    }
    match t {
        GgmlDType::Q4_0 => Some(Native::Quant(QFormat::Q4_0)),
        GgmlDType::Q4_1 => Some(Native::Quant(QFormat::Q4_1)),
        GgmlDType::Q8_0 => Some(Native::Quant(QFormat::Q8_0)),
        GgmlDType::F16 => Some(Native::F16),
        GgmlDType::BF16 => Some(Native::BF16),
        _ => None,
    }
}

/// The rows of `x (.., in)` as one f32 vector, for the kernels.
fn input_rows(x: &Tensor) -> Result<Vec<f32>> {
    x.to_dtype(DType::F32)
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1::<f32>())
        .op("qmatmul input")
}

/// `y = x Wᵀ` with a dense `W (out, in)` through candle's GEMM.
///
/// # Shapes
/// `x`: `(.., in)` → `(.., out)`.
fn dense_matmul(x: &Tensor, w: &Tensor, inp: usize) -> Result<Tensor> {
    let mut shape: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
    let rows: usize = shape.iter().product();
    let x2 = x.reshape((rows, inp)).op("linear reshape")?;
    // Mixed precision: the activations' dtype decides (f32 master weights run in bf16 when the
    // model computes in bf16; the cast is differentiable, so gradients reach the f32 weights).
    let w = match w.dtype() == x.dtype() {
        true => Cow::Borrowed(w),
        false => Cow::Owned(w.to_dtype(x.dtype()).op("linear weight cast")?),
    };
    // A frozen weight under a graph (LoRA's base layers): skip its unwanted gradient.
    let y = if x2.track_op() && !w.track_op() {
        crate::frozen::matmul_t(&x2, &w)?
    } else {
        x2.matmul(&w.t().op("linear")?).op("linear matmul")?
    };
    shape.push(w.dims()[0]);
    y.reshape(shape).op("linear reshape")
}

/// `y = x Wᵀ` through lmkit-kernels.
///
/// # Shapes
/// `x`: `(.., in)` → `(.., out)`.
fn native_matmul(
    q: &QTensor,
    native: Native,
    x: &Tensor,
    out: usize,
    inp: usize,
) -> Result<Tensor> {
    let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
    let n: usize = lead.iter().product();
    if matches!(native, Native::F16 | Native::BF16) && n >= HALF_GEMM_MIN_ROWS {
        // Prompts: widen W once and use the f32 GEMM (the temporary is one matrix).
        let w = q.dequantize(&q.device()).op("half-precision weights")?;
        return dense_matmul(x, &w, inp);
    }
    let xs = input_rows(x)?;
    let data = q.data().op("qmatmul weights")?;
    let mut y = vec![0f32; n * out];
    let r = match (native, native.dense(&data)) {
        (Native::Quant(format), _) => {
            let w = QMatrix {
                format,
                rows: out,
                cols: inp,
                data: &data,
            };
            lmkit_kernels::matmul(&w, &xs, n, &mut y)
        }
        (_, Some(w)) => lmkit_kernels::dense::matmul(w, out, inp, &xs, n, &mut y),
        (_, None) => Err(lmkit_kernels::Error::Shape {
            op: "native matmul",
            why: format!("no kernel for {native:?}"),
        }),
    };
    r.map_err(|e| Error::Shape {
        op: "qmatmul".into(),
        expected: format!("(.., {inp})"),
        got: e.to_string(),
    })?;
    let mut shape = lead;
    shape.push(out);
    Tensor::from_vec(y, shape, x.device()).op("qmatmul output")
}

/// `y = x Wᵀ` for a low-bit layer (rotations, 8-bit activations, integer dot products).
///
/// # Shapes
/// `x`: `(.., in)` → `(.., out)`.
fn lowbit_matmul(l: &LowBitLinear, x: &Tensor) -> Result<Tensor> {
    let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
    let n: usize = lead.iter().product();
    let xs = input_rows(x)?;
    let mut y = vec![0f32; n * l.w.rows];
    l.matmul(&xs, n, &mut y);
    let mut shape = lead;
    shape.push(l.w.rows);
    Tensor::from_vec(y, shape, x.device())
        .and_then(|y| y.to_dtype(x.dtype()))
        .op("low-bit matmul output")
}

/// `y + b`, with `b` cast to `y`'s dtype (mixed precision).
fn add_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match b {
        Some(b) if b.dtype() == y.dtype() => y.broadcast_add(b).op("linear bias"),
        Some(b) => b
            .to_dtype(y.dtype())
            .and_then(|b| y.broadcast_add(&b))
            .op("linear bias"),
        None => Ok(y),
    }
}

/// `y = x Wᵀ + b` for any weight format.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    native: Option<Native>,
    matmul: Option<QMatMul>,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
    /// A low-rank adapter added to the output (training, or an unmerged PEFT adapter).
    lora: Option<LoraAdapter>,
}

impl Linear {
    /// A dense layer; `weight` is `(out, in)`, `bias` is `(out,)`.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2().op("linear weight")?;
        check_bias(&bias, out_features)?;
        Ok(Self {
            weight: Weight::Dense(weight),
            native: None,
            matmul: None,
            bias,
            out_features,
            in_features,
            lora: None,
        })
    }

    /// A quantized layer; `weight` has logical shape `(out, in)`.
    pub fn quantized(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = match Weight::quantized(weight)? {
            Weight::Quantized(q) => Arc::try_unwrap(q)
                .map_err(|_| Error::Unsupported("shared quantized weight".into()))?,
            w => return Self::new(w, bias),
        };
        let (out_features, in_features) = weight.shape().dims2().op("linear weight")?;
        check_bias(&bias, out_features)?;
        let native = native_format(weight.dtype(), &weight.device());
        let weight = Arc::new(weight);
        let matmul = match native {
            Some(_) => None,
            None => Some(QMatMul::from_arc(weight.clone()).op("quantized matmul")?),
        };
        Ok(Self {
            weight: Weight::Quantized(weight),
            native,
            matmul,
            bias,
            out_features,
            in_features,
            lora: None,
        })
    }

    /// A layer on a packed block-quantized weight (see [`Weight::Packed`]).
    pub fn packed(weight: Arc<Packed>, bias: Option<Tensor>) -> Result<Self> {
        Self::interleaved(Weight::Packed(weight), bias)
    }

    /// A layer on any weight: `bias` is `(out,)`.
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        match weight {
            Weight::Dense(t) => Self::dense(t, bias),
            Weight::LowBit(l) => Self::lowbit(l, bias),
            Weight::Quantized(q) => Self::quantized(
                Arc::try_unwrap(q)
                    .map_err(|_| Error::Unsupported("shared quantized weight".into()))?,
                bias,
            ),
            w @ (Weight::Packed(_) | Weight::KQuant(_)) => Self::interleaved(w, bias),
        }
    }

    /// A layer on a weight with rows interleaved for lmkit's kernels.
    fn interleaved(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        check_bias(&bias, out_features)?;
        Ok(Self {
            out_features,
            in_features,
            weight,
            native: None,
            matmul: None,
            bias,
            lora: None,
        })
    }

    /// A layer on a low-bit weight (see [`Weight::LowBit`]).
    pub fn lowbit(weight: Arc<LowBitLinear>, bias: Option<Tensor>) -> Result<Self> {
        check_bias(&bias, weight.w.rows)?;
        Ok(Self {
            out_features: weight.w.rows,
            in_features: weight.w.cols,
            weight: Weight::LowBit(weight),
            native: None,
            matmul: None,
            bias,
            lora: None,
        })
    }

    /// # Shapes
    /// `x`: `(.., in)` → `(.., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        match &self.lora {
            Some(l) => (y + l.forward(x)?).op("lora add"),
            None => Ok(y),
        }
    }

    /// The layer without its adapter.
    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let in_dim = x.dims().last().copied().unwrap_or(0);
        if in_dim != self.in_features {
            return Err(Error::Shape {
                op: "linear".into(),
                expected: format!("(.., {})", self.in_features),
                got: format!("{:?}", x.dims()),
            });
        }
        let y = match (&self.weight, &self.matmul) {
            (Weight::LowBit(l), _) => lowbit_matmul(l, x)?,
            (Weight::Packed(_) | Weight::KQuant(_), _) => {
                // These weights live in host memory for lmkit's CPU kernels.
                if !x.device().is_cpu() {
                    return Err(Error::Unsupported(format!(
                        "a {} weight (held for the CPU kernels) with an input on {:?}: load \
                         the model on that device instead",
                        self.weight.type_name(),
                        x.device()
                    )));
                }
                let base = Self {
                    lora: None,
                    ..self.clone()
                };
                return Ok(Self::forward_many(&[&base], x)?.swap_remove(0));
            }
            (Weight::Quantized(q), None) if self.native.is_some() => {
                let f = self
                    .native
                    .ok_or_else(|| Error::Unsupported("kernel".into()))?;
                native_matmul(q, f, x, self.out_features, self.in_features)?
            }
            // candle's quantized kernels take contiguous f32 inputs.
            (_, Some(mm)) if x.dtype() == DType::F32 && x.is_contiguous() => {
                mm.forward(x).op("quantized matmul")?
            }
            (_, Some(mm)) => mm
                .forward(
                    &x.to_dtype(DType::F32)
                        .and_then(|x| x.contiguous())
                        .op("quantized matmul input")?,
                )
                .and_then(|y| y.to_dtype(x.dtype()))
                .op("quantized matmul")?,
            (Weight::Dense(w), None) => dense_matmul(x, w, self.in_features)?,
            (Weight::Quantized(_), None) => {
                return Err(Error::Unsupported(
                    "quantized weight without a kernel".into(),
                ))
            }
        };
        add_bias(y, self.bias.as_ref())
    }

    /// Several layers applied to the same input, e.g. q/k/v or gate/up. Block-quantized layers
    /// with lmkit kernels run as one parallel pass with the input quantized once; any other mix
    /// runs layer by layer.
    ///
    /// # Shapes
    /// `x`: `(.., in)` → one `(.., out_i)` per layer.
    pub fn forward_many(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let views: Vec<WeightView> = layers
            .iter()
            .filter_map(|l| l.weight.interleaved_view())
            .collect();
        let fused = !layers.is_empty()
            && layers.iter().all(|l| l.lora.is_none())
            && x.device().is_cpu()
            && views.len() == layers.len()
            && layers
                .iter()
                .all(|l| l.in_features == layers[0].in_features);
        if !fused {
            return layers.iter().map(|l| l.forward(x)).collect();
        }
        let inp = layers[0].in_features;
        let in_dim = x.dims().last().copied().unwrap_or(0);
        if in_dim != inp {
            return Err(Error::Shape {
                op: "linear".into(),
                expected: format!("(.., {inp})"),
                got: format!("{:?}", x.dims()),
            });
        }
        let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
        let n: usize = lead.iter().product();
        let xs = input_rows(x)?;
        let mut ys: Vec<Vec<f32>> = layers
            .iter()
            .map(|l| vec![0f32; n * l.out_features])
            .collect();
        {
            let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
            lmkit_kernels::weight::matmul_many(&views, &xs, n, &mut outs).map_err(|e| {
                Error::Shape {
                    op: "qmatmul".into(),
                    expected: format!("(.., {inp})"),
                    got: e.to_string(),
                }
            })?;
        }
        let mut out = Vec::with_capacity(layers.len());
        for (l, y) in layers.iter().zip(ys) {
            let mut shape = lead.clone();
            shape.push(l.out_features);
            let t = Tensor::from_vec(y, shape, x.device()).op("qmatmul output")?;
            out.push(match &l.bias {
                Some(b) => add_bias(t, Some(b))?,
                None => t,
            });
        }
        Ok(out)
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// The same layer without its bias (the weights shared, not copied): for a caller that
    /// adds the bias itself, in another dtype.
    pub fn without_bias(&self) -> Linear {
        Self {
            bias: None,
            ..self.clone()
        }
    }
    pub fn in_features(&self) -> usize {
        self.in_features
    }
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The weight's storage borrowed for lmkit's CPU kernels, or `None` when it has no kernel
    /// (another block type, or not on the CPU).
    pub fn kernel_data(&self) -> Result<Option<KernelData<'_>>> {
        if self.lora.is_some() {
            return Ok(None); // the native path has no adapters: merge first
        }
        let (rows, cols) = (self.out_features, self.in_features);
        match (&self.weight, self.native) {
            (Weight::Packed(p), _) => Ok(Some(KernelData::Packed(p))),
            (Weight::KQuant(w), _) => Ok(Some(KernelData::KQuant(w))),
            (Weight::LowBit(l), _) => Ok(Some(KernelData::LowBit(l))),
            (Weight::Quantized(q), Some(native)) => Ok(Some(KernelData::Bytes {
                native,
                data: q.data().op("kernel weights")?,
                rows,
                cols,
            })),
            (Weight::Dense(t), _) if t.device().is_cpu() && t.dtype() == DType::F32 => {
                let (storage, layout) = t.storage_and_layout();
                match layout.contiguous_offsets() {
                    Some((start, end)) => Ok(Some(KernelData::F32 {
                        storage,
                        start,
                        end,
                        rows,
                        cols,
                    })),
                    None => Ok(None),
                }
            }
            _ => Ok(None),
        }
    }

    /// The same layer with a LoRA adapter (replacing any earlier one); `a (r, in)`,
    /// `b (out, r)`.
    pub fn with_lora(&self, lora: LoraAdapter) -> Result<Self> {
        let r = lora.a.dims().first().copied().unwrap_or(0);
        if lora.a.dims() != [r, self.in_features] || lora.b.dims() != [self.out_features, r] {
            return Err(Error::Shape {
                op: "lora".into(),
                expected: format!(
                    "A ({r}, {}), B ({}, {r})",
                    self.in_features, self.out_features
                ),
                got: format!("A {:?}, B {:?}", lora.a.dims(), lora.b.dims()),
            });
        }
        Ok(Self {
            lora: Some(lora),
            ..self.clone()
        })
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// The adapter folded into an f32 dense weight (`W + s·B A`); without one, the layer as is.
    pub fn merge_lora(&self) -> Result<Self> {
        match &self.lora {
            None => Ok(self.clone()),
            Some(l) => {
                let w = (self.weight.to_f32()? + l.delta()?).op("lora merge")?;
                Self::dense(w, self.bias.clone())
            }
        }
    }

    /// The same layer with an f32 dense weight.
    pub fn dequantize(&self) -> Result<Self> {
        Self::dense(self.weight.to_f32()?, self.bias.clone())
    }
}

/// A weight's storage held for the kernels (see [`Linear::kernel_data`]); [`KernelData::view`]
/// borrows it as a [`WeightView`].
pub enum KernelData<'a> {
    Packed(&'a Packed),
    KQuant(&'a KQuant),
    /// Codes and the layer's rotations (the native path applies them around the product).
    LowBit(&'a LowBitLinear),
    Bytes {
        native: Native,
        data: Cow<'a, [u8]>,
        rows: usize,
        cols: usize,
    },
    F32 {
        storage: StorageRef<'a>,
        start: usize,
        end: usize,
        rows: usize,
        cols: usize,
    },
}

impl KernelData<'_> {
    /// The rotation applied to the input before the product (QuIP layers).
    pub fn input_rotation(&self) -> Option<&lmkit_kernels::Rotation> {
        match self {
            KernelData::LowBit(l) => l.input.as_ref(),
            _ => None,
        }
    }

    /// The rotation whose transpose is applied to the product's output (QuIP layers).
    pub fn output_rotation(&self) -> Option<&lmkit_kernels::Rotation> {
        match self {
            KernelData::LowBit(l) => l.output.as_ref(),
            _ => None,
        }
    }

    pub fn view(&self) -> Result<WeightView<'_>> {
        let v = match self {
            KernelData::Packed(p) => WeightView::Packed(p),
            KernelData::KQuant(w) => WeightView::KQuant(w),
            KernelData::LowBit(l) => WeightView::LowBit(&l.w),
            KernelData::Bytes {
                native: Native::Quant(format),
                data,
                rows,
                cols,
            } => WeightView::Quant(QMatrix {
                format: *format,
                rows: *rows,
                cols: *cols,
                data,
            }),
            KernelData::Bytes {
                native,
                data,
                rows,
                cols,
            } => match native.dense(data) {
                Some(w) => WeightView::Dense {
                    w,
                    rows: *rows,
                    cols: *cols,
                },
                None => return Err(Error::Unsupported(format!("kernel view of {native:?}"))),
            },
            KernelData::F32 {
                storage,
                start,
                end,
                rows,
                cols,
            } => match &**storage {
                Storage::Cpu(CpuStorage::F32(v)) => WeightView::Dense {
                    w: Dense::F32(&v[*start..*end]),
                    rows: *rows,
                    cols: *cols,
                },
                _ => return Err(Error::Unsupported("kernel view of non-f32 storage".into())),
            },
        };
        v.check().map_err(|e| Error::Shape {
            op: "kernel weights".into(),
            expected: format!("{}x{}", v.rows(), v.cols()),
            got: e.to_string(),
        })?;
        Ok(v)
    }
}

fn check_bias(bias: &Option<Tensor>, out: usize) -> Result<()> {
    if let Some(b) = bias {
        if b.dims() != [out] {
            return Err(Error::Shape {
                op: "linear bias".into(),
                expected: format!("({out},)"),
                got: format!("{:?}", b.dims()),
            });
        }
    }
    Ok(())
}

/// Token embedding table `(v, c)`, dense or quantized (rows are dequantized on lookup).
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Weight,
    vocab: usize,
    hidden: usize,
}

impl Embedding {
    pub fn new(table: Weight) -> Result<Self> {
        let (vocab, hidden) = table.dims2()?;
        Ok(Self {
            table,
            vocab,
            hidden,
        })
    }

    /// # Shapes
    /// `ids`: `(b, t)` u32 → `(b, t, c)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.table {
            Weight::Dense(t) => {
                let flat = ids.flatten_all().op("embedding ids")?;
                let rows = crate::embed_grad::embedding_rows(t, &flat)?;
                let mut shape = ids.dims().to_vec();
                shape.push(self.hidden);
                rows.reshape(shape).op("embedding reshape")
            }
            Weight::Quantized(q) => q.embedding(ids).op("quantized embedding"),
            Weight::Packed(_) | Weight::KQuant(_) => {
                let flat = ids
                    .flatten_all()
                    .and_then(|t| t.to_dtype(DType::U32))
                    .and_then(|t| t.to_vec1::<u32>())
                    .op("embedding ids")?;
                let mut v = vec![0f32; flat.len() * self.hidden];
                for (&id, row) in flat.iter().zip(v.chunks_exact_mut(self.hidden)) {
                    if id as usize >= self.vocab {
                        return Err(Error::Shape {
                            op: "embedding".into(),
                            expected: format!("token ids below {}", self.vocab),
                            got: id.to_string(),
                        });
                    }
                    self.table.dequantize_row(id as usize, row)?;
                }
                let mut shape = ids.dims().to_vec();
                shape.push(self.hidden);
                Tensor::from_vec(v, shape, ids.device()).op("embedding")
            }
            Weight::LowBit(_) => Err(Error::Unsupported(
                "a low-bit embedding table (embeddings keep a block format)".into(),
            )),
        }
    }

    pub fn weight(&self) -> &Weight {
        &self.table
    }
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The same table dequantized to f32.
    pub fn dequantize(&self) -> Result<Self> {
        Self::new(Weight::Dense(self.table.to_f32()?))
    }

    /// A `Linear` sharing this table (tied input/output embeddings).
    pub fn as_linear(&self) -> Result<Linear> {
        match &self.table {
            Weight::Dense(t) => Linear::dense(t.clone(), None),
            w @ (Weight::Packed(_) | Weight::KQuant(_)) => Linear::interleaved(w.clone(), None),
            Weight::LowBit(l) => Linear::lowbit(l.clone(), None),
            Weight::Quantized(q) => {
                let native = native_format(q.dtype(), &q.device());
                let matmul = match native {
                    Some(_) => None,
                    None => Some(QMatMul::from_arc(q.clone()).op("quantized matmul")?),
                };
                Ok(Linear {
                    weight: Weight::Quantized(q.clone()),
                    native,
                    matmul,
                    bias: None,
                    out_features: self.vocab,
                    in_features: self.hidden,
                    lora: None,
                })
            }
        }
    }
}
