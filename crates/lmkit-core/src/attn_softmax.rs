//! Attention's scale, causal mask and softmax as one op, with its backward: the training
//! path's replacement for `softmax(scale·s + mask)` built from four to six tensor ops (each a
//! pass over the `(b, h, t, T)` scores, and as many again backward).
//!
//! For the scores `s` of a row at query position `i` (the row's index modulo `t`, plus the
//! cached `offset`), over the columns `j ≤ i + offset` it may see:
//!
//! ```text
//! yⱼ = exp(scale·sⱼ − m) / Σₖ exp(scale·sₖ − m),   m = maxₖ scale·sₖ;   yⱼ = 0 past i + offset
//! ∂s = scale · y ⊙ (g − Σⱼ gⱼ yⱼ)
//! ```
//!
//! Arithmetic is f32 for any storage type (f32, bf16, f16); the result has the input's type.
//! On CUDA the kernels are `causal_softmax*` in `cuda/fused.cu`; on the CPU, the loops below.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::elem::{last_dim, same, with_float, Elem};
use crate::error::OpContext;
use crate::Result;

/// `softmax(scale·x + causal mask)` over the last dimension of a contiguous `x (…, r, T)`
/// whose rows are query positions `0..t` repeated (`r` a multiple of `t`), after `offset`
/// cached ones. With a gradient.
pub fn causal_softmax(x: &Tensor, t: usize, offset: usize, scale: f64) -> Result<Tensor> {
    let dims = x.dims();
    let cols = x.dim(D::Minus1).op("causal_softmax")?;
    let r = if dims.len() >= 2 {
        dims[dims.len() - 2]
    } else {
        1
    };
    if t == 0 || r % t != 0 || offset + t > cols {
        return Err(crate::Error::Shape {
            op: "causal_softmax".into(),
            expected: format!(
                "(…, a multiple of {t} rows, at least {} columns)",
                offset + t
            ),
            got: format!("{dims:?}"),
        });
    }
    let x = x.contiguous().op("causal_softmax")?;
    let op = CausalSoftmax {
        t,
        offset,
        scale: scale as f32,
    };
    x.apply_op1(op).op("causal_softmax")
}

/// The backward pass of [`causal_softmax`] on its result `y` and the upstream gradient `g` (same
/// shape): `scale · y ⊙ (g − Σⱼ gⱼyⱼ)` per row, in `y`'s dtype (a training step that writes
/// its own backward).
pub fn causal_softmax_backward(
    y: &Tensor,
    g: &Tensor,
    t: usize,
    offset: usize,
    scale: f64,
) -> Result<Tensor> {
    if y.shape() != g.shape() {
        return Err(crate::Error::Shape {
            op: "causal_softmax_backward".into(),
            expected: format!("{:?}", y.dims()),
            got: format!("{:?}", g.dims()),
        });
    }
    let op = CausalSoftmax {
        t: t.max(1),
        offset,
        scale: scale as f32,
    };
    let g = g.to_dtype(y.dtype()).op("causal_softmax_backward")?;
    let (y, g) = (y.contiguous(), g.contiguous());
    let (y, g) = (
        y.op("causal_softmax_backward")?,
        g.op("causal_softmax_backward")?,
    );
    y.apply_op2_no_bwd(&g, &CausalSoftmaxBwd(op))
        .op("causal_softmax_backward")
}

#[derive(Clone, Copy)]
struct CausalSoftmax {
    t: usize,
    offset: usize,
    scale: f32,
}

impl CausalSoftmax {
    fn visible(&self, row: usize, cols: usize) -> usize {
        cols.min(row % self.t + self.offset + 1)
    }

    #[cfg(feature = "cuda")]
    fn args(&self, l: &Layout) -> candle_core::Result<crate::cuda_ops::SoftmaxArgs> {
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        Ok(crate::cuda_ops::SoftmaxArgs {
            rows: l.shape().elem_count() / cols,
            cols,
            t: self.t,
            offset: self.offset,
            scale: self.scale,
        })
    }
}

fn forward_row<T: Elem>(op: &CausalSoftmax, row: usize, x: &[T], y: &mut [T]) {
    let n = op.visible(row, x.len());
    let m = x[..n]
        .iter()
        .fold(f32::NEG_INFINITY, |m, v| m.max(v.to_f32() * op.scale));
    let s: f32 = x[..n]
        .iter()
        .map(|v| (v.to_f32() * op.scale - m).exp())
        .sum();
    let inv = 1.0 / s;
    for (j, out) in y.iter_mut().enumerate() {
        *out = T::from_f32(if j < n {
            (x[j].to_f32() * op.scale - m).exp() * inv
        } else {
            0.0
        });
    }
}

