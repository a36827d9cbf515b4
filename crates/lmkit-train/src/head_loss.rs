//! The output layer and the cross-entropy loss in one op, over row chunks, so the
//! `(rows, vocab)` logits of a whole batch never exist at once.
//!
//! For hidden states `h (n, c)`, the output weight `W (v, c)` and targets `y`, with `z = h Wᵀ`
//! and `p = softmax(z)`, the op gives each row's negative log-likelihood, and for an upstream
//! gradient `g (n,)`:
//!
//! ```text
//! nllᵢ = logsumexp(zᵢ) − zᵢ,yᵢ
//! ∂/∂zᵢ = gᵢ (pᵢ − onehot(yᵢ))
//! ∂/∂h = (∂/∂z) W,    ∂/∂W = (∂/∂z)ᵀ h   (only when W trains: not for LoRA's frozen head)
//! ```
//!
//! Losses are reductions of `nll` in plain tensor ops: the (masked) mean cross-entropy of
//! training and SFT, the summed completion log-probs of DPO. Rows whose weight is zero (prompt
//! tokens, padding) are dropped before the head: they cost nothing.
//!
//! The mean cross-entropy of training and SFT knows each row's gradient factor `gᵢ = mᵢ / Σm`
//! before the loss, so its gradients are computed in the forward pass and each chunk's logits
//! once: on the CPU in f32 in one pass over plain buffers (`crate::head_cpu`), elsewhere (CUDA,
//! bf16) as three products per chunk around lmkit's cross-entropy kernels ([`one_pass`]). The
//! per-row losses of DPO and DRO get their factors only later: their forward keeps no graph
//! and the backward recomputes each chunk's logits. Either way memory goes from O(n·v) to
//! O(chunk·v).

use std::sync::Arc;

use lmkit_core::block_ops::BlockOps;
use lmkit_core::candle::CustomOp3;
use lmkit_core::launch::Launcher;
use lmkit_core::{xent, DType, Tensor};

use crate::head_cpu::{self, CHUNK};
use crate::Result;

/// Each row's next-token negative log-likelihood under `h (n, c) · Wᵀ`, against `targets
/// (n,)`, as `(n,)` f32, with gradients to `h` (and to `w` when it trains).
pub fn output_nll(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = h.dims2()?.0;
    // A frozen head on the CPU: ∂h in the forward pass (a trained one needs each row's
    // upstream gradient for ∂W, so it takes the recomputing path).
    if !w.track_op() && head_cpu::applies(h, w) {
        let p = cpu_pass(h, w, targets, &vec![1.0; n], h.track_op(), false)?;
        let nll = Tensor::from_vec(p.nll, n, h.device())?;
        let dh = match p.dh {
            Some(d) => Some(Tensor::from_vec(d, h.dims2()?, h.device())?),
            None => None,
        };
        return attach(h, w, nll, (dh, None), true);
    }
    let dev = h.device();
    let targets = targets.to_dtype(DType::U32)?.to_device(dev)?;
    let hd = h.detach();
    let wl = w.detach().to_dtype(h.dtype())?; // the products in h's dtype
    let chunk = chunk_rows(h, wl.dims2()?.0);
    let mut parts = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let z = hd.narrow(0, start, len)?.matmul(&wl.t()?)?; // (len, v)
        parts.push(xent::row_nll(&z, &targets.narrow(0, start, len)?)?);
    }
    let nll = cat_rows(parts, dev)?;
    if !h.track_op() && !w.track_op() {
        return Ok(nll);
    }
    Ok(h.apply_op3_arc(w, &nll, Arc::new(Box::new(HeadNll { targets })))?)
}

