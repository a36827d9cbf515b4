//! candle's fused kernels (softmax, RMSNorm, RoPE) with a backward pass.
//!
//! The fused kernels compute in one pass what takes five to eight elementwise ops, but they
//! carry no gradient (they cut the graph silently). Here each one runs forward as is, and a
//! small custom op attaches it to its inputs. Its forward copies the kernel's result; its
//! backward is the op's derivative, written with differentiable tensor ops:
//!
//! ```text
//! softmax  y = softmax(x):                 dx = y ⊙ (g − Σⱼ gⱼyⱼ)
//! RMSNorm  y = x̂ ⊙ w, x̂ = x·r, r = (mean(x²) + ε)^(−½):
//!          dx = r·(g⊙w − x̂·mean(x̂ ⊙ g ⊙ w)),    dw = Σ_rows g ⊙ x̂
//! RoPE     y = rot(θ)·x (a rotation per pair): dx = rot(−θ)·g
//! ```
//!
//! RMSNorm's backward runs as one pass (on a GPU the training path's `tr_rms_bwd_f32` kernel of
//! `cuda/train.cu`, on the CPU its twin here), not as the tensor ops the formula reads as.
//!
//! Deviations: none in the math. The forward costs one extra copy of the result, because a
//! custom op must return storage it owns.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

use crate::error::OpContext;
use crate::Result;

/// The forward methods (`cpu_fwd`, and `cuda_fwd` with the `cuda` feature) of a custom op
/// whose value is its last argument's, copied by [`copy_result`]: `copy_last_forward!(2)` for a
/// `CustomOp2`, `copy_last_forward!(3)` for a `CustomOp3`. The op's `bwd` is the point.
#[macro_export]
macro_rules! copy_last_forward {
    (2) => {
        fn cpu_fwd(
            &self,
            _: &$crate::candle::CpuStorage,
            _: &$crate::candle::Layout,
            y: &$crate::candle::CpuStorage,
            l: &$crate::candle::Layout,
        ) -> $crate::candle::Result<($crate::candle::CpuStorage, $crate::candle::Shape)> {
            $crate::fused::copy_result(y, l)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &$crate::candle::CudaStorage,
            _: &$crate::candle::Layout,
            y: &$crate::candle::CudaStorage,
            l: &$crate::candle::Layout,
        ) -> $crate::candle::Result<($crate::candle::CudaStorage, $crate::candle::Shape)> {
            $crate::fused::copy_result(y, l)
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &$crate::candle::CpuStorage,
            _: &$crate::candle::Layout,
            _: &$crate::candle::CpuStorage,
            _: &$crate::candle::Layout,
            y: &$crate::candle::CpuStorage,
            l: &$crate::candle::Layout,
        ) -> $crate::candle::Result<($crate::candle::CpuStorage, $crate::candle::Shape)> {
            $crate::fused::copy_result(y, l)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &$crate::candle::CudaStorage,
            _: &$crate::candle::Layout,
            _: &$crate::candle::CudaStorage,
            _: &$crate::candle::Layout,
            y: &$crate::candle::CudaStorage,
            l: &$crate::candle::Layout,
        ) -> $crate::candle::Result<($crate::candle::CudaStorage, $crate::candle::Shape)> {
            $crate::fused::copy_result(y, l)
        }
    };
}

pub(crate) type Grad2 = dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// Returns its second argument's values; the gradient of the first is `grad(y, g)`.
struct Attach {
    name: &'static str,
    grad: Box<Grad2>,
}

/// A copy of a fresh, contiguous result: the forward pass of a custom op that attaches a
/// backward to a value computed outside the graph (here and in `lmkit_train::head_loss`).
pub fn copy_result<S: BackendStorage>(s: &S, l: &Layout) -> candle_core::Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("fused op result must be contiguous from offset 0")
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        self.name
    }

    crate::copy_last_forward!(2);

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.grad)(res, g)?), None))
    }
}

/// `y` (computed from `x` without a graph) with the gradient `grad(y, g)` flowing to `x`.
pub(crate) fn attach(
    x: &Tensor,
    y: Tensor,
    name: &'static str,
    grad: Box<Grad2>,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    let y = y.contiguous().op(name)?;
    x.apply_op2_arc(&y, Arc::new(Box::new(Attach { name, grad })))
        .op(name)
}

