//! Launching lmkit's decoding and training kernels (`cuda/decode.cu`, `cuda/train.cu`: names
//! that start with `tr_`) by name on raw buffer addresses, on a
//! GPU (feature `cuda`) or on the CPU emulator that runs the same kernel source (feature
//! `cuda-emu`, `cuda/emu/`), so the tests exercise every kernel and every launch without a GPU.
//!
//! Buffers are candle tensors: the caller allocates them, keeps them alive and passes their
//! addresses ([`Launcher::ptr`]); a kernel may write into a tensor that candle sees as
//! immutable, which is how the decoding step fills its preallocated buffers in place.

use candle_core::{DType, Device, Storage, Tensor};

use crate::{Error, Result};

/// One kernel argument: a buffer address, a 32-bit int or an f32 (the kernels' `int` and
/// `float` parameters).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

impl Arg {
    /// `v` as an `int` argument; an error names `what` when it does not fit.
    pub fn int(v: usize, what: &str) -> Result<Arg> {
        i32::try_from(v)
            .map(Arg::I32)
            .map_err(|_| Error::Unsupported(format!("{what} {v} exceeds a kernel's int range")))
    }
}

/// Where kernels run.
#[derive(Clone)]
pub enum Launcher {
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaDevice),
    #[cfg(feature = "cuda-emu")]
    Emu,
    /// Neither feature: nothing to launch on (keeps the enum inhabited).
    #[doc(hidden)]
    None,
}

/// A captured sequence of launches, replayed as one (a CUDA graph).
pub struct Graph {
    #[cfg(feature = "cuda")]
    inner: candle_core::cuda_backend::cudarc::driver::CudaGraph,
}

/// Suffix of the kernels' names for a storage dtype.
pub fn kernel_suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        d => Err(Error::Unsupported(format!(
            "lmkit's decoding kernels take f32, bf16 or f16 tensors, not {d:?}"
        ))),
    }
}

