//! The fused kernels of a Llama block (`cuda/train.cu`) on candle tensors: what the GPU
//! training path (`lmkit_train::body_gpu`) and the fused prompt pass (`lmkit_models`) run
//! between their cuBLAS products. Each method allocates its outputs and launches one kernel
//! through a [`Launcher`] (a GPU, or the CPU emulator in the tests).
//!
//! Tensors must be contiguous: f32 for the residual stream and the norms' weights, the compute
//! dtype (`BlockOps::dtype`) for everything a product reads or writes.

use candle_core::{DType, Device, Shape, Tensor};

use crate::launch::{kernel_suffix, Arg, Launcher};
use crate::{Error, Result};

/// Columns per thread of `tr_rms_bwd` (`RMS_COLS` in train.cu).
const RMS_COLS: usize = 16;
/// Warps per block of `tr_rms_bwd_w*` (`RMSW_WARPS`), the most blocks of a launch, and the
/// widest row they take (256 columns per variant, four variants).
const RMSW_WARPS: usize = 8;
const RMSW_BLOCKS: usize = 512;
const RMSW_MAX: usize = 1024;
/// Threads of `tr_colsum`'s blocks: 32 columns × 8 row groups, as the kernel assumes.
const COLSUM_THREADS: u32 = 256;
/// Threads per row of `tr_xent`.
const XENT_THREADS: u32 = 512;
/// Most blocks of a grid-stride launch.
const MAX_BLOCKS: usize = 4096;
/// The widest row `rms_bwd` takes.
pub const MAX_HIDDEN: usize = 1024 * RMS_COLS;

/// Where q, k and v heads sit: `b` sequences of `t` new tokens, `h` query heads and `kh` kv
/// heads of `d`. q is `(b, h, t, d)`; k and v are `(b, kh, cap, d)` with the new tokens at
/// positions `off..off + t` (`cap = t`, `off = 0` in training; a KV cache's slab for a prompt).
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kh: usize,
    pub d: usize,
    pub cap: usize,
    pub off: usize,
}

impl Heads {
    /// Width of the stacked q|k|v product's rows.
    pub fn qkv(&self) -> usize {
        (self.h + 2 * self.kh) * self.d
    }

