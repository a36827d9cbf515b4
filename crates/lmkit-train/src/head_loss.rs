//! The output layer and the cross-entropy loss in one op, over row chunks, so the
//! `(rows, vocab)` logits of a whole batch never exist at once.
//!
//! For hidden states `h (n, c)`, the output weight `W (v, c)`, targets `y` and row weights `m`
//! (1 for every row, or the SFT mask), with `z = h Wᵀ` and `p = softmax(z)`:
//!
//! ```text
//! loss = Σᵢ mᵢ (logsumexp(zᵢ) − zᵢ,yᵢ) / Σᵢ mᵢ
//! ∂loss/∂zᵢ = mᵢ (pᵢ − onehot(yᵢ)) / Σ m
//! ∂loss/∂h = (∂loss/∂z) W,    ∂loss/∂W = (∂loss/∂z)ᵀ h
//! ```
//!
//! The forward pass keeps no graph; the backward pass recomputes each chunk's logits. Memory
//! goes from O(n·v) to O(chunk·v); the price is one more `h Wᵀ` product.

use std::sync::Arc;

use lmkit_core::candle::CustomOp3;
use lmkit_core::{DType, Tensor, D};

use crate::Result;

/// Rows per chunk: 256 × 49,152 f32 logits are 50 MB.
const CHUNK: usize = 256;

/// Mean cross-entropy of `h (n, c) · Wᵀ` against `targets (n,)` u32, each row weighted by
/// `weights (n,)` f32 (or 1), with gradients to `h` and `w`.
pub fn output_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let n = h.dims2()?.0;
    let dev = h.device();
    let weights = match weights {
        Some(m) => m.to_dtype(DType::F32)?.to_device(dev)?,
        None => Tensor::ones(n, DType::F32, dev)?,
    };
    let targets = targets.to_dtype(DType::U32)?.to_device(dev)?;
    let total = weights.sum_all()?.maximum(1f32)?;
    let (hd, wd) = (h.detach(), w.detach());
    let mut sum = Tensor::zeros((), DType::F32, dev)?;
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let z = logits(&hd.narrow(0, start, len)?, &wd)?; // (len, v) f32
        let lse = log_sum_exp(&z)?; // (len,)
        let picked = z
            .gather(&targets.narrow(0, start, len)?.unsqueeze(1)?, 1)?
            .squeeze(1)?;
        let m = weights.narrow(0, start, len)?;
        sum = (sum + ((lse - picked)? * m)?.sum_all()?)?;
    }
    let loss = (sum / total.clone())?;
    if !h.track_op() && !w.track_op() {
        return Ok(loss);
    }
    let op = HeadLoss {
        targets,
        weights,
        total,
    };
    Ok(h.apply_op3_arc(w, &loss, Arc::new(Box::new(op)))?)
}

/// `h Wᵀ` in h's dtype, as f32.
fn logits(h: &Tensor, w: &Tensor) -> lmkit_core::candle::Result<Tensor> {
    h.matmul(&w.to_dtype(h.dtype())?.t()?)?.to_dtype(DType::F32)
}

fn log_sum_exp(z: &Tensor) -> lmkit_core::candle::Result<Tensor> {
    let max = z.max_keepdim(D::Minus1)?;
    let s = z
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?;
    (s + max)?.squeeze(1)
}

/// The backward pass of [`output_cross_entropy`] (the forward copies the computed loss).
struct HeadLoss {
    targets: Tensor,
    weights: Tensor,
    total: Tensor,
}

impl CustomOp3 for HeadLoss {
    fn name(&self) -> &'static str {
        "output-cross-entropy"
    }

    lmkit_core::copy_last_forward!(3);

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> lmkit_core::candle::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (hd, wd) = (h.detach(), w.detach());
        let n = hd.dims2()?.0;
        let scale = (g.to_dtype(DType::F32)? / &self.total)?; // dloss / Σm
        let mut dh = Vec::new();
        let mut dw: Option<Tensor> = None;
        for start in (0..n).step_by(CHUNK) {
            let len = CHUNK.min(n - start);
            let hc = hd.narrow(0, start, len)?;
            let z = logits(&hc, &wd)?;
            let p = candle_softmax(&z)?;
            let y = self.targets.narrow(0, start, len)?.unsqueeze(1)?;
            let minus_one = Tensor::full(-1f32, (len, 1), z.device())?;
            let dz = p.scatter_add(&y, &minus_one, 1)?; // p − onehot
            let m = (self
                .weights
                .narrow(0, start, len)?
                .unsqueeze(1)?
                .broadcast_mul(&scale))?;
            let dz = dz.broadcast_mul(&m)?; // (len, v) f32
            dh.push(dz.matmul(&wd.to_dtype(DType::F32)?)?.to_dtype(hd.dtype())?);
            let part = dz.t()?.matmul(&hc.to_dtype(DType::F32)?)?; // (v, c)
            dw = Some(match dw {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        let dh = Tensor::cat(&dh, 0)?;
        let dw = match dw {
            Some(d) => d.to_dtype(wd.dtype())?,
            None => wd.zeros_like()?,
        };
        Ok((Some(dh), Some(dw), None))
    }
}

fn candle_softmax(z: &Tensor) -> lmkit_core::candle::Result<Tensor> {
    lmkit_core::candle_nn::ops::softmax_last_dim(z)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_core::candle::Var;
    use lmkit_core::candle_nn::loss::cross_entropy;
    use lmkit_core::Device;

    fn vals(n: usize, s: f32, k: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * k).sin() * s).collect()
    }

    /// Loss and both gradients against candle's cross-entropy on full logits, with and
    /// without row weights, over more rows than one chunk.
    #[test]
    fn matches_the_unfused_loss_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, v) = (CHUNK + 37, 16, 50);
        let h = Var::from_tensor(&Tensor::from_vec(vals(n * c, 1.0, 0.37), (n, c), &dev)?)?;
        let w = Var::from_tensor(&Tensor::from_vec(vals(v * c, 0.5, 0.11), (v, c), &dev)?)?;
        let y: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let y = Tensor::new(y.as_slice(), &dev)?;
        let mask: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { 1.0 }).collect();
        let mask = Tensor::new(mask.as_slice(), &dev)?;
        for weights in [None, Some(&mask)] {
            let fused = output_cross_entropy(h.as_tensor(), w.as_tensor(), &y, weights)?;
            let gf = fused.backward()?;
            let z = h.as_tensor().matmul(&w.as_tensor().t()?)?;
            let plain = match weights {
                None => cross_entropy(&z, &y)?,
                Some(m) => {
                    let logp = lmkit_core::candle_nn::ops::log_softmax(&z, D::Minus1)?;
                    let nll = logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
                    ((nll * m)?.sum_all()? / m.sum_all()?.to_scalar::<f32>()? as f64)?
                }
            };
            let gp = plain.backward()?;
            let (a, b) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
            assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
            for var in [&h, &w] {
                let ga = gf
                    .get(var.as_tensor())
                    .map(|t| t.flatten_all()?.to_vec1::<f32>());
                let gb = gp
                    .get(var.as_tensor())
                    .map(|t| t.flatten_all()?.to_vec1::<f32>());
                let (Some(ga), Some(gb)) = (ga, gb) else {
                    panic!("a gradient is missing");
                };
                let (ga, gb) = (ga?, gb?);
                let peak = gb.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (x, y) in ga.iter().zip(&gb) {
                    assert!((x - y).abs() <= 1e-5 * peak.max(1e-3), "{x} vs {y}");
                }
            }
        }
        Ok(())
    }
}