/// Mean cross-entropy of `h (n, c) · Wᵀ` against `targets (n,)`, each row weighted by
/// `weights (n,)` (or 1): `Σᵢ mᵢ nllᵢ / max(Σᵢ mᵢ, 1)`. Rows of weight zero are skipped when
/// the weights are on the host. With a graph to differentiate, the gradients are computed in
/// the forward pass (each row's factor `mᵢ / Σm` is known before the loss), so the logits of a
/// chunk are computed once: on the CPU in f32 by [`head_cpu`], elsewhere by [`one_pass`].
///
/// The result is the loss times `scale` (loss scaling: [`crate::loss_scale`]), and so are its
/// gradients, which are computed at that scale: with `S = 2¹⁶`, `∂z = S·mᵢ/Σm·(p − onehot)`
/// stays in f16's range where `mᵢ/Σm·(p − onehot)` would flush to zero.
pub fn output_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let m = match weights {
        Some(m) => m.to_dtype(DType::F32)?,
        None => Tensor::ones(h.dims2()?.0, DType::F32, h.device())?,
    };
    if m.device().is_cpu() && head_cpu::applies(h, w) {
        // Rows of weight zero are skipped; each kept row's gradient factor is mᵢ / Σm.
        let mv = m.to_vec1::<f32>()?;
        let total = mv.iter().sum::<f32>().max(1.0);
        let k = scale as f32;
        let (h, targets, coef): (Tensor, Tensor, Vec<f32>) = match kept_rows(&m)? {
            Some(idx) => (
                h.index_select(&idx, 0)?,
                targets.index_select(&idx, 0)?,
                idx.to_vec1::<u32>()?
                    .iter()
                    .map(|&i| mv[i as usize] / total * k)
                    .collect(),
            ),
            None => (
                h.clone(),
                targets.clone(),
                mv.iter().map(|x| x / total * k).collect(),
            ),
        };
        let p = cpu_pass(&h, w, &targets, &coef, h.track_op(), w.track_op())?;
        let loss: f64 = p.nll.iter().zip(&coef).map(|(l, k)| (*l * *k) as f64).sum();
        let loss = Tensor::new(loss as f32, h.device())?;
        let dev = h.device();
        let dh = match p.dh {
            Some(d) => Some(Tensor::from_vec(d, h.dims2()?, dev)?),
            None => None,
        };
        let dw = match p.dw {
            Some(d) => Some(Tensor::from_vec(d, w.dims2()?, dev)?),
            None => None,
        };
        return attach(&h, w, loss, (dh, dw), false);
    }
    let total = m.sum_all()?.maximum(1f32)?.to_device(h.device())?;
    let (h, targets, m) = match kept_rows(&m)? {
        Some(idx) => (
            h.index_select(&idx.to_device(h.device())?, 0)?,
            targets.index_select(&idx, 0)?,
            m.index_select(&idx, 0)?,
        ),
        None => (h.clone(), targets.clone(), m),
    };
    let coef = (m.to_device(h.device())?.broadcast_div(&total)? * scale)?;
    if !h.track_op() && !w.track_op() {
        return Ok((output_nll(&h, w, &targets)? * coef)?.sum_all()?);
    }
    let (loss, dh, dw) = one_pass(&h, w, &targets, &coef, h.track_op(), w.track_op())?;
    attach(&h, w, loss, (dh, dw), false)
}

