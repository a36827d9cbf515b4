//! Launching lmkit's own CUDA kernels (`cuda/fused.cu`, compiled to PTX by `build.rs`),
//! through candle's cache of custom modules. The math of each kernel is in its CPU twin:
//! [`crate::attn_softmax`] and [`crate::xent`].

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

/// Rows of attention scores per block of the softmax kernels (one warp each).
const ROWS_PER_BLOCK: usize = 4;
/// Threads per row of the cross-entropy kernels.
const XENT_THREADS: u32 = 512;

fn launch_cfg(blocks: usize, threads: u32) -> Result<LaunchConfig> {
    let blocks = u32::try_from(blocks)
        .map_err(|_| candle_core::Error::msg(format!("{blocks} CUDA blocks is too many")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        d => candle_core::bail!("lmkit's CUDA kernels take f32, bf16 or f16, not {d:?}"),
    }
}

/// The elements of `s` under the contiguous layout `l`.
fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("lmkit's CUDA kernels need contiguous inputs")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::msg(format!("{what} {v} is too large")))
}

/// Scalar arguments shared by the two softmax kernels.
#[derive(Clone, Copy)]
pub(crate) struct SoftmaxArgs {
    pub rows: usize,
    pub cols: usize,
    pub t: usize,
    pub offset: usize,
    pub scale: f32,
}

fn softmax_typed<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    inputs: &[CudaView<'_, T>],
    a: SoftmaxArgs,
) -> Result<CudaSlice<T>> {
    let f = dev.get_or_load_custom_func(name, "lmkit_fused", PTX)?;
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<T>(a.rows * a.cols)? };
    let (rows, cols, t, offset) = (
        a.rows as i64,
        int(a.cols, "columns")?,
        int(a.t, "positions")?,
        int(a.offset, "offset")?,
    );
    let mut b = f.builder();
    for x in inputs {
        b.arg(x);
    }
    b.arg(&out);
    b.arg(&rows);
    b.arg(&cols);
    b.arg(&t);
    b.arg(&offset);
    b.arg(&a.scale);
    let cfg = launch_cfg(a.rows.div_ceil(ROWS_PER_BLOCK), 32 * ROWS_PER_BLOCK as u32)?;
    // SAFETY: the argument list matches the kernel's signature in fused.cu.
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// `causal_softmax` (forward, one input) or `causal_softmax_bwd` (inputs y and g).
pub(crate) fn causal_softmax(
    inputs: &[(&CudaStorage, &Layout)],
    a: SoftmaxArgs,
    backward: bool,
) -> Result<CudaStorage> {
    let Some((first, _)) = inputs.first() else {
        candle_core::bail!("causal_softmax: no input")
    };
    let dev = first.device().clone();
    let dtype = first.dtype();
    let name = format!(
        "causal_softmax{}_{}",
        if backward { "_bwd" } else { "" },
        suffix(dtype)?
    );
    macro_rules! go {
        ($t:ty) => {{
            let views = inputs
                .iter()
                .map(|(s, l)| view::<$t>(s, l))
                .collect::<Result<Vec<_>>>()?;
            CudaStorage::wrap_cuda_slice(softmax_typed::<$t>(&dev, &name, &views, a)?, dev.clone())
        }};
    }
    Ok(match dtype {
        DType::F32 => go!(f32),
        DType::BF16 => go!(bf16),
        _ => go!(f16),
    })
}

