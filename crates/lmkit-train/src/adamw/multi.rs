//! AdamW's step with the global gradient norm and clipping in a few launches of `train.cu`'s
//! multi-tensor kernels (`tr_sumsq_x8`, `tr_clip_scale`, `tr_adamw_x8`, eight tensors per
//! launch), as PyTorch's foreach/fused AdamW does on a GPU. Tensor ops take five launches per
//! variable for the norm and one for the update (each with its host-side work and allocation):
//! ~660 launches per step for the ~110 weight tensors of a 12-layer model, where this takes ~32.
//! The same arithmetic as [`super::AdamW::clipped_step`]'s other paths; the norm's partial sums
//! are added in a fixed order, so a run gives the same bits every time.

use lmkit_core::candle::backprop::GradStore;
use lmkit_core::launch::{Arg, Launcher};
use lmkit_core::{DType, Tensor};

use super::{decay_factor, AdamW};
use crate::Result;

/// Tensors per launch (the kernels' slots; `Launcher::launch_x8`).
const MT: usize = 8;
/// Blocks of each norm launch: each writes one partial sum.
const NORM_BLOCKS: usize = 256;
const THREADS: u32 = 256;
/// Most blocks of an update launch (grid-stride loops).
const MAX_BLOCKS: usize = 2048;