/// `Σᵢ coefᵢ nllᵢ` of `h (n, c) · Wᵀ` at `targets`, with its gradients to `h` (in h's dtype)
/// and to `w` (f32, then w's dtype) when asked for, on any device, over row chunks: per chunk
/// the logits `z = h Wᵀ` (one product in h's dtype), each row's nll and `∂z = coef (p −
/// onehot)` from them (f32 inside: on a GPU one kernel that writes `∂z` over the logits,
/// `BlockOps::xent_in_place`, else `lmkit_core::xent`), then `∂h = ∂z W` and `∂W += ∂zᵀ h`.
/// Three products per chunk where the recomputing backward of [`output_nll`] takes four.
pub fn one_pass(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    coef: &Tensor,
    want_dh: bool,
    want_dw: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let (n, c) = h.dims2()?;
    let (v, wc) = w.dims2()?;
    if wc != c || targets.dims() != [n] || coef.dims() != [n] {
        return Err(crate::Error::Data(format!(
            "output layer: hidden {:?}, weight {:?}, targets {:?}, row factors {:?}",
            h.dims(),
            w.dims(),
            targets.dims(),
            coef.dims()
        )));
    }
    let dev = h.device();
    let targets = targets.to_dtype(DType::U32)?.to_device(dev)?.contiguous()?;
    let coef = coef.to_dtype(DType::F32)?.to_device(dev)?.contiguous()?;
    let hd = h.detach();
    let wl = w.detach().to_dtype(h.dtype())?;
    // On a GPU (or its emulator), lmkit's kernels: the loss and ∂z of a chunk in one kernel
    // that writes ∂z over the logits (`tr_xent`), and for 16-bit products ∂W summed into f32
    // in one pass per chunk, where candle's cast then add made three (0.59 ms a chunk on an
    // H200 for the 113M model).
    let ops = Launcher::for_device(dev).and_then(|l| BlockOps::new(l, h.dtype(), dev).ok());
    let dw_ops = match h.dtype() {
        DType::BF16 | DType::F16 => ops.as_ref(),
        _ => None,
    };
    // Without the in-place kernel z and ∂z of a chunk are alive together: half the rows of the
    // recomputing path. With it ∂z takes z's place, so a chunk is as large (fewer, larger
    // products).
    let chunk = match ops {
        Some(_) => chunk_rows(h, v),
        None => (chunk_rows(h, v) / 2).max(CHUNK),
    };
    let (mut nll, mut dh) = (Vec::new(), Vec::new());
    let mut dw: Option<Tensor> = None;
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let hc = hd.narrow(0, start, len)?;
        let y = targets.narrow(0, start, len)?;
        let z = hc.matmul(&wl.t()?)?; // (len, v)
        if !want_dh && !want_dw {
            nll.push(xent::row_nll(&z, &y)?);
            continue;
        }
        let k = coef.narrow(0, start, len)?;
        let dz = match &ops {
            Some(ops) => {
                nll.push(ops.xent_in_place(&z, &y, &k)?);
                z // now ∂z
            }
            None => {
                nll.push(xent::row_nll(&z, &y)?);
                xent::row_nll_grad(&z, &y, &k)?
            }
        };
        chunk_grads(
            &dz,
            &hc,
            &wl,
            (want_dh, &mut dh),
            (want_dw, &mut dw),
            dw_ops,
        )?;
    }
    let nll = cat_rows(nll, dev)?;
    let loss = (nll * coef)?.sum_all()?;
    let dh = match (want_dh, dh.len()) {
        (false, _) => None,
        (true, 0) => Some(Tensor::zeros((0, c), h.dtype(), dev)?),
        (true, _) => Some(cat_rows(dh, dev)?),
    };
    let dw = match (want_dw, dw) {
        (true, Some(d)) => Some(d.to_dtype(w.dtype())?),
        (true, None) => Some(Tensor::zeros((v, c), w.dtype(), dev)?),
        (false, _) => None,
    };
    Ok((loss, dh, dw))
}

/// The products of one chunk's logit gradient `dz (len, v)` with `h`'s rows `hc` and the
/// weight `wl` in the compute dtype: `∂h = dz W` pushed to `dh`, and `∂W += dzᵀ h` summed in
/// f32 into `dw`, each when asked for (by `ops`' kernels when given: 16-bit products).
fn chunk_grads(
    dz: &Tensor,
    hc: &Tensor,
    wl: &Tensor,
    (want_dh, dh): (bool, &mut Vec<Tensor>),
    (want_dw, dw): (bool, &mut Option<Tensor>),
    ops: Option<&BlockOps>,
) -> Result<()> {
    if want_dh {
        dh.push(dz.matmul(wl)?);
    }
    if want_dw {
        let part = dz.t()?.matmul(hc)?; // (v, c) in the compute dtype
        *dw = Some(match (dw.take(), ops) {
            (Some(acc), Some(k)) => k.add(&acc, &part)?,
            (None, Some(k)) => match k.widen(&[&part])?.pop() {
                Some(t) => t,
                None => part.to_dtype(DType::F32)?,
            },
            (Some(acc), None) => (acc + part.to_dtype(DType::F32)?)?,
            (None, None) => part.to_dtype(DType::F32)?,
        });
    }
    Ok(())
}

