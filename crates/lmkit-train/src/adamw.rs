//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101), as
//! PyTorch's `torch.optim.AdamW` computes it, and global-norm gradient clipping as
//! `torch.nn.utils.clip_grad_norm_` does.
//!
//! Per step `t` (1-based), for a parameter `θ` with gradient `g`:
//! ```text
//! θ ← θ·(1 − lr·λ)                      (decoupled decay; only in the decay group)
//! m ← β₁·m + (1 − β₁)·g
//! v ← β₂·v + (1 − β₂)·g²
//! θ ← θ − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
//! ```
//! Clipping scales every gradient by `min(1, max_norm / (‖g‖₂ + 1e-6))`, `‖g‖₂` over all of them.

use lmkit_core::candle::backprop::GradStore;
use lmkit_core::candle::Var;
use lmkit_core::cpu::with_f32;
use lmkit_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Result;

mod multi;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults except the decay, which is the common LM-training 0.1.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

struct Slot {
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over a fixed set of variables.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: usize,
}

impl AdamW {
    /// `params`: each variable and whether weight decay applies to it.
    pub fn new(params: Vec<(Var, bool)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(var, decay)| {
                // Two buffers: on CUDA the moments are updated in place.
                Ok(Slot {
                    m: var.as_tensor().zeros_like()?,
                    v: var.as_tensor().zeros_like()?,
                    var,
                    decay,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The first and second moments, in variable order.
    pub fn moments(&self) -> Vec<(&Tensor, &Tensor)> {
        self.slots.iter().map(|s| (&s.m, &s.v)).collect()
    }

    /// Restores a saved state: steps taken and the moments in variable order (shapes must
    /// match the variables).
    pub fn restore(&mut self, step: usize, moments: Vec<(Tensor, Tensor)>) -> Result<()> {
        if moments.len() != self.slots.len() {
            return Err(crate::Error::Data(format!(
                "optimizer state has {} entries for {} variables",
                moments.len(),
                self.slots.len()
            )));
        }
        for (i, (s, (m, v))) in self.slots.iter_mut().zip(moments).enumerate() {
            let want = s.var.as_tensor().dims();
            if m.dims() != want || v.dims() != want {
                return Err(crate::Error::Data(format!(
                    "optimizer state entry {i}: shape {:?}/{:?}, variable {:?}",
                    m.dims(),
                    v.dims(),
                    want
                )));
            }
            let dev = s.var.as_tensor().device();
            (s.m, s.v) = (m.to_device(dev)?, v.to_device(dev)?);
        }
        self.step = step;
        Ok(())
    }

    /// The global L2 norm of the gradients of this optimizer's variables, as a scalar tensor
    /// on their device (reading it is left to the caller: on a GPU that waits for the step).
    pub fn grad_norm_tensor(&self, grads: &GradStore) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                // Rows first: a whole-tensor sum is one GPU block (0.24 ms for 1.5M values).
                let sq = g.to_dtype(lmkit_core::DType::F32)?.sqr()?;
                let sq = match sq.rank() {
                    0 | 1 => sq.sum_all()?,
                    _ => sq.sum(lmkit_core::D::Minus1)?.sum_all()?,
                };
                sum = Some(match sum {
                    Some(acc) => (acc + sq)?,
                    None => sq,
                });
            }
        }
        Ok(match sum {
            Some(s) => Some(s.sqrt()?),
            None => None,
        })
    }

    /// The global L2 norm of the gradients, read back.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        Ok(match self.grad_norm_tensor(grads)? {
            Some(n) => n.to_scalar::<f32>()? as f64,
            None => 0.0,
        })
    }

    /// One update with learning rate `lr`, every gradient multiplied by `grad_scale` first
    /// (clipping, or averaging accumulated micro-batches). Variables without a gradient are
    /// left alone (their moments too), as in PyTorch.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.update(grads, lr, &Scale::Host(grad_scale))
    }

    /// [`AdamW::step`] with the gradient scale a scalar tensor on the variables' device (the
    /// clip factor computed there, so a GPU step never waits for the host).
    pub fn step_scaled(&mut self, grads: &GradStore, lr: f64, grad_scale: &Tensor) -> Result<()> {
        self.update(grads, lr, &Scale::Device(grad_scale))
    }

    /// One update from gradients summed over micro-batches: averaged (times `mean`), clipped
    /// to a global norm of `clip` (as [`clip_scale`] computes it), then applied, all on the
    /// device. Returns the averaged gradient's norm as a device scalar, for the caller to
    /// read once the step is queued. A norm that is not finite (a NaN or infinite gradient)
    /// means the update was skipped, weights and moments untouched (on a GPU the kernels see
    /// it on the device); the step still counts until the caller reads the norm and calls
    /// [`AdamW::discount_step`].
    pub fn clipped_step(
        &mut self,
        grads: &GradStore,
        lr: f64,
        mean: f64,
        clip: Option<f64>,
    ) -> Result<Tensor> {
        let dev = match self.slots.first() {
            Some(s) => s.var.device().clone(),
            None => lmkit_core::Device::Cpu,
        };
        // On a GPU, a few multi-tensor launches (adamw/multi.rs) unless LMKIT_ADAMW_MULTI=0.
        if dev.is_cuda() && std::env::var("LMKIT_ADAMW_MULTI").map_or(true, |v| v != "0") {
            if let Some(l) = lmkit_core::launch::Launcher::for_device(&dev) {
                if let Some(norm) = self.clipped_step_multi(&l, grads, lr, mean, clip)? {
                    return Ok(norm);
                }
            }
        }
        let norm = match self.grad_norm_tensor(grads)? {
            Some(n) => (n * mean)?.detach(),
            None => Tensor::new(0f32, &dev)?,
        };
        // Off the multi-tensor kernels the skip is decided here (a wait on a GPU).
        if !norm.to_scalar::<f32>()?.is_finite() {
            self.step += 1;
            return Ok(norm);
        }
        let scale = match clip {
            // min(1, c / (‖g‖ + 1e-6)); a clip of 0 or less is none (as tr_clip_scale takes it)
            Some(c) if c > 0.0 => ((norm.clone() + 1e-6)?.recip()? * c)?.minimum(1f32)?,
            _ => Tensor::new(1f32, &dev)?,
        };
        self.step_scaled(grads, lr, &(scale * mean)?)?;
        Ok(norm)
    }

    /// Takes back the count of the last step, whose update was skipped (its gradient norm,
    /// from [`AdamW::clipped_step`], was not finite): the next step uses its bias corrections.
    pub fn discount_step(&mut self) {
        self.step = self.step.saturating_sub(1);
    }

    fn update(&mut self, grads: &GradStore, lr: f64, scale: &Scale) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = self.cfg;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            // Detached: the moments must not keep a graph (of this step's gradients, through a
            // device-side clip factor) alive from step to step.
            if let Some((theta, m, v)) = cpu_update(s, g, scale, lr, &c, (bc1, bc2))? {
                s.var.set(&theta)?;
                (s.m, s.v) = (m, v);
                continue;
            }
            #[cfg(feature = "cuda")]
            if cuda_update(s, g, scale, lr, &c, (bc1, bc2))? {
                continue;
            }
            let g = match scale {
                Scale::Host(x) => (g.detach() * *x)?,
                Scale::Device(x) => g.detach().broadcast_mul(&x.detach())?,
            };
            let mut theta = s.var.as_tensor().clone();
            if s.decay && c.weight_decay != 0.0 {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            s.m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?.detach();
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
            let denom = ((&s.v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&s.m / bc1)? / denom)?;
            s.var.set(&(theta - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// The parameter's decoupled weight-decay factor `1 − lr·λ` (1 when it does not decay).
fn decay_factor(s: &Slot, c: &AdamWConfig, lr: f64) -> f32 {
    match s.decay && c.weight_decay != 0.0 {
        true => (1.0 - lr * c.weight_decay) as f32,
        false => 1.0,
    }
}

/// The same update in one pass over f32 CPU buffers (candle's op-by-op form reads and writes
/// each parameter-sized tensor about ten times): the new parameter and moments, or None when
/// the tensors are not all contiguous f32 on the CPU.
fn cpu_update(
    s: &Slot,
    g: &Tensor,
    scale: &Scale,
    lr: f64,
    c: &AdamWConfig,
    (bc1, bc2): (f64, f64),
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let p = s.var.as_tensor();
    if !p.device().is_cpu() {
        return Ok(None);
    }
    let k = match scale {
        Scale::Host(x) => *x as f32,
        Scale::Device(x) => x.to_dtype(lmkit_core::DType::F32)?.to_scalar::<f32>()?,
    };
    let decay = decay_factor(s, c, lr);
    let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
    let (bc1, bc2, eps, lr) = (bc1 as f32, bc2 as f32, c.eps as f32, lr as f32);
    let n = p.elem_count();
    if g.elem_count() != n || s.m.elem_count() != n || s.v.elem_count() != n {
        return Ok(None);
    }
    let (mut theta, mut m, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let done = with_f32(p, |p| {
        with_f32(g, |g| {
            with_f32(&s.m, |m0| {
                with_f32(&s.v, |v0| {
                    const CH: usize = 1 << 14;
                    theta
                        .par_chunks_mut(CH)
                        .zip(m.par_chunks_mut(CH))
                        .zip(v.par_chunks_mut(CH))
                        .enumerate()
                        .for_each(|(i, ((th, mo), vo))| {
                            let r = i * CH..i * CH + th.len();
                            let (p, g, m0, v0) =
                                (&p[r.clone()], &g[r.clone()], &m0[r.clone()], &v0[r]);
                            for j in 0..th.len() {
                                let gj = g[j] * k;
                                let mj = b1 * m0[j] + (1.0 - b1) * gj;
                                let vj = b2 * v0[j] + (1.0 - b2) * gj * gj;
                                let upd = (mj / bc1) / ((vj / bc2).sqrt() + eps);
                                th[j] = p[j] * decay - lr * upd;
                                (mo[j], vo[j]) = (mj, vj);
                            }
                        });
                })
            })
        })
    });
    if !matches!(done, Some(Some(Some(Some(()))))) {
        return Ok(None);
    }
    let dims = p.dims();
    let t = |x: Vec<f32>| Tensor::from_vec(x, dims, p.device());
    Ok(Some((t(theta)?, t(m)?, t(v)?)))
}

/// The same update as one CUDA kernel per parameter, in place
/// (`lmkit_core::cuda_ops::adamw_in_place`); false when it does not apply.
#[cfg(feature = "cuda")]
fn cuda_update(
    s: &Slot,
    g: &Tensor,
    scale: &Scale,
    lr: f64,
    c: &AdamWConfig,
    (bc1, bc2): (f64, f64),
) -> Result<bool> {
    use lmkit_core::cuda_ops::{adamw_in_place, AdamStep, GradScale};
    let decay = decay_factor(s, c, lr);
    let h = AdamStep {
        lr: lr as f32,
        beta1: c.beta1 as f32,
        beta2: c.beta2 as f32,
        bc1: bc1 as f32,
        bc2: bc2 as f32,
        eps: c.eps as f32,
        decay,
    };
    let k = match scale {
        Scale::Host(x) => GradScale::Host(*x as f32),
        Scale::Device(t) => GradScale::Device(t),
    };
    let g = g.contiguous()?;
    Ok(adamw_in_place(s.var.as_tensor(), &s.m, &s.v, &g, k, h)?)
}

/// A gradient multiplier: a host number or a scalar tensor on the device.
enum Scale<'a> {
    Host(f64),
    Device(&'a Tensor),
}

/// The factor that clips a gradient of norm `norm` to `max_norm` (1 when it is below).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_core::Device;

    /// Three steps against the update rule evaluated in f64: the one-pass f32 CPU update and
    /// the op-by-op one (any other dtype or device; here f64).
    #[test]
    fn matches_the_update_rule() {
        let p0 = [0.5f64, -1.0, 2.0];
        let grads = [[0.1f64, -0.2, 0.3], [0.05, 0.4, -0.1], [-0.3, 0.0, 0.2]];
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let dtypes = [lmkit_core::DType::F32, lmkit_core::DType::F64];
        for (decay, dtype) in [true, false]
            .into_iter()
            .flat_map(|d| dtypes.map(|t| (d, t)))
        {
            let p = Tensor::new(&p0.map(|x| x as f32), &Device::Cpu).unwrap();
            let var = Var::from_tensor(&p.to_dtype(dtype).unwrap()).unwrap();
            let mut opt = AdamW::new(vec![(var.clone(), decay)], cfg).unwrap();
            let (mut p, mut m, mut v) = (p0, [0f64; 3], [0f64; 3]);
            for (t, g) in grads.iter().enumerate() {
                let lr = 0.01 * (t + 1) as f64;
                // A gradient of `2·g`, scaled by 0.5 in the step: the same as `g`.
                let g2 = Tensor::new(&g.map(|x| 2.0 * x as f32), &Device::Cpu).unwrap();
                let loss = (var.as_tensor() * g2.to_dtype(dtype).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let store = loss.backward().unwrap();
                opt.step(&store, lr, 0.5).unwrap();
                let t = (t + 1) as i32;
                for i in 0..3 {
                    if decay {
                        p[i] *= 1.0 - lr * cfg.weight_decay;
                    }
                    m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
                    v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
                    let mh = m[i] / (1.0 - cfg.beta1.powi(t));
                    let vh = v[i] / (1.0 - cfg.beta2.powi(t));
                    p[i] -= lr * mh / (vh.sqrt() + cfg.eps);
                }
            }
            let got = var.as_tensor().to_dtype(lmkit_core::DType::F32).unwrap();
            for (a, b) in got.to_vec1::<f32>().unwrap().iter().zip(&p) {
                assert!(
                    (*a as f64 - b).abs() < 1e-6,
                    "{dtype:?} decay={decay}: {a} vs {b}"
                );
            }
        }
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert!((clip_scale(4.0, 1.0) - 0.25).abs() < 1e-6);
    }

    /// `clipped_step` (average, norm and clip factor on the device) updates as a host-side
    /// step with `clip_scale` does, and returns the averaged gradient's norm.
    #[test]
    fn clipped_step_matches_the_host_clip() {
        // A large eps, so that the update depends on the gradient's scale (Adam's first step
        // is otherwise the same for any positive factor).
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1.0,
            weight_decay: 0.0,
        };
        let g = [3.0f32, -4.0, 12.0]; // norm 13, summed over 2 micro-batches: mean norm 6.5
        for clip in [None, Some(1.0), Some(100.0)] {
            let vars: Vec<Var> = (0..2)
                .map(|_| Var::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap())
                .collect();
            let store = |v: &Var| {
                let gt = Tensor::new(&g, &Device::Cpu).unwrap();
                (v.as_tensor() * gt)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let mut a = AdamW::new(vec![(vars[0].clone(), true)], cfg).unwrap();
            let norm = a.clipped_step(&store(&vars[0]), 0.1, 0.5, clip).unwrap();
            let norm = norm.to_scalar::<f32>().unwrap() as f64;
            assert!((norm - 6.5).abs() < 1e-5, "{norm}");
            let mut b = AdamW::new(vec![(vars[1].clone(), true)], cfg).unwrap();
            let k = clip.map_or(1.0, |c| clip_scale(6.5, c));
            b.step(&store(&vars[1]), 0.1, k * 0.5).unwrap();
            let (x, y) = (
                vars[0].to_vec1::<f32>().unwrap(),
                vars[1].to_vec1::<f32>().unwrap(),
            );
            for (x, y) in x.iter().zip(&y) {
                assert!((x - y).abs() < 1e-6, "clip {clip:?}: {x} vs {y}");
            }
        }
    }

    /// A device-side scale computed from the gradients (clipping) must not leave a graph in the
    /// moments: it would keep every step's gradients alive (memory grew ~0.7 GB per step).
    #[test]
    fn moments_hold_no_graph() {
        let var = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![(var.clone(), true)], AdamWConfig::default()).unwrap();
        for _ in 0..2 {
            let store = var
                .as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let norm = opt.grad_norm_tensor(&store).unwrap().unwrap();
            let scale = ((norm + 1e-6).unwrap().recip().unwrap() * 0.5).unwrap();
            opt.step_scaled(&store, 1e-3, &scale).unwrap();
        }
        for (m, v) in opt.moments() {
            assert!(!m.track_op() && !v.track_op());
        }
    }
}
