//! Gradient accumulation over micro-batches: each variable's gradients summed on the device.
//! On a GPU, eight tensors per launch of `train.cu`'s `tr_sum_x8` (the first sum into a fresh
//! accumulator, later ones in place), where a tensor add per variable and micro-batch took one
//! launch and one allocation each (~110 per micro-batch for a 12-layer model).

use std::collections::HashSet;

use lmkit_core::candle::backprop::GradStore;
use lmkit_core::candle::TensorId;
use lmkit_core::launch::{Arg, Launcher};
use lmkit_core::{DType, Tensor};

use lmkit_core::candle::Var;

use crate::Result;

/// The variables whose gradients are summed (a [`crate::Trainable`]'s `params`).
type Params = [(String, Var)];

/// Sums of gradients across micro-batches.
#[derive(Default)]
pub struct GradSum {
    acc: Option<GradStore>,
    /// Accumulators this sum allocated (safe to add into in place); the first micro-batch's
    /// gradients are not (a store may share a tensor between entries).
    owned: HashSet<TensorId>,
}

impl GradSum {
    /// Adds a micro-batch's gradients of the variables `t`.
    pub fn add(&mut self, more: GradStore, t: &Params) -> Result<()> {
        let Some(acc) = self.acc.as_mut() else {
            self.acc = Some(more);
            return Ok(());
        };
        let dev = match t.first() {
            Some((_, v)) => v.device().clone(),
            None => return Ok(()),
        };
        if dev.is_cuda() {
            if let Some(l) = Launcher::for_device(&dev) {
                if add_multi(&l, acc, &more, t, &mut self.owned)? {
                    return Ok(());
                }
            }
        }
        add_plain(acc, more, t)
    }

    /// The summed gradients (None when nothing was added).
    pub fn into_inner(self) -> Option<GradStore> {
        self.acc
    }
}

/// Adds `more` into `acc` for every variable, a tensor op each.
fn add_plain(acc: &mut GradStore, more: GradStore, t: &Params) -> Result<()> {
    for (_, var) in t {
        if let Some(g) = more.get(var.as_tensor()) {
            let sum = match acc.get(var.as_tensor()) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(var.as_tensor(), sum);
        }
    }
    Ok(())
}

/// [`add_plain`] through `tr_sum_x8` on `launcher`; false, with nothing changed, when some pair
/// of gradients is not two contiguous f32 tensors of one size.
pub fn add_multi(
    launcher: &Launcher,
    acc: &mut GradStore,
    more: &GradStore,
    t: &Params,
    owned: &mut HashSet<TensorId>,
) -> Result<bool> {
    let mut pairs: Vec<(Tensor, Tensor, Tensor)> = Vec::new(); // (variable, accumulator, new)
    let mut fresh: Vec<(Tensor, Tensor)> = Vec::new();
    for (_, var) in t {
        let v = var.as_tensor();
        let Some(g) = more.get(v) else { continue };
        match acc.get(v) {
            None => fresh.push((v.clone(), g.clone())),
            Some(a) => {
                let ok = |x: &Tensor| {
                    x.dtype() == DType::F32 && x.is_contiguous() && x.elem_count() == v.elem_count()
                };
                if !ok(a) || !ok(g) || i32::try_from(a.elem_count()).is_err() {
                    return Ok(false);
                }
                pairs.push((v.clone(), a.clone(), g.clone()));
            }
        }
    }
    let mut outs = Vec::with_capacity(pairs.len());
    for (_, a, _) in &pairs {
        outs.push(match owned.contains(&a.id()) {
            true => a.clone(),
            false => {
                // SAFETY: tr_sum_x8 writes every element before anything reads it.
                let o = unsafe { Tensor::empty(a.shape(), DType::F32, a.device()) }?;
                owned.insert(o.id());
                o
            }
        });
    }
    let slots = pairs
        .iter()
        .zip(&outs)
        .map(|((_, a, g), o)| {
            let n = a.elem_count();
            let args = vec![
                Arg::Ptr(launcher.ptr(o)?),
                Arg::Ptr(launcher.ptr(a)?),
                Arg::Ptr(launcher.ptr(g)?),
                Arg::int(n, "gradient size")?,
            ];
            Ok((args, n))
        })
        .collect::<Result<Vec<_>>>()?;
    if !slots.is_empty() {
        let empty = [Arg::Ptr(0), Arg::Ptr(0), Arg::Ptr(0), Arg::I32(0)];
        launcher.launch_x8(
            "tr_sum_x8",
            256,
            &slots,
            &empty,
            &mut |_| Ok(Vec::new()),
            &|n| n.div_ceil(256).clamp(1, 2048) as u32,
        )?;
    }
    for ((v, _, _), o) in pairs.iter().zip(outs) {
        acc.insert(v, o);
    }
    for (v, g) in fresh {
        acc.insert(&v, g);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_core::candle::Var;
    use lmkit_core::Device;

    /// A trainable stand-in: `n` variables of various sizes (two launches of eight).
    fn vars(n: usize) -> Vec<Var> {
        (0..n)
            .map(|i| Var::from_vec(vec![0.5f32; 3 + 97 * i], 3 + 97 * i, &Device::Cpu).unwrap())
            .collect()
    }

    /// Gradients of `Σᵢ wᵢ·xᵢ` with weights that depend on the micro-batch; none for variable 2
    /// in micro-batch 0 (its first gradient comes later).
    fn grads(v: &[Var], micro: usize) -> GradStore {
        let mut loss: Option<Tensor> = None;
        for (i, x) in v.iter().enumerate() {
            if i == 2 && micro == 0 {
                continue;
            }
            let n = x.elem_count();
            let w: Vec<f32> = (0..n)
                .map(|j| ((i * 7 + j + micro * 3) % 13) as f32 - 6.0)
                .collect();
            let l = (x.as_tensor() * Tensor::from_vec(w, n, &Device::Cpu).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            loss = Some(match loss {
                None => l,
                Some(s) => (s + l).unwrap(),
            });
        }
        loss.unwrap().backward().unwrap()
    }

    /// Three micro-batches through `tr_sum_x8` on the emulator give the plain sums, and the
    /// first micro-batch's gradients are left as they were (the first sum is out of place).
    #[test]
    fn sums_match_tensor_adds() {
        let v = vars(11);
        let t: Vec<(String, Var)> = v
            .iter()
            .enumerate()
            .map(|(i, x)| (format!("v{i}"), x.clone()))
            .collect();
        let mut acc = grads(&v, 0);
        let orig: Vec<(Tensor, Vec<f32>)> = v
            .iter()
            .filter_map(|x| acc.get(x.as_tensor()).cloned())
            .map(|g| {
                let vals = g.to_vec1::<f32>().unwrap();
                (g, vals)
            })
            .collect();
        let (mut plain, mut owned) = (grads(&v, 0), HashSet::new());
        for m in 1..3 {
            assert!(add_multi(&Launcher::Emu, &mut acc, &grads(&v, m), &t, &mut owned).unwrap());
            add_plain(&mut plain, grads(&v, m), &t).unwrap();
        }
        for (i, x) in v.iter().enumerate() {
            let a = acc
                .get(x.as_tensor())
                .expect("a sum")
                .to_vec1::<f32>()
                .unwrap();
            let b = plain
                .get(x.as_tensor())
                .expect("a sum")
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(a, b, "variable {i}");
        }
        for (g, vals) in orig {
            assert_eq!(g.to_vec1::<f32>().unwrap(), vals);
        }
    }
}