/// Row chunks back into one tensor (an empty f32 vector when there are none).
fn cat_rows(mut parts: Vec<Tensor>, dev: &lmkit_core::Device) -> Result<Tensor> {
    Ok(match parts.len() {
        0 => Tensor::zeros(0, DType::F32, dev)?,
        1 => parts.swap_remove(0),
        _ => Tensor::cat(&parts, 0)?,
    })
}

/// [`head_cpu::pass`] over tensors: `h (n, c)`, `w (v, c)` f32 on the CPU.
fn cpu_pass(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    coef: &[f32],
    want_dh: bool,
    want_dw: bool,
) -> Result<head_cpu::Pass> {
    let (v, c) = w.dims2()?;
    let ys = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let n = h.dims2()?.0;
    if ys.len() != n || coef.len() != n || w.dims2()?.1 != h.dims2()?.1 {
        return Err(crate::Error::Data(format!(
            "output layer: {n} hidden rows, {} targets, {} row weights, weight {:?}",
            ys.len(),
            coef.len(),
            w.dims()
        )));
    }
    if let Some(y) = ys.iter().find(|&&y| y as usize >= v) {
        return Err(crate::Error::Data(format!(
            "target token {y} is outside the output layer's {v} rows"
        )));
    }
    let h = h.detach().contiguous()?;
    let run = |hv: &[f32]| {
        head_cpu::with_f32(w, |wv| {
            head_cpu::pass(hv, wv, c, &ys, coef, want_dh, want_dw)
        })
    };
    match head_cpu::with_f32(&h, run) {
        Some(Some(p)) => p,
        _ => Err(crate::Error::Data(
            "the fused head needs f32 CPU tensors".into(),
        )),
    }
}

/// `value` with gradients computed in the forward pass attached to `h` and `w`: scaled by
/// each row's upstream gradient (`rowwise`, value `(n,)`) or by the scalar one.
fn attach(
    h: &Tensor,
    w: &Tensor,
    value: Tensor,
    (dh, dw): (Option<Tensor>, Option<Tensor>),
    rowwise: bool,
) -> Result<Tensor> {
    if !h.track_op() && !w.track_op() {
        return Ok(value);
    }
    let op = Precomputed { dh, dw, rowwise };
    Ok(h.apply_op3_arc(w, &value, Arc::new(Box::new(op)))?)
}

/// `d · g` for a one-element upstream gradient `g`, read on the device: lmkit's kernel where
/// one runs (`BlockOps::scale`, 16-byte loads), else candle's broadcast multiply (on an H200 it
/// took 548 µs a step over the 151 MB of a 113M model's output-layer ∂W).
fn scaled(d: &Tensor, g: &Tensor) -> lmkit_core::candle::Result<Tensor> {
    let dev = d.device();
    let ops = Launcher::for_device(dev).and_then(|l| BlockOps::new(l, d.dtype(), dev).ok());
    match ops {
        Some(k) => {
            let s = g.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
            k.scale(&d.contiguous()?, &s)
                .map_err(|e| lmkit_core::candle::Error::msg(e.to_string()))
        }
        // In f32 and rounded once, as the kernel does.
        None => d
            .to_dtype(DType::F32)?
            .broadcast_mul(&g.to_dtype(DType::F32)?.reshape((1, 1))?)?
            .to_dtype(d.dtype()),
    }
}