/// Softmax over the last dimension (fused forward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(x).op("softmax")?;
    attach(
        x,
        y,
        "softmax",
        Box::new(|y, g| {
            let gy = (g * y)?;
            let s = gy.sum_keepdim(D::Minus1)?;
            gy - y.broadcast_mul(&s)?
        }),
    )
}

/// Rotate-half RoPE of `x (b, h, t, d)` with `cos`, `sin` of shape `(t, d/2)` (fused forward).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous().op("rope")?;
    let y = candle_nn::rotary_emb::rope(&x, cos, sin).op("rope")?;
    let (cos, sin_neg) = (cos.clone(), sin.neg().op("rope")?);
    attach(
        &x,
        y,
        "rope",
        Box::new(move |_, g| candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &sin_neg)),
    )
}

/// RMSNorm over the last dimension with weight `w (c,)` (fused forward), gradients to `x`
/// and `w`. Computes in f32 and returns `x`'s dtype.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x
        .to_dtype(DType::F32)
        .and_then(|x| x.contiguous())
        .op("rms_norm")?;
    let w = w.to_dtype(DType::F32).op("rms_norm")?;
    let y = candle_nn::ops::rms_norm(&x, &w, eps as f32).op("rms_norm")?;
    let y = if x.track_op() || w.track_op() {
        x.apply_op3_arc(&w, &y, Arc::new(Box::new(RmsGrad { eps })))
            .op("rms_norm")?
    } else {
        y
    };
    y.to_dtype(dtype).op("rms_norm")
}

/// [`rms_norm`]'s backward (inputs x, w, and the fused result).
struct RmsGrad {
    eps: f64,
}

impl CustomOp3 for RmsGrad {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    crate::copy_last_forward!(3);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(D::Minus1)?;
        let rows = x.elem_count() / c.max(1);
        let (xc, wc, gc) = (
            x.contiguous()?,
            w.contiguous()?,
            g.to_dtype(DType::F32)?.contiguous()?,
        );
        if x.device().is_cuda() && c > 16 * 256 {
            // Wider than lmkit's kernel takes: tensor ops.
            let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
                .sqrt()?
                .recip()?;
            let xh = xc.broadcast_mul(&r)?;
            let gw = gc.broadcast_mul(&wc)?;
            let m = (&xh * &gw)?.mean_keepdim(D::Minus1)?;
            let dx = (gw - xh.broadcast_mul(&m)?)?.broadcast_mul(&r)?;
            let dw = (&gc * &xh)?.reshape(((), c))?.sum(0)?;
            return Ok((Some(dx), Some(dw), None));
        }
        // One pass (lmkit's kernel on CUDA, its twin on the CPU): ∂x rows, then ∂w partials.
        let out = xc.apply_op3_no_bwd(&wc, &gc, &RmsBwd { eps: self.eps })?;
        let parts = out.dim(0)? - rows;
        let dx = out.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = out.narrow(0, rows, parts)?.sum(0)?;
        Ok((Some(dx), Some(dw), None))
    }
}

/// RMSNorm's backward on row-major f32 slices `x`, `g (rows, c)` and `w (c,)`: writes ∂x into
/// `dx` (adds to it with `accumulate`) and returns ∂w. ∂w is summed from fixed chunks of 64 rows
/// in order, so the bits do not depend on the threads. (The CPU twin of the CUDA kernel, and
/// the CPU training path's norm backward.)
pub fn rms_norm_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    accumulate: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    const ROWS: usize = 64;
    let c = w.len().max(1);
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c).zip(g.par_chunks(ROWS * c)))
        .map(|(d, (xs, gs))| {
            let mut acc = vec![0f32; c];
            for ((d, xr), gr) in d.chunks_mut(c).zip(xs.chunks(c)).zip(gs.chunks(c)) {
                let ss: f32 = xr.iter().map(|v| v * v).sum();
                let r = 1.0 / (ss / c as f32 + eps).sqrt();
                let dot: f32 = (0..c).map(|j| xr[j] * r * gr[j] * w[j]).sum::<f32>() / c as f32;
                for j in 0..c {
                    let xh = xr[j] * r;
                    let v = r * (gr[j] * w[j] - xh * dot);
                    d[j] = if accumulate { d[j] + v } else { v };
                    acc[j] += gr[j] * xh;
                }
            }
            acc
        })
        .collect();
    let mut dw = vec![0f32; c];
    for p in &partials {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    dw
}

/// [`rms_norm`]'s backward in one pass over f32 `x (…, c)`, `w (c,)` and `g`: a `(rows + k, c)`
/// result with ∂x in the first rows and k partial sums of ∂w after them.
struct RmsBwd {
    eps: f64,
}