    /// Attention's softmax scale, `1/√d`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// The rows `(b·t, ·)` of q, k and v: one stacked product `[q | k | v]`, or three.
#[derive(Clone, Copy)]
pub enum QkvRows<'a> {
    Stacked(&'a Tensor),
    Split(&'a Tensor, &'a Tensor, &'a Tensor),
}

/// The rows of the MLP's gate and up products: one stacked `[g | u]`, or two.
#[derive(Clone, Copy)]
pub enum GateUp<'a> {
    Stacked(&'a Tensor),
    Split(&'a Tensor, &'a Tensor),
}

/// Whether the flash-attention kernels take this compute dtype and head size.
pub fn flash_applies(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && matches!(head_dim, 64 | 128)
}

/// Launches of `train.cu`'s kernels for one compute dtype.
pub struct BlockOps {
    launcher: Launcher,
    suffix: &'static str,
    dtype: DType,
    device: Device,
}

/// Blocks of 256 threads for a grid-stride loop over `n` items.
fn grid(n: usize) -> usize {
    n.div_ceil(256).clamp(1, MAX_BLOCKS)
}

/// Warps per block of the flash kernels (their `W`), 16 query or key rows each.
const FLASH_WARPS: usize = 4;

fn int(v: usize, what: &str) -> Result<Arg> {
    Arg::int(v, what)
}

impl BlockOps {
    /// Kernels computing in `dtype` on `device`'s tensors.
    pub fn new(launcher: Launcher, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            launcher,
            suffix: kernel_suffix(dtype)?,
            dtype,
            device: device.clone(),
        })
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether flash attention runs here for heads of `head_dim`: it takes the dtype and the
    /// size ([`flash_applies`]) and its kernels are compiled for this GPU (sm_80 or newer).
    pub fn has_flash(&self, head_dim: usize) -> bool {
        flash_applies(self.dtype, head_dim)
            && ["fwd", "bwd_kv", "bwd_q"].iter().all(|k| {
                let name = format!("tr_flash_{k}_{head_dim}_{}", self.suffix);
                self.launcher.has_kernel(&name)
            })
    }

    fn ptr(&self, t: &Tensor) -> Result<Arg> {
        Ok(Arg::Ptr(self.launcher.ptr(t)?))
    }

    /// The address of element `at` of the contiguous `t`.
    fn ptr_at(&self, t: &Tensor, at: usize) -> Result<Arg> {
        let bytes = (at * t.dtype().size_in_bytes()) as u64;
        Ok(Arg::Ptr(self.launcher.ptr(t)? + bytes))
    }

    fn run(&self, name: &str, blocks: usize, threads: u32, args: &[Arg]) -> Result<()> {
        self.run2(name, (blocks, 1), threads, args)
    }

    /// Kernel `tr_{name}_{dtype}` over a 2-D grid.
    fn run2(&self, name: &str, grid: (usize, usize), threads: u32, args: &[Arg]) -> Result<()> {
        let dim = |v: usize, max: u32| {
            u32::try_from(v.max(1))
                .ok()
                .filter(|&v| v <= max)
                .ok_or_else(|| {
                    Error::Unsupported(format!("{name}: a grid of {grid:?} blocks is too large"))
                })
        };
        let (gx, gy) = (dim(grid.0, i32::MAX as u32)?, dim(grid.1, 65_535)?);
        let name = format!("tr_{name}_{}", self.suffix);
        self.launcher.launch(&name, (gx, gy), threads, args)
    }

    /// Casts f32 tensors into the compute dtype, eight per launch: each `(src, dst, at)`
    /// writes `src`'s values into the contiguous `dst` from element `at` on (a stacked
    /// weight such as `[q | k | v]` is three of them). One launch per eight tensors, where
    /// a cast and a concatenation take one each per tensor.
    pub fn cast_into(&self, items: &[(&Tensor, &Tensor, usize)]) -> Result<()> {
        let mut slots = Vec::with_capacity(items.len());
        for &(src, dst, at) in items {
            let n = src.elem_count();
            if src.dtype() != DType::F32 || dst.dtype() != self.dtype || at + n > dst.elem_count() {
                return Err(Error::Unsupported(format!(
                    "cast {:?} {:?} into {:?} {:?} at {at}",
                    src.dtype(),
                    src.dims(),
                    dst.dtype(),
                    dst.dims()
                )));
            }
            slots.push((self.ptr(src)?, self.ptr_at(dst, at)?, n));
        }
        self.convert_x8("cast_x8", &slots)
    }

    /// Each tensor widened to f32 (same shape), eight per launch; f32 ones are returned as
    /// they are.
    pub fn widen(&self, srcs: &[&Tensor]) -> Result<Vec<Tensor>> {
        if self.dtype == DType::F32 {
            return Ok(srcs.iter().map(|&t| t.clone()).collect());
        }
        let mut out = Vec::with_capacity(srcs.len());
        let mut slots = Vec::with_capacity(srcs.len());
        for &src in srcs {
            if src.dtype() != self.dtype {
                return Err(Error::Unsupported(format!(
                    "widen a {:?} tensor with {:?} kernels",
                    src.dtype(),
                    self.dtype
                )));
            }
            let dst = self.empty(src.shape(), DType::F32)?;
            slots.push((self.ptr(src)?, self.ptr(&dst)?, src.elem_count()));
            out.push(dst);
        }
        self.convert_x8("widen_x8", &slots)?;
        Ok(out)
    }

    /// `tr_{name}_{dtype}` over `(src, dst, n)` slots, eight per launch.
    fn convert_x8(&self, name: &str, slots: &[(Arg, Arg, usize)]) -> Result<()> {
        let slots = slots
            .iter()
            .map(|&(s, d, n)| Ok((vec![s, d, int(n, "tensor size")?], n)))
            .collect::<Result<Vec<_>>>()?;
        let name = format!("tr_{name}_{}", self.suffix);
        let empty = [Arg::Ptr(0), Arg::Ptr(0), Arg::I32(0)];
        self.launcher
            .launch_x8(&name, 256, &slots, &empty, &mut |_| Ok(Vec::new()), &|n| {
                grid(n) as u32
            })?;
        Ok(())
    }

    /// An uninitialized tensor for a kernel to fill.
    pub fn empty(&self, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        // SAFETY: every caller hands the tensor to a kernel that writes each of its elements
        // before anything reads it.
        let t = unsafe { Tensor::empty(shape, dtype, &self.device) };
        t.map_err(|e| Error::Candle {
            op: "allocate a kernel buffer".into(),
            source: e,
        })
    }

    /// `rms(x) ⊙ w` in the compute dtype, for f32 rows `x (…, c)` and `w (c,)`.
    pub fn rms(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        let c = w.elem_count();
        let rows = x.elem_count() / c.max(1);
        let a = self.empty((rows, c), self.dtype)?;
        let args = [
            self.ptr(x)?,
            self.ptr(w)?,
            self.ptr(&a)?,
            int(rows, "rows")?,
            int(c, "hidden size")?,
            Arg::F32(eps),
        ];
        self.run("rms_fwd", rows.div_ceil(8), 256, &args)?;
        Ok(a)
    }

    /// RMSNorm's backward for the upstream gradient `g` (compute dtype): writes ∂x into `dx`
    /// (f32, added to it with `accumulate`); returns ∂x in the compute dtype and ∂w.
    pub fn rms_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
        dx: &Tensor,
        accumulate: bool,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let c = w.elem_count();
        let rows = x.elem_count() / c.max(1);
        let threads = (c.div_ceil(RMS_COLS).div_ceil(32) * 32).clamp(128, 1024);
        if c > threads * RMS_COLS {
            return Err(Error::Unsupported(format!(
                "a hidden size of {c} exceeds the training kernels' {MAX_HIDDEN}"
            )));
        }
        // Rows of up to 1024: a warp per row (`tr_rms_bwd_w1..4`, for rows of 256, 512, 768 and
        // 1024 at most), else a block per row.
        let (kernel, blocks, threads) = match c <= RMSW_MAX {
            true => (
                format!("rms_bwd_w{}", c.div_ceil(256).max(1)),
                rows.div_ceil(RMSW_WARPS).clamp(1, RMSW_BLOCKS),
                32 * RMSW_WARPS,
            ),
            false => ("rms_bwd".to_string(), rows.clamp(1, 528), threads),
        };
        let dx_lp = self.empty((rows, c), self.dtype)?;
        let part = self.empty((blocks, c), DType::F32)?;
        let args = [
            self.ptr(x)?,
            self.ptr(w)?,
            self.ptr(g)?,
            self.ptr(dx)?,
            self.ptr(&dx_lp)?,
            self.ptr(&part)?,
            int(rows, "rows")?,
            int(c, "hidden size")?,
            Arg::F32(eps),
            Arg::I32(i32::from(accumulate)),
        ];
        self.run(&kernel, blocks, threads as u32, &args)?;
        let dw = self.empty(c, DType::F32)?;
        let args = [
            self.ptr(&part)?,
            self.ptr(&dw)?,
            int(blocks, "partial sums")?,
            int(c, "hidden size")?,
        ];
        // c ≤ MAX_HIDDEN (checked above): the grid fits a u32.
        let blocks_x = c.div_ceil(32) as u32;
        self.launcher
            .launch("tr_colsum", (blocks_x, 1), COLSUM_THREADS, &args)?;
        Ok((dx_lp, dw))
    }