impl Launcher {
    /// The launcher for tensors on `device`: the GPU's, or on the CPU the emulator (with the
    /// `cuda-emu` feature); None when the kernels cannot run there.
    pub fn for_device(device: &Device) -> Option<Launcher> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Some(Launcher::Cuda(d.clone())),
            #[cfg(feature = "cuda-emu")]
            Device::Cpu => Some(Launcher::Emu),
            _ => None,
        }
    }

    /// Whether this runs on the CPU emulator.
    pub fn is_emulated(&self) -> bool {
        #[cfg(feature = "cuda-emu")]
        if matches!(self, Launcher::Emu) {
            return true;
        }
        false
    }

    /// The address of `t`'s first element; `t` must be contiguous and stay alive (and
    /// unmoved: candle never moves a storage) while kernels use the address.
    pub fn ptr(&self, t: &Tensor) -> Result<u64> {
        let (s, l) = t.storage_and_layout();
        let Some((start, _)) = l.contiguous_offsets() else {
            return Err(Error::Unsupported(
                "a kernel buffer must be a contiguous tensor".into(),
            ));
        };
        let offset = (start * t.dtype().size_in_bytes()) as u64;
        match &*s {
            Storage::Cpu(c) => {
                if !self.is_emulated() {
                    return Err(Error::Unsupported(
                        "a CPU tensor given to a GPU kernel".into(),
                    ));
                }
                use candle_core::CpuStorage as C;
                let base = match c {
                    C::F32(v) => v.as_ptr() as u64,
                    C::BF16(v) => v.as_ptr() as u64,
                    C::F16(v) => v.as_ptr() as u64,
                    C::U32(v) => v.as_ptr() as u64,
                    C::I64(v) => v.as_ptr() as u64,
                    C::U8(v) => v.as_ptr() as u64,
                    _ => {
                        return Err(Error::Unsupported(format!(
                            "no kernel buffers of {:?}",
                            t.dtype()
                        )))
                    }
                };
                Ok(base + offset)
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => {
                use candle_core::cuda_backend::cudarc::driver::DevicePtr;
                let Launcher::Cuda(dev) = self else {
                    return Err(Error::Unsupported(
                        "a GPU tensor given to the CPU emulator".into(),
                    ));
                };
                if c.device.id() != dev.id() {
                    return Err(Error::Unsupported(
                        "a tensor on another GPU than the kernels'".into(),
                    ));
                }
                let stream = dev.cuda_stream();
                macro_rules! addr {
                    ($t:ty) => {{
                        let slice = c.as_cuda_slice::<$t>()?;
                        let (p, _sync) = slice.device_ptr(&stream);
                        p
                    }};
                }
                let base = match t.dtype() {
                    DType::F32 => addr!(f32),
                    DType::BF16 => addr!(half::bf16),
                    DType::F16 => addr!(half::f16),
                    DType::U32 => addr!(u32),
                    DType::I64 => addr!(i64),
                    DType::U8 => addr!(u8),
                    d => return Err(Error::Unsupported(format!("no kernel buffers of {d:?}"))),
                };
                Ok(base + offset)
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::Unsupported(
                "kernel buffers live on the CPU (emulator) or a CUDA GPU".into(),
            )),
        }
    }

    /// Runs kernel `name` of `decode.cu` (or of `train.cu` when it starts with `tr_`) over a
    /// `(gx, gy)` grid of `threads`-thread blocks.
    pub fn launch(&self, name: &str, grid: (u32, u32), threads: u32, args: &[Arg]) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        match self {
            #[cfg(feature = "cuda")]
            Launcher::Cuda(dev) => cuda::launch(dev, name, grid, threads, args),
            #[cfg(feature = "cuda-emu")]
            Launcher::Emu => emu::launch(name, grid, threads, args),
            Launcher::None => {
                let _ = (name, threads, args);
                Err(Error::Unsupported("no kernel launcher".into()))
            }
        }
    }

    /// Launches a multi-tensor kernel (`train.cu`'s `tr_*_x8`) over `slots`, eight per launch:
    /// each launch's arguments are `prefix(launch)` then eight slots' arguments (`args`, with
    /// `n` the slot's element count), missing ones `empty`. `blocks(most)` sizes the grid from
    /// the launch's largest `n`. Returns the number of launches (at least one, so that a kernel
    /// that writes a result, such as a sum, writes it for no slots too).
    pub fn launch_x8(
        &self,
        name: &str,
        threads: u32,
        slots: &[(Vec<Arg>, usize)],
        empty: &[Arg],
        prefix: &mut dyn FnMut(usize) -> Result<Vec<Arg>>,
        blocks: &dyn Fn(usize) -> u32,
    ) -> Result<usize> {
        let launches = slots.len().div_ceil(8).max(1);
        for l in 0..launches {
            let mut args = prefix(l)?;
            let mut most = 0;
            for k in 0..8 {
                match slots.get(l * 8 + k) {
                    Some((a, n)) => {
                        most = most.max(*n);
                        args.extend_from_slice(a);
                    }
                    None => args.extend_from_slice(empty),
                }
            }
            self.launch(name, (blocks(most), 1), threads, &args)?;
        }
        Ok(launches)
    }

    /// Whether kernel `name` exists here (a GPU of an older architecture lacks the kernels
    /// compiled only for newer ones, such as `train.cu`'s flash attention below sm_80).
    pub fn has_kernel(&self, name: &str) -> bool {
        match self {
            #[cfg(feature = "cuda")]
            Launcher::Cuda(dev) => cuda::has(dev, name),
            #[cfg(feature = "cuda-emu")]
            Launcher::Emu => emu::has(name),
            Launcher::None => {
                let _ = name;
                false
            }
        }
    }

    /// On the emulator, makes every buffer count as off a 16-byte boundary, so the kernels take
    /// their one-value-at-a-time loops (a test of those loops; results must not change).
    #[cfg(feature = "cuda-emu")]
    pub fn emu_force_scalar(on: bool) {
        emu::force_scalar(on)
    }

    /// Loads the kernels (on a GPU the driver compiles their PTX, which can take a second on
    /// first use), so that the first launch does not pay for it.
    pub fn preload(&self) -> Result<()> {
        match self {
            #[cfg(feature = "cuda")]
            Launcher::Cuda(dev) => cuda::preload(dev),
            _ => Ok(()),
        }
    }

    /// Starts recording this device's launches into a graph (GPU only; the emulator records
    /// nothing and returns false).
    pub fn begin_capture(&self) -> Result<bool> {
        match self {
            #[cfg(feature = "cuda")]
            Launcher::Cuda(dev) => cuda::begin_capture(dev).map(|_| true),
            _ => Ok(false),
        }
    }

    /// Ends a capture begun by [`Launcher::begin_capture`].
    pub fn end_capture(&self) -> Result<Option<Graph>> {
        match self {
            #[cfg(feature = "cuda")]
            Launcher::Cuda(dev) => cuda::end_capture(dev),
            _ => Ok(None),
        }
    }
}