/// Gradients computed in the forward pass, scaled by the upstream gradient.
struct Precomputed {
    dh: Option<Tensor>,
    dw: Option<Tensor>,
    rowwise: bool,
}

impl CustomOp3 for Precomputed {
    fn name(&self) -> &'static str {
        "output-loss"
    }

    lmkit_core::copy_last_forward!(3);

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> lmkit_core::candle::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The gradients keep their dtypes (∂h in h's, ∂W in W's).
        let like = |d: &Tensor| g.to_dtype(d.dtype());
        let dh = match &self.dh {
            Some(d) if self.rowwise => Some(d.broadcast_mul(&like(d)?.unsqueeze(1)?)?),
            Some(d) => Some(scaled(d, g)?),
            None => None,
        };
        let dw = match &self.dw {
            Some(d) if !self.rowwise => Some(scaled(d, g)?),
            // Per-row upstream gradients cannot scale a summed ∂W; that case never gets here.
            _ => None,
        };
        Ok((dh, dw, None))
    }
}

/// The output weight of `model` when its head is a plain dense layer (no adapter, no bias):
/// the case the fused op covers.
pub fn dense_head(model: &lmkit_models::Llama) -> Option<&Tensor> {
    let head = model.lm_head();
    match (head.weight(), head.lora(), head.bias()) {
        (lmkit_core::linear::Weight::Dense(w), None, None) => Some(w),
        _ => None,
    }
}

/// The indices of the nonzero entries of a host-side `m (n,)`, when some but not all are
/// zero.
pub fn kept_rows(m: &Tensor) -> Result<Option<Tensor>> {
    if !m.device().is_cpu() {
        return Ok(None);
    }
    let v = m.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let idx: Vec<u32> = (0..v.len() as u32)
        .filter(|&i| v[i as usize] != 0.0)
        .collect();
    if idx.len() == v.len() || idx.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::new(idx, m.device())?))
}

/// The backward pass of [`output_nll`] (the forward copies the computed values).
struct HeadNll {
    targets: Tensor,
}

impl CustomOp3 for HeadNll {
    fn name(&self) -> &'static str {
        "output-nll"
    }

    lmkit_core::copy_last_forward!(3);

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _nll: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> lmkit_core::candle::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (hd, wd) = (h.detach(), w.detach());
        let n = hd.dims2()?.0;
        let want_dw = w.track_op();
        let g = g.to_dtype(DType::F32)?;
        // Products in h's dtype (bf16 under mixed precision: tensor cores on a GPU), the
        // softmax in f32 inside the cross-entropy op, ∂W summed in f32.
        let wl = wd.to_dtype(hd.dtype())?;
        let chunk = chunk_rows(&hd, wl.dims2()?.0);
        let mut dh = Vec::new();
        let mut dw: Option<Tensor> = None;
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let hc = hd.narrow(0, start, len)?;
            let z = hc.matmul(&wl.t()?)?; // (len, v)
            let y = self.targets.narrow(0, start, len)?;
            let dz = xent::row_nll_grad(&z, &y, &g.narrow(0, start, len)?)
                .map_err(|e| lmkit_core::candle::Error::msg(e.to_string()))?;
            chunk_grads(&dz, &hc, &wl, (true, &mut dh), (want_dw, &mut dw), None)
                .map_err(|e| lmkit_core::candle::Error::msg(e.to_string()))?;
        }
        let dh = match dh.len() {
            1 => dh.swap_remove(0),
            _ => Tensor::cat(&dh, 0)?,
        };
        let dw = match dw {
            Some(d) => Some(d.to_dtype(wd.dtype())?),
            None => None,
        };
        Ok((Some(dh), dw, None))
    }
}