impl AdamW {
    /// [`AdamW::clipped_step`] through the multi-tensor kernels on `launcher` (a GPU's, or the
    /// emulator's on CPU tensors in tests). None, with nothing done and the step not counted,
    /// when a variable with a gradient is not a contiguous f32 tensor with f32 moments and an
    /// f32 gradient of its size, or the kernels are missing.
    pub fn clipped_step_multi(
        &mut self,
        launcher: &Launcher,
        grads: &GradStore,
        lr: f64,
        mean: f64,
        clip: Option<f64>,
    ) -> Result<Option<Tensor>> {
        let Some(dev) = self.slots.first().map(|s| s.var.device().clone()) else {
            return Ok(None);
        };
        if !["tr_sumsq_x8", "tr_clip_scale", "tr_adamw_x8"]
            .iter()
            .all(|k| launcher.has_kernel(k))
        {
            return Ok(None);
        }
        // The variables with a gradient, and their gradients as contiguous tensors (alive until
        // the launches are queued).
        let mut items: Vec<(usize, Tensor)> = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let p = s.var.as_tensor();
            let n = p.elem_count();
            let fits = |t: &Tensor| t.dtype() == DType::F32 && t.elem_count() == n;
            let contiguous = p.is_contiguous() && s.m.is_contiguous() && s.v.is_contiguous();
            if !(fits(p) && fits(&s.m) && fits(&s.v) && fits(g) && contiguous)
                || i32::try_from(n).is_err()
                || !g.device().same_device(&dev)
            {
                return Ok(None);
            }
            items.push((i, g.contiguous()?));
        }
        // 1. Σ g² per block, one launch per eight gradients (at least one, so that a step
        // without gradients still writes a zero norm).
        let launches = items.len().div_ceil(MT).max(1);
        let part = Tensor::zeros(launches * NORM_BLOCKS, DType::F32, &dev)?;
        let out = Tensor::zeros(2, DType::F32, &dev)?;
        let (part_at, out_at) = (launcher.ptr(&part)?, launcher.ptr(&out)?);
        // A thread per four values (the kernels' groups).
        let grid = |most: usize| most.div_ceil(4 * THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
        let sq = items
            .iter()
            .map(|(_, g)| {
                let n = g.elem_count();
                Ok((
                    vec![Arg::Ptr(launcher.ptr(g)?), Arg::int(n, "gradient size")?],
                    n,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        launcher.launch_x8(
            "tr_sumsq_x8",
            THREADS,
            &sq,
            &[Arg::Ptr(0), Arg::I32(0)],
            &mut |l| Ok(vec![Arg::Ptr(part_at + (l * NORM_BLOCKS * 4) as u64)]),
            &|_| NORM_BLOCKS as u32,
        )?;
        // 2. The norm of the averaged gradient and the factor applied to the summed one.
        launcher.launch(
            "tr_clip_scale",
            (1, 1),
            THREADS,
            &[
                Arg::Ptr(part_at),
                Arg::int(launches * NORM_BLOCKS, "partial sums")?,
                Arg::F32(mean as f32),
                Arg::F32(clip.map_or(-1.0, |c| c as f32)),
                Arg::Ptr(out_at),
            ],
        )?;
        // 3. The update, in place.
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let mut upd = Vec::with_capacity(items.len());
        for (i, g) in &items {
            let s = &self.slots[*i];
            let n = g.elem_count();
            let args = vec![
                Arg::Ptr(launcher.ptr(s.var.as_tensor())?),
                Arg::Ptr(launcher.ptr(&s.m)?),
                Arg::Ptr(launcher.ptr(&s.v)?),
                Arg::Ptr(launcher.ptr(g)?),
                Arg::int(n, "parameter size")?,
                Arg::F32(decay_factor(s, &c, lr)),
            ];
            upd.push((args, n));
        }
        let head = [
            Arg::Ptr(out_at + 4),
            Arg::F32(lr as f32),
            Arg::F32(c.beta1 as f32),
            Arg::F32(c.beta2 as f32),
            Arg::F32(bc1 as f32),
            Arg::F32(bc2 as f32),
            Arg::F32(c.eps as f32),
        ];
        let empty = [
            Arg::Ptr(0),
            Arg::Ptr(0),
            Arg::Ptr(0),
            Arg::Ptr(0),
            Arg::I32(0),
            Arg::F32(1.0),
        ];
        launcher.launch_x8(
            "tr_adamw_x8",
            THREADS,
            &upd,
            &empty,
            &mut |_| Ok(head.to_vec()),
            &grid,
        )?;
        Ok(Some(out.narrow(0, 0, 1)?.squeeze(0)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adamw::AdamWConfig;
    use lmkit_core::candle::Var;
    use lmkit_core::Device;

    // The last one reaches the last block of its norm launch (256 blocks of 256 threads, four
    // values each); odd sizes end in a partial group of four.
    const SIZES: [usize; 11] = [1, 7, 300, 1000, 33, 2, 513, 64, 5, 129, 263_001];
    /// The variable that gets no gradient.
    const IDLE: usize = 3;

    fn vars() -> Vec<Var> {
        SIZES
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let v: Vec<f32> = (0..n)
                    .map(|j| ((i * 31 + j * 7) % 17) as f32 / 17.0 - 0.5)
                    .collect();
                Var::from_vec(v, n, &Device::Cpu).unwrap()
            })
            .collect()
    }

    /// Every variable's values, then every moment's (m, v), in order.
    fn state(o: &AdamW, vars: &[Var]) -> Vec<Vec<f32>> {
        let mut out: Vec<Vec<f32>> = vars.iter().map(|x| x.to_vec1::<f32>().unwrap()).collect();
        for (m, s) in o.moments() {
            out.push(m.to_vec1::<f32>().unwrap());
            out.push(s.to_vec1::<f32>().unwrap());
        }
        out
    }

    /// Gradients of `Σᵢ wᵢ · xᵢ` with weights that change with the step; none for `IDLE`.
    fn grads(vars: &[Var], step: usize) -> GradStore {
        let mut loss: Option<Tensor> = None;
        for (i, v) in vars.iter().enumerate().filter(|(i, _)| *i != IDLE) {
            let w: Vec<f32> = (0..SIZES[i])
                .map(|j| (((i + step * 5) * 13 + j * 3) % 11) as f32 - 5.0)
                .collect();
            let w = Tensor::from_vec(w, SIZES[i], &Device::Cpu).unwrap();
            let l = (v.as_tensor() * w).unwrap().sum_all().unwrap();
            loss = Some(match loss {
                None => l,
                Some(s) => (s + l).unwrap(),
            });
        }
        loss.unwrap().backward().unwrap()
    }

    /// Eleven variables (two launches of eight), one without a gradient, sizes that are no
    /// multiple of a block, weight decay on every other one: the multi-tensor kernels (on the
    /// emulator) step as the CPU path does, three steps, with and without clipping.
    #[test]
    fn matches_the_cpu_step() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        for clip in [None, Some(0.5)] {
            let (a, b) = (vars(), vars());
            let opt = |v: &[Var]| {
                let p = v.iter().enumerate().map(|(i, v)| (v.clone(), i % 2 == 0));
                AdamW::new(p.collect(), cfg).unwrap()
            };
            let (mut oa, mut ob) = (opt(&a), opt(&b));
            for step in 0..3 {
                let lr = 0.01 * (step + 1) as f64;
                let na = oa.clipped_step(&grads(&a, step), lr, 0.5, clip).unwrap();
                let nb = ob
                    .clipped_step_multi(&Launcher::Emu, &grads(&b, step), lr, 0.5, clip)
                    .unwrap()
                    .expect("the multi-tensor step applies");
                let (na, nb) = (
                    na.to_scalar::<f32>().unwrap(),
                    nb.to_scalar::<f32>().unwrap(),
                );
                assert!(
                    (na - nb).abs() <= 1e-5 * na,
                    "{clip:?} step {step}: {na} vs {nb}"
                );
                for (k, (x, y)) in state(&oa, &a).iter().zip(&state(&ob, &b)).enumerate() {
                    for (x, y) in x.iter().zip(y) {
                        assert!(
                            (x - y).abs() <= 1e-6 + 1e-5 * x.abs(),
                            "{clip:?} step {step}, tensor {k}: {x} vs {y}"
                        );
                    }
                }
            }
            assert_eq!(oa.steps(), ob.steps());
            assert_eq!(
                b[IDLE].to_vec1::<f32>().unwrap(),
                vars()[IDLE].to_vec1::<f32>().unwrap()
            );
        }
    }

    /// A NaN or infinite gradient anywhere: the update is skipped by both paths (weights and
    /// moments as they were, after a first real step), the norm says so, and the step counts
    /// until it is discounted.
    #[test]
    fn a_gradient_that_is_not_finite_skips_the_step() {
        let cfg = AdamWConfig::default();
        for bad in [f32::NAN, f32::INFINITY] {
            for multi in [false, true] {
                let v = vars();
                let p = v.iter().map(|x| (x.clone(), true));
                let mut o = AdamW::new(p.collect(), cfg).unwrap();
                let step = |o: &mut AdamW, g: &GradStore| match multi {
                    true => o
                        .clipped_step_multi(&Launcher::Emu, g, 0.01, 0.5, Some(1.0))
                        .unwrap()
                        .expect("the multi-tensor step applies"),
                    false => o.clipped_step(g, 0.01, 0.5, Some(1.0)).unwrap(),
                };
                step(&mut o, &grads(&v, 0));
                let before = state(&o, &v);
                // One entry of the last (largest) gradient made bad.
                let mut g = grads(&v, 1);
                let last = v[SIZES.len() - 1].as_tensor();
                let mut w = g.get(last).unwrap().to_vec1::<f32>().unwrap();
                w[4321] = bad;
                g.insert(last, Tensor::new(w, &Device::Cpu).unwrap());
                let norm = step(&mut o, &g).to_scalar::<f32>().unwrap();
                assert!(!norm.is_finite(), "{bad} multi {multi}: norm {norm}");
                assert_eq!(o.steps(), 2);
                o.discount_step();
                assert_eq!(o.steps(), 1);
                let after = state(&o, &v);
                assert_eq!(before, after, "{bad} multi {multi}");
            }
        }
    }

    /// What the kernels do not take is left to the other paths: nothing done, no step counted.
    #[test]
    fn refuses_other_dtypes() {
        let v = Var::from_vec(vec![1f64, 2.0], 2, &Device::Cpu).unwrap();
        let mut o = AdamW::new(vec![(v.clone(), true)], AdamWConfig::default()).unwrap();
        let g = v.as_tensor().sum_all().unwrap().backward().unwrap();
        let r = o
            .clipped_step_multi(&Launcher::Emu, &g, 0.1, 1.0, None)
            .unwrap();
        assert!(r.is_none() && o.steps() == 0);
        assert_eq!(v.to_vec1::<f64>().unwrap(), [1.0, 2.0]);
    }
}