impl Graph {
    /// Replays the captured launches on the device's stream.
    pub fn launch(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            self.inner
                .launch()
                .map_err(|e| Error::Unsupported(format!("replaying a CUDA graph: {e}")))
        }
        #[cfg(not(feature = "cuda"))]
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::CudaDevice;

    use super::{Arg, Graph};
    use crate::{Error, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
    const TRAIN_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train.ptx"));

    /// The module that holds kernel `name`, and its PTX.
    pub(crate) fn module(name: &str) -> (&'static str, &'static str) {
        match name.starts_with("tr_") {
            true => ("lmkit_train", TRAIN_PTX),
            false => ("lmkit_decode", PTX),
        }
    }

    fn driver(what: &str, e: impl std::fmt::Display) -> Error {
        Error::Unsupported(format!("{what}: {e}"))
    }

    pub(super) fn launch(
        dev: &CudaDevice,
        name: &str,
        grid: (u32, u32),
        threads: u32,
        args: &[Arg],
    ) -> Result<()> {
        let (module, ptx) = module(name);
        let f = dev.get_or_load_custom_func(name, module, ptx)?;
        let mut b = f.builder();
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the callers pass the argument list of `name`'s signature in its .cu file, with
        // addresses of live tensors large enough for the grid.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    pub(super) fn has(dev: &CudaDevice, name: &str) -> bool {
        let (module, ptx) = module(name);
        dev.get_or_load_custom_func(name, module, ptx).is_ok()
    }

    pub(super) fn preload(dev: &CudaDevice) -> Result<()> {
        dev.get_or_load_custom_func("dec_advance", "lmkit_decode", PTX)?;
        Ok(())
    }

    pub(super) fn begin_capture(dev: &CudaDevice) -> Result<()> {
        dev.cuda_stream()
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| driver("starting a CUDA graph capture", e))
    }

    pub(super) fn end_capture(dev: &CudaDevice) -> Result<Option<Graph>> {
        let g = dev
            .cuda_stream()
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| driver("ending a CUDA graph capture", e))?;
        Ok(g.map(|inner| Graph { inner }))
    }
}

#[cfg(feature = "cuda-emu")]
mod emu {
    use std::ffi::{c_char, c_int, c_uint, CString};

    use super::Arg;
    use crate::{Error, Result};

    extern "C" {
        fn lmkit_emu_launch(
            name: *const c_char,
            gx: c_uint,
            gy: c_uint,
            threads: c_uint,
            args: *const u64,
            nargs: c_int,
            err: *mut c_char,
            errlen: c_int,
        ) -> c_int;
        fn lmkit_emu_force_scalar(on: c_int);
        fn lmkit_emu_has(name: *const c_char) -> c_int;
    }

    pub(super) fn has(name: &str) -> bool {
        let Ok(cname) = CString::new(name) else {
            return false;
        };
        let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: a NUL-terminated name; the emulator only looks it up.
        unsafe { lmkit_emu_has(cname.as_ptr()) != 0 }
    }

    pub(super) fn force_scalar(on: bool) {
        // SAFETY: sets an atomic flag.
        unsafe { lmkit_emu_force_scalar(c_int::from(on)) }
    }

    /// The emulator is one set of globals: one launch at a time in the process.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    pub(super) fn launch(name: &str, grid: (u32, u32), threads: u32, args: &[Arg]) -> Result<()> {
        let slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => v as i64 as u64,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        let cname =
            CString::new(name).map_err(|_| Error::Unsupported(format!("kernel name {name:?}")))?;
        let mut err = vec![0u8; 256];
        let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `slots` holds `args.len()` values and `err` 256 bytes; the emulator checks
        // the kernel's name and argument count, and the callers pass live buffers.
        let rc = unsafe {
            lmkit_emu_launch(
                cname.as_ptr(),
                grid.0,
                grid.1,
                threads,
                slots.as_ptr(),
                slots.len() as c_int,
                err.as_mut_ptr().cast(),
                err.len() as c_int,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
        Err(Error::Unsupported(format!(
            "CUDA emulator: {}",
            String::from_utf8_lossy(&err[..end])
        )))
    }
}