    /// The cross-entropy of each row of the logits `z (rows, v)` (compute dtype, contiguous)
    /// at `targets (rows,)` u32, returned as `(rows,)` f32 (NaN for a target outside the row);
    /// `z` is overwritten with the gradient of `Σᵢ coefᵢ · nllᵢ`, `coef (rows,)` f32:
    /// `coefᵢ · (softmax(zᵢ) − onehot(yᵢ))`. One kernel, one pass over the logits each way.
    pub fn xent_in_place(&self, z: &Tensor, targets: &Tensor, coef: &Tensor) -> Result<Tensor> {
        let (rows, v) = z.dims2().map_err(|e| Error::Candle {
            op: "cross-entropy logits".into(),
            source: e,
        })?;
        if z.dtype() != self.dtype
            || targets.dims() != [rows]
            || targets.dtype() != DType::U32
            || coef.dims() != [rows]
            || coef.dtype() != DType::F32
        {
            return Err(Error::Unsupported(format!(
                "cross-entropy of {:?} {:?} logits with {:?} kernels, targets {:?} {:?}, \
                 factors {:?} {:?}",
                z.dtype(),
                z.dims(),
                self.dtype,
                targets.dtype(),
                targets.dims(),
                coef.dtype(),
                coef.dims()
            )));
        }
        let nll = self.empty(rows, DType::F32)?;
        let args = [
            self.ptr(z)?,
            self.ptr(targets)?,
            self.ptr(coef)?,
            self.ptr(&nll)?,
            int(rows, "rows")?,
            int(v, "vocabulary")?,
        ];
        self.run("xent", rows, XENT_THREADS, &args)?;
        Ok(nll)
    }