impl CustomOp3 for RmsBwd {
    fn name(&self) -> &'static str {
        "rms_norm_bwd"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        lx: &Layout,
        w: &candle_core::CpuStorage,
        lw: &Layout,
        g: &candle_core::CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        use candle_core::CpuStorage as S;
        let (S::F32(x), S::F32(w), S::F32(g)) = (x, w, g) else {
            candle_core::bail!("rms_norm_bwd: f32 inputs")
        };
        let c = crate::elem::last_dim(lx);
        let (x, w, g) = (
            crate::elem::contiguous(x, lx)?,
            crate::elem::contiguous(w, lw)?,
            crate::elem::contiguous(g, lg)?,
        );
        if w.len() != c || g.len() != x.len() {
            candle_core::bail!(
                "rms_norm_bwd: {} values, {} weights, {} gradients",
                x.len(),
                w.len(),
                g.len()
            )
        }
        let rows = x.len() / c;
        let mut out = vec![0f32; (rows + 1) * c];
        let (dx, dw) = out.split_at_mut(rows * c);
        let partial = rms_norm_backward(x, w, g, self.eps as f32, dx, false);
        dw.copy_from_slice(&partial);
        Ok((S::F32(out), Shape::from((rows + 1, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let c = crate::elem::last_dim(lx);
        let rows = lx.shape().elem_count() / c;
        let (out, parts) =
            crate::cuda_ops::rms_norm_bwd((x, lx), (w, lw), (g, lg), rows, c, self.eps as f32)?;
        Ok((out, Shape::from((rows + parts, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradients of the fused ops against the same functions built from plain ops.
    #[test]
    fn fused_gradients_match_plain_ops() -> Result<()> {
        let dev = Device::Cpu;
        let vals = |n: usize, s: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * 0.7311).sin() * s).collect()
        };
        let var = |t: candle_core::Result<Tensor>| -> Result<Var> {
            Var::from_tensor(&t.op("var")?).op("var")
        };
        let x = var(Tensor::from_vec(
            vals(2 * 3 * 4 * 8, 2.0),
            (2, 3, 4, 8),
            &dev,
        ))?;
        let w = var(Tensor::from_vec(vals(8, 1.0), 8, &dev))?;
        let mix = Tensor::from_vec(vals(2 * 3 * 4 * 8, 3.0), (2, 3, 4, 8), &dev).op("mix")?;
        let t = Tensor::from_vec(vals(4 * 4, 1.5), (4, 4), &dev).op("t")?;
        let (cos, sin) = (t.cos().op("cos")?, t.sin().op("sin")?);
        let loss = |y: Tensor| -> Result<Tensor> { (y * &mix)?.sum_all().op("loss") };

        // Fused.
        let a = softmax_last_dim(x.as_tensor())?;
        let b = rms_norm(&a, w.as_tensor(), 1e-5)?;
        let c = rope(&b, &cos, &sin)?;
        let g1 = loss(c)?.backward().op("backward")?;

        // Plain.
        let a = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).op("softmax")?;
        let ms = a.sqr()?.mean_keepdim(D::Minus1)?;
        let b = a
            .broadcast_div(&(ms + 1e-5)?.sqrt()?)?
            .broadcast_mul(w.as_tensor())?;
        let (c2, s2) = (
            Tensor::cat(&[&cos, &cos], 1)?,
            Tensor::cat(&[&sin, &sin], 1)?,
        );
        let (b1, b2) = (b.narrow(3, 0, 4)?, b.narrow(3, 4, 4)?);
        let rot = Tensor::cat(&[&b2.neg()?, &b1], 3)?;
        let c = (b.broadcast_mul(&c2)? + rot.broadcast_mul(&s2)?)?;
        let g2 = loss(c)?.backward().op("backward")?;

        for v in [&x, &w] {
            let (p, q) = match (g1.get(v.as_tensor()), g2.get(v.as_tensor())) {
                (Some(p), Some(q)) => (
                    p.flatten_all()?.to_vec1::<f32>()?,
                    q.flatten_all()?.to_vec1::<f32>()?,
                ),
                _ => panic!("a gradient is missing"),
            };
            let scale = q.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            for (a, b) in p.iter().zip(&q) {
                assert!((a - b).abs() <= 1e-5 * scale.max(1.0), "{a} vs {b}");
            }
        }
        Ok(())
    }
}
