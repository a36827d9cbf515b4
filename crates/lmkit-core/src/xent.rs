//! Cross-entropy over rows of logits as two ops without a graph: each row's negative
//! log-likelihood, and the rows' gradient for an upstream gradient per row. The second
//! recomputes the softmax from the logits, so nothing of size `(rows, vocab)` is kept between
//! the passes (`lmkit_train::head_loss` recomputes the logits chunk by chunk).
//!
//! ```text
//! nllᵢ = logsumexp(zᵢ) − zᵢ,yᵢ            (NaN when yᵢ is not a column of z)
//! ∂zᵢ  = gᵢ · (softmax(zᵢ) − onehot(yᵢ))
//! ```
//!
//! Arithmetic is f32 for f32, bf16 or f16 logits; the gradient has the logits' type. On CUDA
//! the kernels are `xent_fwd*`/`xent_bwd*` in `cuda/fused.cu`; on the CPU, the loops below.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{contiguous, last_dim, read_float, with_float, Elem};
use crate::error::OpContext;
use crate::Result;

/// Each row's negative log-likelihood of `z (n, v)` at `targets (n,)`, as `(n,)` f32.
pub fn row_nll(z: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (z, y) = inputs(z, targets, None)?;
    z.apply_op2_no_bwd(&y, &XentFwd).op("row_nll")
}

/// The gradient of `Σᵢ gᵢ · nllᵢ` with respect to `z (n, v)`, in z's dtype.
pub fn row_nll_grad(z: &Tensor, targets: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (z, y) = inputs(z, targets, Some(g))?;
    let g = g
        .to_dtype(DType::F32)
        .and_then(|g| g.to_device(z.device()))
        .and_then(|g| g.contiguous())
        .op("row_nll_grad")?;
    z.apply_op3_no_bwd(&y, &g, &XentBwd).op("row_nll_grad")
}

fn inputs(z: &Tensor, targets: &Tensor, g: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let (n, _) = z.dims2().op("cross-entropy logits")?;
    let bad = |what: &str, got: &[usize]| crate::Error::Shape {
        op: "cross-entropy".into(),
        expected: format!("{what} of {n} rows"),
        got: format!("{got:?}"),
    };
    if targets.dims() != [n] {
        return Err(bad("targets", targets.dims()));
    }
    if let Some(g) = g {
        if g.dims() != [n] {
            return Err(bad("row gradients", g.dims()));
        }
    }
    let z = z.contiguous().op("cross-entropy")?;
    let y = targets
        .to_dtype(DType::U32)
        .and_then(|y| y.to_device(z.device()))
        .and_then(|y| y.contiguous())
        .op("cross-entropy targets")?;
    Ok((z, y))
}

/// `(max, Σ exp(z − max))` of a row.
fn row_stats<T: Elem>(z: &[T]) -> (f32, f32) {
    let m = z.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v.to_f32()));
    (m, z.iter().map(|v| (v.to_f32() - m).exp()).sum())
}

fn nll_rows<T: Elem>(z: &[T], y: &[u32], v: usize) -> Vec<f32> {
    z.par_chunks(v)
        .zip(y.par_iter())
        .map(|(z, &k)| {
            let (m, s) = row_stats(z);
            match z.get(k as usize) {
                Some(zk) => s.ln() + m - zk.to_f32(),
                None => f32::NAN,
            }
        })
        .collect()
}

fn grad_rows<T: Elem>(z: &[T], y: &[u32], g: &[f32], v: usize) -> Vec<T> {
    let mut dz = vec![T::from_f32(0.0); z.len()];
    dz.par_chunks_mut(v)
        .zip(z.par_chunks(v))
        .zip(y.par_iter().zip(g.par_iter()))
        .for_each(|((d, z), (&k, &gr))| {
            let (m, s) = row_stats(z);
            let inv = 1.0 / s;
            for (j, (out, zj)) in d.iter_mut().zip(z).enumerate() {
                let p = (zj.to_f32() - m).exp() * inv - if j == k as usize { 1.0 } else { 0.0 };
                *out = T::from_f32(gr * p);
            }
        });
    dz
}

fn u32s<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => contiguous(v, l),
        s => candle_core::bail!(
            "cross-entropy targets must be u32, not {:?}",
            candle_core::backend::BackendStorage::dtype(s)
        ),
    }
}

struct XentFwd;

