//! `y = x Wᵀ` for a weight that does not train (the base layers under LoRA, a frozen
//! reference), whose backward pass computes only the input's gradient.
//!
//! candle's matmul backward computes both operands' gradients whether or not they are wanted:
//! for a frozen `W (out, in)` that is a wasted `gᵀ x` product (a third of the layer's backward
//! FLOPs) and an `(out, in)` buffer per layer per step. Here:
//!
//! ```text
//! forward   y = x Wᵀ          (rows, in) · (in, out)
//! backward  ∂x = g W           (rows, out) · (out, in);  no ∂W
//! ```
//!
//! On the CPU with f32 operands the forward runs `gemm` directly on the tensors' memory (no
//! copy); elsewhere (CUDA, bf16) it runs candle's matmul without a graph and attaches the
//! backward to the result (one copy of `y`).
//!
//! Deviations: none in the math.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::error::OpContext;
use crate::sgemm::View;
use crate::Result;

/// `x (rows, in) · Wᵀ` with `W (out, in)` held constant; the gradient flows to `x` only.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, inp) = x.dims2().op("frozen matmul input")?;
    let w_in = w.dims2().op("frozen matmul weight")?.1;
    if inp != w_in {
        return Err(crate::Error::Shape {
            op: "frozen matmul".into(),
            expected: format!("(.., {w_in})"),
            got: format!("({rows}, {inp})"),
        });
    }
    let w = w.detach();
    let direct = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if direct {
        let w = w.contiguous().op("frozen matmul weight")?;
        let x = x.contiguous().op("frozen matmul input")?;
        return x
            .apply_op1_arc(Arc::new(Box::new(FrozenMatmul { w })))
            .op("frozen matmul");
    }
    let y = x
        .detach()
        .matmul(&w.t().op("frozen matmul")?)
        .op("frozen matmul")?;
    crate::fused::attach(x, y, "frozen matmul", Box::new(move |_, g| g.matmul(&w)))
}

/// The CPU op: forward through `gemm`, backward `g W`.
struct FrozenMatmul {
    /// `(out, in)`, contiguous f32 on the CPU.
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp) = l.shape().dims2()?;
        let (out, _) = self.w.dims2()?;
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("frozen matmul: the input must be contiguous f32"),
        };
        let y = crate::cpu::with_f32(&self.w, |w| {
            let mut y = vec![0f32; rows * out];
            crate::sgemm::sgemm(
                &mut y,
                View::rows(x, rows, inp),
                View::rows(w, out, inp).t(),
                false,
            )
            .map(|()| y)
        });
        let y = match y {
            Some(y) => y.map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            None => candle_core::bail!("frozen matmul: the weight must be contiguous f32"),
        };
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.matmul(&self.w)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn vals(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * k).sin()).collect()
    }

    /// Value and input gradient match candle's matmul; the weight gets no gradient.
    #[test]
    fn matches_matmul_and_leaves_the_weight_alone() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, inp, out) = (37, 24, 19);
        let x =
            Var::from_tensor(&Tensor::from_vec(vals(rows * inp, 0.37), (rows, inp), &dev).op("x")?)
                .op("x")?;
        let w = Tensor::from_vec(vals(out * inp, 0.11), (out, inp), &dev).op("w")?;
        let g = Tensor::from_vec(vals(rows * out, 0.23), (rows, out), &dev).op("g")?;
        let y = matmul_t(x.as_tensor(), &w)?;
        let plain = x.as_tensor().matmul(&w.t().op("t")?).op("plain")?;
        let d = (&y - &plain).op("d")?.abs().op("d")?.max_all().op("d")?;
        assert!(d.to_scalar::<f32>().op("d")? < 1e-5);
        let loss = |t: &Tensor| (t * &g).and_then(|p| p.sum_all()).op("loss");
        let (gf, gp) = (
            loss(&y)?.backward().op("bwd")?,
            loss(&plain)?.backward().op("bwd")?,
        );
        let (Some(a), Some(b)) = (gf.get(x.as_tensor()), gp.get(x.as_tensor())) else {
            panic!("no gradient for x");
        };
        let d = (a - b).op("d")?.abs().op("d")?.max_all().op("d")?;
        assert!(d.to_scalar::<f32>().op("d")? < 1e-5);
        assert!(gf.get(&w).is_none());
        Ok(())
    }
}
