//! One linear layer of a block on plain buffers: a weight that trains or stays frozen, an
//! optional bias, and an optional LoRA adapter (Hu et al., arXiv 2106.09685, as
//! `lmkit_core::lora` runs it):
//!
//! ```text
//! y  = x Wᵀ + b + s · (x̃ Aᵀ) Bᵀ,   x̃ = x ⊙ k (dropout's mask, or x),   hs = s · x̃ Aᵀ  (n, r)
//! dW = dyᵀ x    db = Σ_rows dy    dB = dyᵀ hs    g = s · dy B  (n, r)    dA = gᵀ x̃
//! dx = dy W + (g A) ⊙ k
//! ```

use lmkit_core::sgemm::{sgemm, View};
use lmkit_core::Tensor;
use rayon::prelude::*;

use super::ops::{add_rows, column_sums, weight_grad};
use super::Param;
use crate::Result;

/// A LoRA adapter's values: `A (r, in)`, `B (out, r)`, `s = α / r`, and this pass's dropout
/// mask over the input `(n, in)`.
pub(super) struct Adapter<'a> {
    pub a: Param<'a>,
    pub b: Param<'a>,
    pub r: usize,
    pub scale: f32,
    pub mask: Option<Vec<f32>>,
}

/// A linear layer `(out, in)`.
pub(super) struct Lin<'a> {
    pub w: Param<'a>,
    pub out: usize,
    pub inp: usize,
    pub bias: Option<Param<'a>>,
    pub lora: Option<Adapter<'a>>,
}

/// What the backward needs from the adapter's forward: `hs = s · x̃ Aᵀ (n, r)` and, under
/// dropout, `x̃ (n, in)`.
pub(super) struct LinStash {
    /// Rows of the input.
    n: usize,
    hs: Vec<f32>,
    dropped: Option<Vec<f32>>,
}

/// Gradients by parameter tensor.
pub(super) type Grads<'a> = Vec<(&'a Tensor, Vec<f32>)>;

impl<'a> Lin<'a> {
    /// `y (n, out)` of `x (n, in)`.
    pub fn forward(&self, x: &[f32], n: usize) -> Result<(Vec<f32>, LinStash)> {
        let mut y = vec![0f32; n * self.out];
        sgemm(
            &mut y,
            View::rows(x, n, self.inp),
            View::rows(&self.w.v, self.out, self.inp).t(),
            false,
        )?;
        if let Some(b) = &self.bias {
            add_rows(&mut y, &b.v);
        }
        let Some(l) = &self.lora else {
            let s = LinStash {
                n,
                hs: Vec::new(),
                dropped: None,
            };
            return Ok((y, s));
        };
        let dropped = l.mask.as_ref().map(|k| {
            let mut xd = x.to_vec();
            xd.par_iter_mut()
                .zip(k.par_iter())
                .for_each(|(a, m)| *a *= m);
            xd
        });
        let xin = dropped.as_deref().unwrap_or(x);
        let mut hs = vec![0f32; n * l.r];
        sgemm(
            &mut hs,
            View::rows(xin, n, self.inp),
            View::rows(&l.a.v, l.r, self.inp).t(),
            false,
        )?;
        hs.iter_mut().for_each(|h| *h *= l.scale);
        sgemm(
            &mut y,
            View::rows(&hs, n, l.r),
            View::rows(&l.b.v, self.out, l.r).t(),
            true,
        )?;
        Ok((y, LinStash { n, hs, dropped }))
    }

    /// Given `dy (n, out)` and the forward's input `x (n, in)`: adds `∂x` into `dx (n, in)`
    /// (or writes it, without `accumulate`) and pushes the gradients of what trains.
    pub fn backward(
        &self,
        dy: &[f32],
        x: &[f32],
        s: LinStash,
        dx: &mut [f32],
        accumulate: bool,
        grads: &mut Grads<'a>,
    ) -> Result<()> {
        let (n, out, inp) = (s.n, self.out, self.inp);
        if self.w.train {
            grads.push((self.w.t, weight_grad(dy, x, n, out, inp)?));
        }
        if let Some(b) = self.bias.as_ref().filter(|b| b.train) {
            grads.push((b.t, column_sums(dy, out)));
        }
        sgemm(
            dx,
            View::rows(dy, n, out),
            View::rows(&self.w.v, out, inp),
            accumulate,
        )?;
        let Some(l) = &self.lora else {
            return Ok(());
        };
        let r = l.r;
        if l.b.train {
            grads.push((l.b.t, weight_grad(dy, &s.hs, n, out, r)?));
        }
        let mut g = vec![0f32; n * r];
        sgemm(
            &mut g,
            View::rows(dy, n, out),
            View::rows(&l.b.v, out, r),
            false,
        )?;
        g.iter_mut().for_each(|v| *v *= l.scale);
        if l.a.train {
            let xin = s.dropped.as_deref().unwrap_or(x);
            grads.push((l.a.t, weight_grad(&g, xin, n, r, inp)?));
        }
        match &l.mask {
            None => sgemm(dx, View::rows(&g, n, r), View::rows(&l.a.v, r, inp), true)?,
            Some(k) => {
                let mut dxl = vec![0f32; n * inp];
                sgemm(
                    &mut dxl,
                    View::rows(&g, n, r),
                    View::rows(&l.a.v, r, inp),
                    false,
                )?;
                dx.par_iter_mut()
                    .zip(dxl.par_iter().zip(k.par_iter()))
                    .for_each(|(d, (v, m))| *d += v * m);
            }
        }
        Ok(())
    }
}