fn backward_row<T: Elem>(op: &CausalSoftmax, row: usize, y: &[T], g: &[T], dx: &mut [T]) {
    let n = op.visible(row, y.len());
    let dot: f32 = y[..n]
        .iter()
        .zip(&g[..n])
        .map(|(a, b)| a.to_f32() * b.to_f32())
        .sum();
    for (j, out) in dx.iter_mut().enumerate() {
        *out = T::from_f32(if j < n {
            op.scale * y[j].to_f32() * (g[j].to_f32() - dot)
        } else {
            0.0
        });
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal_softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = last_dim(l);
        let out = with_float!(s, l, |x| {
            let mut y = vec![Elem::from_f32(0.0); x.len()];
            y.par_chunks_mut(cols)
                .zip(x.par_chunks(cols))
                .enumerate()
                .for_each(|(row, (y, x))| forward_row(self, row, x, y));
            y
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::causal_softmax(&[(s, l)], self.args(l)?, false)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.to_dtype(y.dtype())?.contiguous()?;
        let y = y.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(&g, &CausalSoftmaxBwd(*self))?))
    }
}

/// The backward pass of [`CausalSoftmax`]: inputs y (its result) and g (the upstream gradient).
struct CausalSoftmaxBwd(CausalSoftmax);

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal_softmax_bwd"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (op, cols) = (&self.0, last_dim(ly));
        let out = with_float!(y, ly, |ys| {
            let gs = same(g, lg)?;
            if gs.len() != ys.len() {
                candle_core::bail!(
                    "causal_softmax_bwd: {} values, {} gradients",
                    ys.len(),
                    gs.len()
                )
            }
            let mut dx = vec![Elem::from_f32(0.0); ys.len()];
            dx.par_chunks_mut(cols)
                .zip(ys.par_chunks(cols).zip(gs.par_chunks(cols)))
                .enumerate()
                .for_each(|(row, (d, (y, g)))| backward_row(op, row, y, g, d));
            dx
        });
        Ok((out, ly.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        ly: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if ly.shape() != lg.shape() {
            candle_core::bail!("causal_softmax_bwd: {:?} vs {:?}", ly.shape(), lg.shape())
        }
        let out = crate::cuda_ops::causal_softmax(&[(y, ly), (g, lg)], self.0.args(ly)?, true)?;
        Ok((out, ly.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Values and gradients against `softmax(scale·x + mask)` from plain ops, with and without
    /// cached positions, in f32 and bf16.
    #[test]
    fn matches_masked_softmax() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t) = (2, 3, 5);
        for offset in [0, 3] {
            let total = t + offset;
            let n = b * h * t * total;
            let vals: Vec<f32> = (0..n).map(|i| (i as f32 * 0.377).sin() * 4.0).collect();
            let x = Var::from_tensor(&Tensor::from_vec(vals, (b, h, t, total), &dev).op("x")?)
                .op("var")?;
            let mix: Vec<f32> = (0..n).map(|i| (i as f32 * 0.91).cos()).collect();
            let mix = Tensor::from_vec(mix, (b, h, t, total), &dev).op("mix")?;
            let scale = 0.35;
            let y = causal_softmax(x.as_tensor(), t, offset, scale)?;
            let g1 = (&y * &mix).and_then(|p| p.sum_all()).op("loss")?;
            let g1 = g1.backward().op("backward")?;
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..total).map(move |j| {
                        if j > i + offset {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, total), &dev).op("mask")?;
            let z = (x.as_tensor() * scale)
                .and_then(|z| z.broadcast_add(&mask))
                .op("z")?;
            let want = candle_nn::ops::softmax(&z, D::Minus1).op("softmax")?;
            let g2 = (&want * &mix).and_then(|p| p.sum_all()).op("loss")?;
            let g2 = g2.backward().op("backward")?;
            let d = (&y - &want)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .op("diff")?;
            assert!(d < 1e-6, "values differ by {d}");
            let (Some(a), Some(c)) = (g1.get(x.as_tensor()), g2.get(x.as_tensor())) else {
                panic!("a gradient is missing")
            };
            let d = (a - c)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .op("diff")?;
            assert!(d < 1e-6, "gradients differ by {d}");
            // bf16 storage, f32 arithmetic: within bf16 rounding of the f32 result.
            let xb = x.as_tensor().to_dtype(DType::BF16).op("bf16")?;
            let yb = causal_softmax(&xb, t, offset, scale)?;
            assert_eq!(yb.dtype(), DType::BF16);
            let d = (yb.to_dtype(DType::F32).op("f32")? - &want)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .op("diff")?;
            assert!(d < 1e-2, "bf16 values differ by {d}");
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_shapes() {
        let x = Tensor::zeros((2, 6, 4), DType::F32, &Device::Cpu);
        let Ok(x) = x else { panic!("zeros") };
        assert!(
            causal_softmax(&x, 4, 0, 1.0).is_err(),
            "6 rows are not a multiple of 4"
        );
        assert!(
            causal_softmax(&x, 3, 2, 1.0).is_err(),
            "3 positions after 2 need 5 columns"
        );
        assert!(causal_softmax(&x, 3, 1, 1.0).is_ok());
    }
}