impl CustomOp2 for XentFwd {
    fn name(&self) -> &'static str {
        "xent_fwd"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        lz: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (v, y) = (last_dim(lz), u32s(y, ly)?);
        let nll = read_float!(z, lz, |zs| nll_rows(zs, y, v));
        let n = nll.len();
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        lz: &Layout,
        y: &candle_core::CudaStorage,
        ly: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let v = last_dim(lz);
        let rows = lz.shape().elem_count() / v;
        let out = crate::cuda_ops::xent((z, lz), (y, ly), None, rows, v)?;
        Ok((out, Shape::from(rows)))
    }
}

struct XentBwd;

impl CustomOp3 for XentBwd {
    fn name(&self) -> &'static str {
        "xent_bwd"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        lz: &Layout,
        y: &CpuStorage,
        ly: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (v, y) = (last_dim(lz), u32s(y, ly)?);
        let g = match g {
            CpuStorage::F32(g) => contiguous(g, lg)?,
            s => candle_core::bail!(
                "cross-entropy row gradients must be f32, not {:?}",
                candle_core::backend::BackendStorage::dtype(s)
            ),
        };
        let dz = with_float!(z, lz, |zs| grad_rows(zs, y, g, v));
        Ok((dz, lz.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        lz: &Layout,
        y: &candle_core::CudaStorage,
        ly: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let v = last_dim(lz);
        let rows = lz.shape().elem_count() / v;
        let out = crate::cuda_ops::xent((z, lz), (y, ly), Some((g, lg)), rows, v)?;
        Ok((out, lz.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// Values and gradients against log-softmax from plain ops; bf16 logits within rounding.
    #[test]
    fn matches_log_softmax() -> Result<()> {
        let dev = Device::Cpu;
        let (n, v) = (7, 33);
        let vals: Vec<f32> = (0..n * v).map(|i| (i as f32 * 0.613).sin() * 5.0).collect();
        let z = Var::from_tensor(&Tensor::from_vec(vals, (n, v), &dev).op("z")?).op("var")?;
        let y: Vec<u32> = (0..n as u32).map(|i| (i * 5 + 2) % v as u32).collect();
        let y = Tensor::new(y.as_slice(), &dev).op("y")?;
        let g: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 * 0.25).collect();
        let g = Tensor::new(g.as_slice(), &dev).op("g")?;
        let nll = row_nll(z.as_tensor(), &y)?;
        let dz = row_nll_grad(z.as_tensor(), &y, &g)?;
        let logp = candle_nn::ops::log_softmax(z.as_tensor(), D::Minus1).op("logp")?;
        let want = logp
            .gather(&y.unsqueeze(1).op("y")?, 1)
            .and_then(|p| p.squeeze(1)?.neg())
            .op("want")?;
        let grads = (&want * &g)
            .and_then(|p| p.sum_all())
            .op("loss")?
            .backward()
            .op("backward")?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .op("diff")
        };
        assert!(max_diff(&nll, &want)? < 1e-5);
        let Some(gz) = grads.get(z.as_tensor()) else {
            panic!("no gradient")
        };
        assert!(max_diff(&dz, gz)? < 1e-5);
        let zb = z.as_tensor().to_dtype(DType::BF16).op("bf16")?;
        let nb = row_nll(&zb, &y)?;
        assert!(max_diff(&nb, &want)? < 0.1, "bf16 rows");
        let db = row_nll_grad(&zb, &y, &g)?;
        assert_eq!(db.dtype(), DType::BF16);
        assert!(max_diff(&db.to_dtype(DType::F32).op("f32")?, gz)? < 0.05);
        Ok(())
    }

    #[test]
    fn bad_targets_and_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::zeros((2, 4), DType::F32, &dev).op("z")?;
        let y = Tensor::new(&[1u32, 9], &dev).op("y")?;
        let nll = row_nll(&z, &y)?.to_vec1::<f32>().op("nll")?;
        assert!((nll[0] - 4f32.ln()).abs() < 1e-6 && nll[1].is_nan());
        let short = Tensor::new(&[1u32], &dev).op("y")?;
        assert!(row_nll(&z, &short).is_err());
        let g = Tensor::new(&[1f32, 2.0, 3.0], &dev).op("g")?;
        assert!(row_nll_grad(&z, &y, &g).is_err());
        Ok(())
    }
}