/// Rows per chunk of the recomputing path: [`CHUNK`] on the CPU; on a GPU as many as keep a
/// chunk's logits under 2²⁸ values (512 MB in bf16), which keeps its GEMMs large.
fn chunk_rows(h: &Tensor, vocab: usize) -> usize {
    if h.device().is_cpu() {
        CHUNK
    } else {
        ((1usize << 28) / vocab.max(1)).max(CHUNK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_core::candle::Var;
    use lmkit_core::candle_nn::loss::cross_entropy;
    use lmkit_core::{Device, D};

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
            let fused = output_cross_entropy(h.as_tensor(), w.as_tensor(), &y, weights, 1.0)?;
            let gf = fused.backward()?;
            // Scaled by a power of two: the same bits, times the scale.
            let scaled = output_cross_entropy(h.as_tensor(), w.as_tensor(), &y, weights, 1024.0)?;
            let gs = scaled.backward()?;
            assert_eq!(
                scaled.to_scalar::<f32>()?,
                1024.0 * fused.to_scalar::<f32>()?
            );
            for var in [&h, &w] {
                let (Some(a), Some(b)) = (gs.get(var.as_tensor()), gf.get(var.as_tensor())) else {
                    panic!("a gradient is missing");
                };
                let a = (a / 1024.0)?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(a, b.flatten_all()?.to_vec1::<f32>()?);
            }
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

    /// The path for devices other than an f32 CPU: `one_pass` in f32 against candle's
    /// cross-entropy on full logits (tight), and `output_cross_entropy` with bf16 hidden states
    /// and an f32 weight (mixed precision) against the same in f32 (loose), over three chunks.
    #[test]
    fn one_pass_matches_the_unfused_loss_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, v) = (2 * CHUNK + 37, 16, 50);
        let hv = vals(n * c, 1.0, 0.37);
        let h = Var::from_tensor(&Tensor::from_vec(hv.clone(), (n, c), &dev)?)?;
        let w = Var::from_tensor(&Tensor::from_vec(vals(v * c, 0.5, 0.11), (v, c), &dev)?)?;
        let y: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let y = Tensor::new(y.as_slice(), &dev)?;
        let mask: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.5).collect();
        let mask = Tensor::new(mask.as_slice(), &dev)?;
        let total = mask.sum_all()?.to_scalar::<f32>()? as f64;
        let z = h.as_tensor().matmul(&w.as_tensor().t()?)?;
        let logp = lmkit_core::candle_nn::ops::log_softmax(&z, D::Minus1)?;
        let nll = logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        let plain = ((nll * &mask)?.sum_all()? / total)?;
        let gp = plain.backward()?;
        let (want_dh, want_dw) = match (gp.get(h.as_tensor()), gp.get(w.as_tensor())) {
            (Some(a), Some(b)) => (a.clone(), b.clone()),
            _ => panic!("a reference gradient is missing"),
        };
        let dist = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
            let d = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            Ok(d / b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-12))
        };
        let coef = (&mask / total)?;
        let (loss, dh, dw) = one_pass(h.as_tensor(), w.as_tensor(), &y, &coef, true, true)?;
        let (Some(dh), Some(dw)) = (dh, dw) else {
            panic!("one_pass gave no gradient");
        };
        let (a, b) = (loss.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
        assert!(dist(&dh, &want_dh)? < 1e-5 && dist(&dw, &want_dw)? < 1e-5);
        // bf16 hidden states, f32 weight, through the public op and candle's backward.
        let hb = Var::from_tensor(&h.as_tensor().to_dtype(DType::BF16)?)?;
        let lb = output_cross_entropy(hb.as_tensor(), w.as_tensor(), &y, Some(&mask), 1.0)?;
        let gb = lb.backward()?;
        let (Some(dhb), Some(dwb)) = (gb.get(hb.as_tensor()), gb.get(w.as_tensor())) else {
            panic!("the bf16 path gave no gradient");
        };
        // Loss scaling by a power of two: the same bits, times the scale.
        let ls = output_cross_entropy(hb.as_tensor(), w.as_tensor(), &y, Some(&mask), 65536.0)?;
        let gs = ls.backward()?;
        let f = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        assert_eq!(
            f(&(ls.to_dtype(DType::F32)? / 65536.0)?)?,
            f(&lb.to_dtype(DType::F32)?)?
        );
        for (t, want) in [(hb.as_tensor(), dhb), (w.as_tensor(), dwb)] {
            let Some(got) = gs.get(t) else {
                panic!("the scaled bf16 path gave no gradient");
            };
            assert_eq!(f(&(got.to_dtype(DType::F32)? / 65536.0)?)?, f(want)?);
        }
        assert_eq!((dhb.dtype(), dwb.dtype()), (DType::BF16, DType::F32));
        let lb = lb.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        assert!((lb - b).abs() < 0.02 * b.abs(), "bf16 loss {lb} vs {b}");
        let (eh, ew) = (dist(dhb, &want_dh)?, dist(dwb, &want_dw)?);
        assert!(eh < 0.03 && ew < 0.03, "bf16 gradients off by {eh}, {ew}");
        // Without a graph: the same loss, no gradient work.
        let frozen = output_cross_entropy(
            &hb.as_tensor().detach(),
            &w.as_tensor().detach(),
            &y,
            Some(&mask),
            1.0,
        )?;
        let lf = frozen.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        assert!((lf - lb).abs() < 1e-4, "no-graph loss {lf} vs {lb}");
        Ok(())
    }

    /// A frozen output weight (LoRA) gets no gradient; the hidden states' gradient is the
    /// same as with a trained one. Per-row values match log-softmax.
    #[test]
    fn frozen_weight_and_per_row_values() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, v) = (CHUNK + 5, 8, 30);
        let h = Var::from_tensor(&Tensor::from_vec(vals(n * c, 1.0, 0.29), (n, c), &dev)?)?;
        let w = Tensor::from_vec(vals(v * c, 0.5, 0.13), (v, c), &dev)?;
        let y: Vec<u32> = (0..n as u32).map(|i| (i * 11) % v as u32).collect();
        let y = Tensor::new(y.as_slice(), &dev)?;
        let nll = output_nll(h.as_tensor(), &w, &y)?;
        let z = h.as_tensor().matmul(&w.t()?)?;
        let logp = lmkit_core::candle_nn::ops::log_softmax(&z, D::Minus1)?;
        let want = logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        let weights = Tensor::from_vec(vals(n, 1.0, 0.7), n, &dev)?;
        let gf = (&nll * &weights)?.sum_all()?.backward()?;
        let gp = (&want * &weights)?.sum_all()?.backward()?;
        let (a, b) = (nll.to_vec1::<f32>()?, want.to_vec1::<f32>()?);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        assert!(gf.get(&w).is_none(), "the frozen weight got a gradient");
        // A trained weight under per-row gradients takes the recomputing path.
        let wv = Var::from_tensor(&w)?;
        let nll_t = output_nll(h.as_tensor(), wv.as_tensor(), &y)?;
        let gt = (&nll_t * &weights)?.sum_all()?.backward()?;
        let zt = h.as_tensor().matmul(&wv.as_tensor().t()?)?;
        let lt = lmkit_core::candle_nn::ops::log_softmax(&zt, D::Minus1)?;
        let want_t = lt.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        let gpt = (&want_t * &weights)?.sum_all()?.backward()?;
        for t in [h.as_tensor(), wv.as_tensor()] {
            let (Some(a), Some(b)) = (gt.get(t), gpt.get(t)) else {
                panic!("a gradient is missing");
            };
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "recomputing path differs by {d}");
        }
        let (Some(ga), Some(gb)) = (gf.get(h.as_tensor()), gp.get(h.as_tensor())) else {
            panic!("no gradient for h");
        };
        let d = (ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "dh differs by {d}");
        Ok(())
    }
}