/// Cross-entropy rows: `nll (rows,)` f32 from `z (rows, v)` and `targets (rows,)` u32, or with
/// `g (rows,)` f32 the gradient `(rows, v)` in z's dtype.
pub(crate) fn xent(
    z: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    g: Option<(&CudaStorage, &Layout)>,
    rows: usize,
    v: usize,
) -> Result<CudaStorage> {
    let dev = z.0.device().clone();
    let dtype = z.0.dtype();
    let name = format!(
        "xent_{}_{}",
        if g.is_some() { "bwd" } else { "fwd" },
        suffix(dtype)?
    );
    let f = dev.get_or_load_custom_func(&name, "lmkit_fused", PTX)?;
    let y = view::<u32>(targets.0, targets.1)?;
    let (rows_i, v_i) = (rows as i64, int(v, "vocabulary")?);
    let cfg = launch_cfg(rows, XENT_THREADS)?;
    macro_rules! go {
        ($t:ty) => {{
            let zv = view::<$t>(z.0, z.1)?;
            let mut b = f.builder();
            b.arg(&zv);
            b.arg(&y);
            match g {
                None => {
                    // SAFETY: the kernel writes every row's value.
                    let out = unsafe { dev.alloc::<f32>(rows)? };
                    b.arg(&out);
                    b.arg(&rows_i);
                    b.arg(&v_i);
                    // SAFETY: the argument list matches xent_fwd in fused.cu.
                    unsafe { b.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }
                Some((gs, gl)) => {
                    let gv = view::<f32>(gs, gl)?;
                    // SAFETY: the kernel writes every element.
                    let out = unsafe { dev.alloc::<$t>(rows * v)? };
                    b.arg(&gv);
                    b.arg(&out);
                    b.arg(&rows_i);
                    b.arg(&v_i);
                    // SAFETY: the argument list matches xent_bwd in fused.cu.
                    unsafe { b.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }
            }
        }};
    }
    Ok(match dtype {
        DType::F32 => go!(f32),
        DType::BF16 => go!(bf16),
        _ => go!(f16),
    })
}

/// AdamW's hyper-parameters for one step (bias corrections and decay factor included).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub bc1: f32,
    pub bc2: f32,
    pub eps: f32,
    /// `1 − lr·weight_decay`, or 1.
    pub decay: f32,
}

/// The gradient multiplier of [`adamw_in_place`].
pub enum GradScale<'a> {
    Host(f32),
    /// A one-element f32 tensor on the same device.
    Device(&'a candle_core::Tensor),
}

/// One AdamW update of the f32 CUDA tensors `p`, `m`, `v` in place (one kernel), for the
/// gradient `g`. Returns `false`, touching nothing, when they are not all contiguous f32
/// tensors of one size on one CUDA device (the caller then uses tensor ops).
///
/// The optimizer owns `m` and `v`, and `p` is a variable updated in place as `Var::set`
/// would; no other tensor may share their storage.
pub fn adamw_in_place(
    p: &candle_core::Tensor,
    m: &candle_core::Tensor,
    v: &candle_core::Tensor,
    g: &candle_core::Tensor,
    scale: GradScale<'_>,
    h: AdamStep,
) -> Result<bool> {
    use candle_core::Storage;
    let n = p.elem_count();
    let ok = |t: &candle_core::Tensor| {
        t.dtype() == DType::F32
            && t.elem_count() == n
            && t.is_contiguous()
            && t.device().same_device(p.device())
    };
    if !p.device().is_cuda() || ![p, m, v, g].into_iter().all(ok) {
        return Ok(false);
    }
    if let GradScale::Device(s) = &scale {
        if !(s.dtype() == DType::F32 && s.elem_count() == 1 && s.device().same_device(p.device())) {
            return Ok(false);
        }
    }
    let guards = [p, m, v, g].map(|t| t.storage_and_layout());
    let mut views = Vec::with_capacity(4);
    for (s, l) in &guards {
        let Storage::Cuda(s) = &**s else {
            return Ok(false);
        };
        views.push(view::<f32>(s, l)?);
    }
    let Storage::Cuda(first) = &*guards[0].0 else {
        return Ok(false);
    };
    let dev = first.device().clone();
    let name = match scale {
        GradScale::Host(_) => "adamw_f32",
        GradScale::Device(_) => "adamw_dev_f32",
    };
    let f = dev.get_or_load_custom_func(name, "lmkit_fused", PTX)?;
    let host_k;
    let dev_guard;
    let dev_k;
    let n_i = n as i64;
    let mut b = f.builder();
    for x in &views {
        b.arg(x);
    }
    match scale {
        GradScale::Host(k) => {
            host_k = k;
            b.arg(&host_k);
        }
        GradScale::Device(t) => {
            dev_guard = t.storage_and_layout();
            let Storage::Cuda(s) = &*dev_guard.0 else {
                return Ok(false);
            };
            dev_k = view::<f32>(s, dev_guard.1)?;
            b.arg(&dev_k);
        }
    }
    b.arg(&n_i);
    for x in [&h.lr, &h.beta1, &h.beta2, &h.bc1, &h.bc2, &h.eps, &h.decay] {
        b.arg(x);
    }
    let cfg = launch_cfg(n.div_ceil(256).clamp(1, 132 * 16), 256)?;
    // SAFETY: the argument list matches adamw_f32 / adamw_dev_f32 in fused.cu; p, m, v are
    // written through the views by the kernel only, in stream order.
    unsafe { b.launch(cfg) }.w()?;
    Ok(true)
}

/// The embedding table's gradient `(v, c)` f32 from `g (n, c)` f32 and `ids (n,)` u32.
pub(crate) fn embedding_grad(
    g: (&CudaStorage, &Layout),
    ids: (&CudaStorage, &Layout),
    n: usize,
    c: usize,
    v: usize,
) -> Result<CudaStorage> {
    let dev = g.0.device().clone();
    let f = dev.get_or_load_custom_func("embedding_bwd_f32", "lmkit_fused", PTX)?;
    let gv = view::<f32>(g.0, g.1)?;
    let iv = view::<u32>(ids.0, ids.1)?;
    let out = dev.alloc_zeros::<f32>(v * c)?;
    let (n_i, c_i, v_i) = (n as i64, int(c, "hidden size")?, v as i64);
    let mut b = f.builder();
    b.arg(&gv);
    b.arg(&iv);
    b.arg(&out);
    b.arg(&n_i);
    b.arg(&c_i);
    b.arg(&v_i);
    let cfg = launch_cfg((n * c).div_ceil(256).clamp(1, 132 * 16), 256)?;
    // SAFETY: the argument list matches embedding_bwd_f32 in fused.cu.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Threads per block of the RMSNorm backward kernel, and the most columns it takes.
pub(crate) const RMS_THREADS: usize = 256;
pub(crate) const RMS_MAX_COLS: usize = 16 * RMS_THREADS;

/// RMSNorm's backward: `(rows + blocks, c)` f32 holding ∂x in its first `rows` rows and the
/// per-block partial sums of ∂w in the rest.
pub(crate) fn rms_norm_bwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    rows: usize,
    c: usize,
    eps: f32,
) -> Result<(CudaStorage, usize)> {
    if c > RMS_MAX_COLS {
        candle_core::bail!("rms_norm_bwd: {c} columns, at most {RMS_MAX_COLS}")
    }
    let dev = x.0.device().clone();
    // The training path's kernel (train.cu), with no low-precision copy and no accumulation.
    let name = "tr_rms_bwd_f32";
    let (module, ptx) = crate::launch::cuda::module(name);
    let f = dev.get_or_load_custom_func(name, module, ptx)?;
    let blocks = rows.clamp(1, 132 * 4);
    let (xv, wv, gv) = (
        view::<f32>(x.0, x.1)?,
        view::<f32>(w.0, w.1)?,
        view::<f32>(g.0, g.1)?,
    );
    // SAFETY: the kernel writes every ∂x element and every partial sum.
    let out = unsafe { dev.alloc::<f32>((rows + blocks) * c)? };
    {
        let dx = out.slice(0..rows * c);
        let part = out.slice(rows * c..);
        let (rows_i, c_i) = (int(rows, "rows")?, int(c, "columns")?);
        let (no_copy, add) = (0u64, 0i32);
        let mut b = f.builder();
        b.arg(&xv);
        b.arg(&wv);
        b.arg(&gv);
        b.arg(&dx);
        b.arg(&no_copy);
        b.arg(&part);
        b.arg(&rows_i);
        b.arg(&c_i);
        b.arg(&eps);
        b.arg(&add);
        let cfg = launch_cfg(blocks, RMS_THREADS as u32)?;
        // SAFETY: the argument list matches tr_rms_bwd_f32 in train.cu (dx_lp null: none
        // written; accumulate 0: dx is written, not read).
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), blocks))
}
