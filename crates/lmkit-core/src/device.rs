//! Choosing where tensors live and in what precision: `--device cpu|cuda[:N]`, `--dtype`.
//!
//! The CUDA backend is candle's, behind the `cuda` cargo feature (off by default; build with
//! `scripts/build-cuda`, see `docs/cuda.md`). A build without it answers `--device cuda` with a
//! clear error instead of failing later.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// Whether this build can run on CUDA GPUs.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Parses `cpu`, `cuda` (GPU 0) or `cuda:N` and opens the device.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let invalid = |why: &str| Error::Invalid {
        what: format!("device `{spec}`"),
        why: why.into(),
    };
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| invalid("expected cpu, cuda or cuda:N"))?,
        None => return Err(invalid("expected cpu, cuda or cuda:N")),
    };
    open_cuda(ordinal)
}

/// Opens GPU `ordinal` for lmkit's one-stream use: cudarc's per-buffer event tracking is off.
/// It records CUDA events around every kernel so that buffers can be shared across streams;
/// lmkit runs each device on one stream, where stream order alone keeps reads, writes and frees
/// in sequence, and the events cost host time on every launch (decoding is launch-bound).
///
/// The stream-ordered memory pool keeps its default release threshold. An unlimited one (to
/// reuse memory across steps as PyTorch's caching allocator does) was tried once, in a run
/// that also had a since-fixed leak of every step's gradients; it is not yet re-measured.
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda(ordinal).map_err(|source| Error::Candle {
        op: format!("opening CUDA device {ordinal} (is the NVIDIA driver loaded?)"),
        source,
    })?;
    if let Device::Cuda(cuda) = &device {
        // SAFETY: every tensor of this device is used on its one stream (see above).
        unsafe { cuda.disable_event_tracking() };
        if std::env::var("LMKIT_CUBLAS_EXACT").is_ok_and(|v| v == "1") {
            exact_reductions(cuda)?;
        }
    }
    Ok(device)
}

/// `LMKIT_CUBLAS_EXACT=1`: cuBLAS keeps its split-k partial sums of bf16/f16 products in f32
/// (`CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION`) where its default may round them to
/// the output type. An experiment for the bf16 logits check of docs/cuda.md, which compares
/// CPU and GPU logits whose products should differ only in f32's rounding.
#[cfg(feature = "cuda")]
fn exact_reductions(cuda: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::sys;
    let blas = cuda.cublas_handle();
    let mode = sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
    // SAFETY: the handle is the device's live cuBLAS handle; the call only sets a mode on it.
    let status = unsafe { sys::cublasSetMathMode(*blas.handle(), mode) };
    match status {
        sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        other => Err(Error::Unsupported(format!(
            "LMKIT_CUBLAS_EXACT: cublasSetMathMode failed ({other:?})"
        ))),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<Device> {
    Err(Error::Unsupported(
        "this lmkit was built without CUDA: rebuild with `scripts/build-cuda` \
         (the `cuda` cargo feature), see docs/cuda.md"
            .into(),
    ))
}

/// Parses a compute precision: `f32`, `f16` or `bf16` (`auto` is [`dtype_for`]'s).
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::Invalid {
            what: format!("dtype `{other}`"),
            why: "expected f32, f16, bf16 or auto".into(),
        }),
    }
}

/// The dtype `spec` names for tensors on `device`: [`parse_dtype`]'s names, or `auto` for
/// [`auto_dtype`].
pub fn dtype_for(spec: &str, device: &Device) -> Result<DType> {
    match spec.trim().eq_ignore_ascii_case("auto") {
        true => Ok(auto_dtype(device)),
        false => parse_dtype(spec),
    }
}

/// The fast compute dtype of `device`, as HF transformers and mistral.rs choose it: f32 on the
/// CPU; bf16 on a GPU with bf16 tensor cores (compute capability 8.0 or newer), else f16.
pub fn auto_dtype(device: &Device) -> DType {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => match d.cuda_stream().context().compute_capability() {
            Ok((major, _)) if major >= 8 => DType::BF16,
            _ => DType::F16,
        },
        _ => DType::F32,
    }
}

/// The compute dtype for training on `device` when none is named (or `auto`): bf16 on a GPU
/// with bf16 tensor cores, else f32. Not f16: bf16 has f32's range, where f16's small
/// gradients need loss scaling (which the trainer does for f16, as PyTorch's `GradScaler`).
pub fn auto_train_dtype(device: &Device) -> DType {
    match auto_dtype(device) {
        DType::BF16 => DType::BF16,
        _ => DType::F32,
    }
}

/// [`dtype_for`] for training: `auto` is [`auto_train_dtype`].
pub fn train_dtype_for(spec: &str, device: &Device) -> Result<DType> {
    match spec.trim().eq_ignore_ascii_case("auto") {
        true => Ok(auto_train_dtype(device)),
        false => parse_dtype(spec),
    }
}

/// The warning for training in `dtype` with the loss `scaled` or not, if any (f16 without
/// loss scaling).
pub fn train_dtype_warning(dtype: DType, scaled: bool) -> Option<&'static str> {
    (dtype == DType::F16 && !scaled).then_some(
        "training in f16 without loss scaling: gradients below ~6e-8 flush to zero; \
         bf16 (GPUs of compute capability 8.0 or newer) or f32 avoid it",
    )
}

/// A short name for a device (`cpu`, `cuda:0`).
pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match d.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// The memory this machine can still give a process (Linux's `MemAvailable`, in bytes), when
/// known.
pub fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Waits for the device's queued work (timing and benchmarks; a no-op on the CPU).
pub fn synchronize(d: &Device) -> Result<()> {
    d.synchronize().map_err(|source| Error::Candle {
        op: "device synchronize".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert!(parse_device("cpu").is_ok_and(|d| d.is_cpu()));
        assert!(parse_device("gpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        if !CUDA_BUILT {
            let e = parse_device("cuda:0").err().map(|e| e.to_string());
            assert!(e.is_some_and(|e| e.contains("built without CUDA")));
        }
        assert_eq!(parse_dtype("BF16").ok(), Some(DType::BF16));
        assert_eq!(parse_dtype("f16").ok(), Some(DType::F16));
        assert!(parse_dtype("int8").is_err());
        // auto: f32 on the CPU; the named dtypes as parse_dtype reads them.
        assert_eq!(dtype_for(" Auto", &Device::Cpu).ok(), Some(DType::F32));
        assert_eq!(dtype_for("bf16", &Device::Cpu).ok(), Some(DType::BF16));
        let e = dtype_for("fp8", &Device::Cpu)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("fp8") && e.contains("auto"), "{e}");
        // Training: auto is never f16 (no loss scaling); f16 named gets a warning.
        assert_eq!(train_dtype_for("auto", &Device::Cpu).ok(), Some(DType::F32));
        assert_eq!(auto_train_dtype(&Device::Cpu), DType::F32);
        assert_eq!(train_dtype_for("f16", &Device::Cpu).ok(), Some(DType::F16));
        if cfg!(target_os = "linux") {
            assert!(host_memory_available().is_some_and(|b| b > 0));
        }
        let w = train_dtype_warning(DType::F16, false);
        assert!(w.is_some_and(|w| w.contains("loss scaling")));
        assert!(train_dtype_warning(DType::F16, true).is_none());
        assert!(train_dtype_warning(DType::BF16, false).is_none());
    }
}