    /// `x · s` for `x` in the compute dtype (contiguous) and `s` a one-element f32 tensor on
    /// the device, read there (no wait for the host): one pass of 16-byte loads.
    pub fn scale(&self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        if s.elem_count() != 1 || s.dtype() != DType::F32 {
            return Err(Error::Unsupported(format!(
                "scale: the factor must be one f32 value, not {:?} {:?}",
                s.dtype(),
                s.dims()
            )));
        }
        if x.dtype() != self.dtype {
            return Err(Error::Unsupported(format!(
                "scale: {:?} values with {:?} kernels",
                x.dtype(),
                self.dtype
            )));
        }
        let n = x.elem_count();
        let out = self.empty(x.shape().clone(), self.dtype)?;
        let args = [
            self.ptr(x)?,
            self.ptr(&out)?,
            int(n, "elements")?,
            self.ptr(s)?,
        ];
        self.run("scale", grid(n), 256, &args)?;
        Ok(out)
    }

    /// `x + y` in f32 (f32 `x`, compute-dtype `y`).
    pub fn add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        let out = self.empty(x.shape().clone(), DType::F32)?;
        let args = [
            self.ptr(x)?,
            self.ptr(y)?,
            self.ptr(&out)?,
            int(n, "elements")?,
        ];
        self.run("add", grid(n), 256, &args)?;
        Ok(out)
    }

    /// `silu(g) ⊙ u` `(rows, f)` from the gate and up products.
    pub fn silu_mul(&self, gu: GateUp, f: usize) -> Result<Tensor> {
        let (g, u, ld, rows) = match gu {
            GateUp::Stacked(t) => {
                let rows = t.elem_count() / (2 * f).max(1);
                (self.ptr(t)?, self.ptr_at(t, f)?, 2 * f, rows)
            }
            GateUp::Split(g, u) => {
                let rows = g.elem_count() / f.max(1);
                if u.elem_count() != g.elem_count() {
                    return Err(Error::Unsupported(format!(
                        "silu_mul: gate {:?} and up {:?}",
                        g.dims(),
                        u.dims()
                    )));
                }
                (self.ptr(g)?, self.ptr(u)?, f, rows)
            }
        };
        let m = self.empty((rows, f), self.dtype)?;
        let args = [
            g,
            u,
            int(ld, "row stride")?,
            self.ptr(&m)?,
            int(rows, "rows")?,
            int(f, "MLP width")?,
        ];
        self.run("silu_mul", rows.clamp(1, MAX_BLOCKS), 256, &args)?; // rows over the blocks
        Ok(m)
    }

    /// The gradient of `[g | u]` from that of [`BlockOps::silu_mul`]'s result `dm (rows, f)`.
    pub fn silu_mul_bwd(&self, gu: &Tensor, dm: &Tensor, f: usize) -> Result<Tensor> {
        let rows = gu.elem_count() / (2 * f).max(1);
        let dgu = self.empty((rows, 2 * f), self.dtype)?;
        let args = [
            self.ptr(gu)?,
            self.ptr(dm)?,
            self.ptr(&dgu)?,
            int(rows, "rows")?,
            int(f, "MLP width")?,
        ];
        self.run("silu_mul_bwd", rows.clamp(1, MAX_BLOCKS), 256, &args)?;
        Ok(dgu)
    }

    fn head_args(hd: &Heads) -> Result<[Arg; 5]> {
        Ok([
            int(hd.b, "batch")?,
            int(hd.t, "sequence length")?,
            int(hd.h, "heads")?,
            int(hd.kh, "kv heads")?,
            int(hd.d, "head size")?,
        ])
    }

    /// Blocks and threads of `tr_rope_*`: rows over the blocks, a row's groups of pairs (16
    /// bytes of one head each) over a block's threads.
    fn rope_launch(&self, hd: &Heads) -> (usize, u32) {
        let per_load = 16 / self.dtype.size_in_bytes();
        let groups = (hd.h + 2 * hd.kh) * (hd.d / 2).div_ceil(per_load);
        let threads = (groups.div_ceil(32) * 32).clamp(32, 256);
        ((hd.b * hd.t).clamp(1, MAX_BLOCKS), threads as u32)
    }

    /// RoPE and the move into heads: the rows of q, k, v (plus the f32 stacked `bias`) into
    /// `q (b, h, t, d)`, returned, and into `k`, `v` `(b, kh, cap, d)` at positions `off..`
    /// (written in place). `cos`, `sin` `(t, d/2)` f32 are the angles of the new tokens'
    /// positions.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_split(
        &self,
        rows: QkvRows,
        bias: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        k: &Tensor,
        v: &Tensor,
        hd: &Heads,
    ) -> Result<Tensor> {
        if hd.off + hd.t > hd.cap {
            return Err(Error::Unsupported(format!(
                "{} new positions after {} do not fit {} slots",
                hd.t, hd.off, hd.cap
            )));
        }
        let (qd, kd) = (hd.h * hd.d, hd.kh * hd.d);
        let src = match rows {
            QkvRows::Stacked(t) => {
                let w = hd.qkv();
                [
                    self.ptr(t)?,
                    self.ptr_at(t, qd)?,
                    self.ptr_at(t, qd + kd)?,
                    int(w, "width")?,
                    int(w, "width")?,
                ]
            }
            QkvRows::Split(q, k, v) => [
                self.ptr(q)?,
                self.ptr(k)?,
                self.ptr(v)?,
                int(qd, "width")?,
                int(kd, "width")?,
            ],
        };
        let q = self.empty((hd.b, hd.h, hd.t, hd.d), self.dtype)?;
        let bias = match bias {
            Some(b) => self.ptr(b)?,
            None => Arg::Ptr(0),
        };
        let mut args = src.to_vec();
        args.extend([
            self.ptr(&q)?,
            self.ptr(k)?,
            self.ptr(v)?,
            bias,
            self.ptr(cos)?,
            self.ptr(sin)?,
        ]);
        args.extend(Self::head_args(hd)?);
        args.extend([int(hd.cap, "cache capacity")?, int(hd.off, "cache length")?]);
        let (blocks, threads) = self.rope_launch(hd);
        self.run("rope_split", blocks, threads, &args)?;
        Ok(q)
    }

    /// The adjoint of [`BlockOps::rope_split`] (training: `cap = t`, `off = 0`): the gradients
    /// of q, k, v into that of the stacked product's rows `(b·t, qkv)`.
    pub fn rope_merge(
        &self,
        dq: &Tensor,
        dk: &Tensor,
        dv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        hd: &Heads,
    ) -> Result<Tensor> {
        let out = self.empty((hd.b * hd.t, hd.qkv()), self.dtype)?;
        let mut args = vec![
            self.ptr(&out)?,
            self.ptr(dq)?,
            self.ptr(dk)?,
            self.ptr(dv)?,
            self.ptr(cos)?,
            self.ptr(sin)?,
        ];
        args.extend(Self::head_args(hd)?);
        let (blocks, threads) = self.rope_launch(hd);
        self.run("rope_merge", blocks, threads, &args)?;
        Ok(out)
    }

    /// Causal flash attention of `q (b, h, t, d)` over `k`, `v` `(b, kh, cap, d)` (keys
    /// `0..off + t`): the output as rows `(b·t, h·d)` and, with `lse`, each row's
    /// log-sum-exp `(b, h, t)` (what the backward needs).
    pub fn flash_fwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        hd: &Heads,
        lse: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if !flash_applies(self.dtype, hd.d) {
            return Err(Error::Unsupported(format!(
                "flash attention takes bf16/f16 and heads of 64 or 128, not {:?} with {}",
                self.dtype, hd.d
            )));
        }
        let y = self.empty((hd.b * hd.t, hd.h * hd.d), self.dtype)?;
        let lse = match lse {
            true => Some(self.empty(hd.b * hd.h * hd.t, DType::F32)?),
            false => None,
        };
        let w = FLASH_WARPS;
        let args = [
            self.ptr(q)?,
            self.ptr(k)?,
            self.ptr(v)?,
            self.ptr(&y)?,
            match &lse {
                Some(l) => self.ptr(l)?,
                None => Arg::Ptr(0),
            },
            int(hd.t, "sequence length")?,
            int(hd.h, "heads")?,
            int(hd.kh, "kv heads")?,
            Arg::F32(hd.scale()),
            int(hd.cap, "cache capacity")?,
            int(hd.off, "cache length")?,
        ];
        self.run2(
            &format!("flash_fwd_{}", hd.d),
            (hd.t.div_ceil(16 * w), hd.b * hd.h),
            32 * w as u32,
            &args,
        )?;
        Ok((y, lse))
    }

    /// The backward of [`BlockOps::flash_fwd`] in training (`cap = t`, `off = 0`): from the
    /// output `y` and its gradient `dy` (rows `(b·t, h·d)`), the gradients of q `(b, h, t, d)`
    /// and of k, v `(b, kh, t, d)`.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        lse: &Tensor,
        hd: &Heads,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, h, kh, d) = (hd.b, hd.t, hd.h, hd.kh, hd.d);
        // δ = rowsum(dy ⊙ y) per (row, head).
        let dd = self.empty(b * h * t, DType::F32)?;
        let args = [
            self.ptr(y)?,
            self.ptr(dy)?,
            self.ptr(&dd)?,
            int(b, "batch")?,
            int(t, "sequence length")?,
            int(h, "heads")?,
            int(d, "head size")?,
        ];
        self.run("attn_dot", (b * t * h).div_ceil(8), 256, &args)?;
        let dq = self.empty((b, h, t, d), self.dtype)?;
        let dk = self.empty((b, kh, t, d), self.dtype)?;
        let dv = self.empty((b, kh, t, d), self.dtype)?;
        let w = FLASH_WARPS;
        let common = |out: &[&Tensor]| -> Result<Vec<Arg>> {
            let mut a = vec![
                self.ptr(q)?,
                self.ptr(k)?,
                self.ptr(v)?,
                self.ptr(dy)?,
                self.ptr(lse)?,
                self.ptr(&dd)?,
            ];
            for o in out {
                a.push(self.ptr(o)?);
            }
            a.extend([
                int(t, "sequence length")?,
                int(h, "heads")?,
                int(kh, "kv heads")?,
                Arg::F32(hd.scale()),
            ]);
            Ok(a)
        };
        let blocks = t.div_ceil(16 * w);
        let threads = 32 * w as u32;
        self.run2(
            &format!("flash_bwd_kv_{d}"),
            (blocks, b * kh),
            threads,
            &common(&[&dk, &dv])?,
        )?;
        self.run2(
            &format!("flash_bwd_q_{d}"),
            (blocks, b * h),
            threads,
            &common(&[&dq])?,
        )?;
        Ok((dq, dk, dv))
    }
}
