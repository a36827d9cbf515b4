//! The CPU f32 training path of a dense Llama: the forward and backward passes of every block
//! on plain buffers, each gradient written once, for full training and for LoRA.
//!
//! candle's autograd runs a block's backward as dozens of tensor ops, each allocating and
//! filling a fresh tensor, and sums every gradient into a zero-filled buffer; at 48 M
//! parameters that was about half of a CPU step. Here each block keeps what its backward needs
//! (inputs of the norms and products, the attention probabilities, the MLP's pre-activations)
//! and the backward is the chain rule written out:
//!
//! ```text
//! RMSNorm  a = x̂ ⊙ w, x̂ = x·r, r = (mean(x²) + ε)^(−½)
//!          dx = r·(da⊙w − x̂·mean(x̂ ⊙ da ⊙ w)),     dw = Σ_rows da ⊙ x̂
//! linear   y = x Wᵀ (+ b) (+ LoRA, see `linear.rs`):   dW = dyᵀ x,   dx = dy W,   db = Σ_rows dy
//! RoPE     y = rot(θ)·x per pair:           dx = rot(−θ)·dy
//! attention (per head; kv heads shared by groups of query heads)
//!          S = s·q kᵀ + causal mask, P = softmax(S), y = P v
//!          dP = dy vᵀ, dS = s·P ⊙ (dP − rowsum(dP ⊙ P)), dq = dS k, dk = dSᵀ q, dv = Pᵀ dy
//! MLP      m = silu(g) ⊙ u, g = a W_gᵀ, u = a W_uᵀ, out = m W_dᵀ
//!          dg = dm ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),   du = dm ⊙ silu(g)
//! embedding  x₀ = E[ids]:   dE[idsᵢ] += dx₀ᵢ
//! ```
//!
//! Only what trains gets a gradient: under LoRA the frozen base weights get none (the input
//! gradients still flow through them to earlier adapters), and the backward stops at the
//! lowest block with anything to train.
//!
//! [`forward`] runs the blocks and the final norm and hands back the hidden states as a
//! variable; the caller's loss (the fused output layer of [`crate::head_loss`], DPO's
//! log-probs) runs through candle's autograd from there, and [`Pass::backward`] takes the
//! hidden states' gradient the rest of the way. The path applies when every weight is a dense
//! f32 CPU tensor and every trained variable is one of the model's weights or adapters;
//! anything else, and any run with `LMKIT_TRAIN_AUTOGRAD` set, takes candle's autograd. Both
//! paths are checked against PyTorch's gradients and against each other (tests).
//!
//! Deviations from the autograd path: none in the math; sums run in another order (f32
//! differences of ~1e-6 relative).

mod attention;
mod linear;
mod ops;

use std::collections::HashSet;

use lmkit_core::candle::backprop::GradStore;
use lmkit_core::candle::{TensorId, Var};
use lmkit_core::cpu::{read_f32, F32Values};
use lmkit_core::fused::rms_norm_backward;
use lmkit_core::linear::{Linear, Weight};
use lmkit_core::{DType, Device, Tensor};
use lmkit_models::{Llama, BLOCK_LINEARS as LINEARS};
use rayon::prelude::*;

use attention::{attention_backward, attention_forward};
use linear::{Adapter, Grads, Lin, LinStash};
use ops::{rms_forward, rope_rows, silu_mul};

use crate::params::Trainable;
use crate::{Error, Result};

/// Sizes of one pass: `n = b·t` rows of width `c`; `h` query and `kh` kv heads of `d`; MLP
/// width `f` (this path's and [`crate::body_gpu`]'s).
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub kh: usize,
    pub d: usize,
    pub f: usize,
    pub eps: f32,
}

impl Dims {
    pub fn hd(&self) -> usize {
        self.h * self.d
    }
    pub fn kd(&self) -> usize {
        self.kh * self.d
    }
    pub fn group(&self) -> usize {
        self.h / self.kh
    }
}

/// A parameter tensor's values, and whether it trains.
struct Param<'a> {
    t: &'a Tensor,
    v: F32Values<'a>,
    train: bool,
}

/// One block's layers.
struct Block<'a> {
    n1: Param<'a>,
    q: Lin<'a>,
    k: Lin<'a>,
    v: Lin<'a>,
    o: Lin<'a>,
    n2: Param<'a>,
    gate: Lin<'a>,
    up: Lin<'a>,
    down: Lin<'a>,
}

impl Block<'_> {
    fn trains(&self) -> bool {
        let lin = |l: &Lin| {
            l.w.train
                || l.bias.as_ref().is_some_and(|b| b.train)
                || l.lora.as_ref().is_some_and(|a| a.a.train || a.b.train)
        };
        self.n1.train
            || self.n2.train
            || [
                &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
            ]
            .into_iter()
            .any(lin)
    }
}

/// What one block's backward needs from its forward.
struct Stash {
    x: Vec<f32>,
    a1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `(b, h, t, t)` attention probabilities.
    p: Vec<f32>,
    y: Vec<f32>,
    xm: Vec<f32>,
    a2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    /// The LoRA stashes of q, k, v, o, gate, up, down.
    lin: [LinStash; 7],
}

/// Whether the trainer should use this path (see the module doc).
fn wanted(model: &Llama, trainable: &[Var]) -> bool {
    std::env::var_os("LMKIT_TRAIN_AUTOGRAD").is_none() && applies(model, trainable)
}

/// The linear layer `model.layers.{i}.{name}`.
fn layer_linear<'a>(m: &'a Llama, i: usize, name: &str) -> Option<&'a Linear> {
    m.linear(&format!("model.layers.{i}.{name}"))
}

/// Whether every weight of `model` is a dense f32 CPU tensor (adapters included) and every
/// variable of `trainable` is one of them: then this path computes every gradient the autograd
/// path would.
pub fn applies(m: &Llama, trainable: &[Var]) -> bool {
    if !m.device().is_cpu() || m.dtype() != DType::F32 {
        return false;
    }
    trains_only_known(m, trainable, &|t| read_f32(t).is_some())
}

/// Whether `m` has the layout lmkit's own backward writes out (GQA groups, biases on q/k/v
/// only and on all three, a plain dense output layer), every weight, vector and LoRA adapter
/// is a dense tensor that passes `ok`, and every variable of `trainable` (not empty) is one
/// of them. Shared by this path and [`crate::body_gpu`].
pub(crate) fn trains_only_known(
    m: &Llama,
    trainable: &[Var],
    ok: &dyn Fn(&Tensor) -> bool,
) -> bool {
    let cfg = m.config();
    if trainable.is_empty()
        || cfg.num_kv_heads == 0
        || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
    {
        return false;
    }
    let mut known: HashSet<TensorId> = HashSet::new();
    for (_, w) in m.named_weights() {
        match w {
            Weight::Dense(w) if ok(w) => known.insert(w.id()),
            _ => return false,
        };
    }
    for (_, v) in m.named_vectors() {
        if !ok(v) {
            return false;
        }
        known.insert(v.id());
    }
    for i in 0..cfg.num_layers {
        for (j, name) in LINEARS.iter().enumerate() {
            let Some(l) = layer_linear(m, i, name) else {
                return false;
            };
            // Biases only on q/k/v, and then on all three (named_vectors lists those).
            if l.bias().is_some() != (cfg.attention_bias && j < 3) {
                return false;
            }
            if let Some(a) = l.lora() {
                if !ok(&a.a) || !ok(&a.b) {
                    return false;
                }
                known.insert(a.a.id());
                known.insert(a.b.id());
            }
        }
    }
    let head = m.lm_head();
    let dense_head = matches!(head.weight(), Weight::Dense(w) if ok(w));
    if !dense_head || head.lora().is_some() || head.bias().is_some() {
        return false;
    }
    trainable
        .iter()
        .all(|v| known.contains(&v.as_tensor().id()))
}

/// The forward pass of the blocks, kept for their backward; the hidden states `(b, t, c)` are
/// a variable for the caller's loss.
pub struct Pass<'a> {
    dm: Dims,
    blocks: Vec<Block<'a>>,
    stashes: Vec<Stash>,
    embed: Param<'a>,
    final_norm: Param<'a>,
    /// The input of the final norm.
    x: Vec<f32>,
    inputs: Vec<u32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    hidden: Var,
}

/// Runs the blocks of `model` on `inputs (b, t)` with `trainable` as the variables that get
/// gradients; None when this path does not apply (then use the autograd path).
pub fn forward<'a>(
    model: &'a Llama,
    trainable: &[Var],
    inputs: &Tensor,
) -> Result<Option<Pass<'a>>> {
    if !wanted(model, trainable) {
        return Ok(None);
    }
    let m = model;
    let cfg = m.config();
    let (b, t) = inputs.dims2()?;
    if t == 0 {
        return Err(Error::Data("an empty training sequence".into()));
    }
    if t > cfg.max_position_embeddings {
        return Err(Error::Data(format!(
            "sequences of {t} tokens exceed the model's context of {}",
            cfg.max_position_embeddings
        )));
    }
    let ids: Vec<u32> = inputs.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
        return Err(Error::Data(format!(
            "token id {bad} is outside the model's vocabulary of {}",
            cfg.vocab_size
        )));
    }
    let dm = Dims {
        b,
        t,
        n: b * t,
        c: cfg.hidden_size,
        h: cfg.num_heads,
        kh: cfg.num_kv_heads,
        d: cfg.head_dim,
        f: cfg.intermediate_size,
        eps: cfg.rms_norm_eps as f32,
    };
    let train: HashSet<TensorId> = trainable.iter().map(|v| v.as_tensor().id()).collect();
    let param = |t: &'a Tensor| -> Result<Param<'a>> {
        let v = read_f32(t).ok_or_else(|| {
            Error::Data(format!("tensor {:?} is not an f32 CPU tensor", t.shape()))
        })?;
        Ok(Param {
            t,
            v,
            train: train.contains(&t.id()),
        })
    };
    let lin = |i: usize, j: usize, rows: usize| -> Result<Lin<'a>> {
        let l = layer_linear(m, i, LINEARS[j])
            .ok_or_else(|| Error::Data(format!("no layer {i}.{}", LINEARS[j])))?;
        let Weight::Dense(w) = l.weight() else {
            return Err(Error::Data(format!(
                "layer {i}.{} is not dense",
                LINEARS[j]
            )));
        };
        let lora = match l.lora() {
            Some(a) => Some(Adapter {
                a: param(&a.a)?,
                b: param(&a.b)?,
                r: a.a.dims2()?.0,
                scale: a.scale as f32,
                mask: a
                    .dropout
                    .as_ref()
                    .and_then(|d| d.mask(rows * l.in_features())),
            }),
            None => None,
        };
        Ok(Lin {
            w: param(w)?,
            out: l.out_features(),
            inp: l.in_features(),
            bias: l.bias().map(param).transpose()?,
            lora,
        })
    };
    let vectors = m.named_vectors();
    let vector = |name: &str| -> Result<Param<'a>> {
        let v = vectors
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| Error::Data(format!("no tensor {name}")))?;
        param(v.1)
    };
    let blocks: Vec<Block<'a>> = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            Ok(Block {
                n1: vector(&format!("{p}.input_layernorm.weight"))?,
                q: lin(i, 0, dm.n)?,
                k: lin(i, 1, dm.n)?,
                v: lin(i, 2, dm.n)?,
                o: lin(i, 3, dm.n)?,
                n2: vector(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: lin(i, 4, dm.n)?,
                up: lin(i, 5, dm.n)?,
                down: lin(i, 6, dm.n)?,
            })
        })
        .collect::<Result<_>>()?;
    let weights = m.named_weights();
    let embed_w: Option<&'a Weight> = weights
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .map(|(_, w)| *w);
    let Some(Weight::Dense(e)) = embed_w else {
        return Err(Error::Data("the embedding is not dense".into()));
    };
    let embed = param(e)?;
    let final_norm = vector("model.norm.weight")?;
    let (cos, sin) = m.rope_angles(0, t);

    let mut x = vec![0f32; dm.n * dm.c];
    x.par_chunks_mut(dm.c)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            row.copy_from_slice(&embed.v[id as usize * dm.c..][..dm.c]);
        });
    let mut stashes = Vec::with_capacity(blocks.len());
    for w in &blocks {
        let (s, out) = layer_forward(&dm, w, x, &cos, &sin)?;
        stashes.push(s);
        x = out;
    }
    let hidden = rms_forward(&x, &final_norm.v, dm.c, dm.eps);
    let hidden = Var::from_vec(hidden, (b, t, dm.c), &Device::Cpu)?;
    Ok(Some(Pass {
        dm,
        blocks,
        stashes,
        embed,
        final_norm,
        x,
        inputs: ids,
        cos,
        sin,
        hidden,
    }))
}

impl<'a> Pass<'a> {
    /// The final hidden states `(b, t, c)` (after the last norm), a variable.
    pub fn hidden(&self) -> &Tensor {
        self.hidden.as_tensor()
    }

    /// Takes `dh`, the gradient of [`Pass::hidden`], back through the blocks and adds the
    /// gradient of every trained variable into `grads`.
    pub fn backward(self, dh: &Tensor, grads: &mut GradStore) -> Result<()> {
        let Pass {
            dm,
            blocks,
            stashes,
            embed,
            final_norm,
            x,
            inputs,
            cos,
            sin,
            ..
        } = self;
        let dh: Vec<f32> = dh.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if dh.len() != dm.n * dm.c {
            return Err(Error::Data(format!(
                "the hidden states' gradient has {} values, expected {}",
                dh.len(),
                dm.n * dm.c
            )));
        }
        let mut out: Grads<'a> = Vec::new();
        // How far down the backward must go: to the embedding, or the lowest block that trains.
        let stop = match embed.train {
            true => 0,
            false => match blocks.iter().position(Block::trains) {
                Some(i) => i,
                None => blocks.len(),
            },
        };
        let mut dx = vec![0f32; dm.n * dm.c];
        let d_norm = rms_norm_backward(&x, &final_norm.v, &dh, dm.eps, &mut dx, true);
        if final_norm.train {
            out.push((final_norm.t, d_norm));
        }
        drop((x, dh));
        for (i, (w, s)) in blocks.iter().zip(stashes).enumerate().rev() {
            if i < stop {
                break;
            }
            dx = layer_backward(&dm, w, s, dx, &cos, &sin, &mut out)?;
        }
        if embed.train {
            let mut de = vec![0f32; embed.v.len()];
            for (row, &id) in dx.chunks(dm.c).zip(&inputs) {
                for (a, g) in de[id as usize * dm.c..][..dm.c].iter_mut().zip(row) {
                    *a += g;
                }
            }
            out.push((embed.t, de));
        }
        drop(blocks);
        drop(embed);
        drop(final_norm);
        for (t, g) in out {
            let mut g = Tensor::from_vec(g, t.shape().clone(), &Device::Cpu)?;
            // The tied embedding also has the output layer's gradient.
            if let Some(prev) = grads.remove(t) {
                g = (g + prev)?;
            }
            grads.insert(t, g);
        }
        Ok(())
    }
}

/// The mean loss of `ids (b, t + 1)` (targets weighted by `mask (b, t)` as
/// [`crate::trainer::loss_masked`] does) and the gradient of every parameter of `t`; None when
/// this path does not apply to `t` (then use the autograd path).
pub fn loss_and_grads(
    t: &Trainable,
    ids: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<(Tensor, GradStore)>> {
    loss_and_grads_scaled(t, ids, mask, 1.0)
}

/// [`loss_and_grads`] with the loss and its gradients times `scale` (loss scaling).
pub fn loss_and_grads_scaled(
    t: &Trainable,
    ids: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<(Tensor, GradStore)>> {
    let tl = input_len(ids)?;
    let vars: Vec<Var> = t.params.iter().map(|(_, v)| v.clone()).collect();
    let Some(pass) = forward(&t.model, &vars, &ids.narrow(1, 0, tl)?)? else {
        return Ok(None);
    };
    let (loss, mut grads, dh) =
        head_loss(t, &vars, ids, mask, pass.hidden(), scale, &mut |_| Ok(()))?;
    pass.backward(&dh, &mut grads)?;
    Ok(Some((loss, grads)))
}

/// The length of the inputs of training sequences `ids (b, t + 1)`: `t`, at least 1.
pub(crate) fn input_len(ids: &Tensor) -> Result<usize> {
    let (_, t1) = ids.dims2()?;
    if t1 < 2 {
        return Err(Error::Data(format!(
            "a training sequence needs at least 2 tokens, got {t1}"
        )));
    }
    Ok(t1 - 1)
}

/// The output layer and loss of lmkit's own backward (this path's and [`crate::body_gpu`]'s):
/// the mean cross-entropy of the targets `ids[:, 1:]` (weighted by `mask` as
/// [`crate::trainer::loss_masked`] does) from the blocks' final hidden states `hidden (b, t,
/// c)`, through candle's autograd (the output layer gets a gradient when it is one of `vars`);
/// returns the loss, the gradient store and the hidden states' gradient taken out of it, all
/// times `scale` (loss scaling). `lap("forward")` is called between the two passes.
pub(crate) fn head_loss(
    t: &Trainable,
    vars: &[Var],
    ids: &Tensor,
    mask: Option<&Tensor>,
    hidden: &Tensor,
    scale: f64,
    lap: &mut dyn FnMut(&'static str) -> Result<()>,
) -> Result<(Tensor, GradStore, Tensor)> {
    let (b, tl, c) = hidden.dims3()?;
    let head = crate::head_loss::dense_head(&t.model)
        .ok_or_else(|| Error::Data("the output layer is not a plain dense layer".into()))?;
    // A frozen output layer gets no gradient (and its weight-gradient product is skipped).
    let head = match vars.iter().any(|v| v.as_tensor().id() == head.id()) {
        true => head.clone(),
        false => head.detach(),
    };
    // Targets and weights go where the loss reads them: the CPU head reads host buffers.
    let here = |x: Tensor| -> Result<Tensor> {
        match hidden.device().is_cpu() {
            true => Ok(x.to_device(&Device::Cpu)?),
            false => Ok(x),
        }
    };
    let targets = here(ids.narrow(1, 1, tl)?.flatten_all()?)?;
    let weights = match mask {
        Some(mk) => Some(here(mk.flatten_all()?)?),
        None => None,
    };
    let h = hidden.reshape((b * tl, c))?;
    let loss =
        crate::head_loss::output_cross_entropy(&h, &head, &targets, weights.as_ref(), scale)?;
    lap("forward")?;
    let mut grads = loss.backward()?;
    let dh = grads
        .remove(hidden)
        .ok_or_else(|| Error::Data("the output layer gave no gradient".into()))?;
    Ok((loss, grads, dh))
}

fn layer_forward(
    dm: &Dims,
    w: &Block,
    x: Vec<f32>,
    cos: &[f32],
    sin: &[f32],
) -> Result<(Stash, Vec<f32>)> {
    let (n, c) = (dm.n, dm.c);
    let a1 = rms_forward(&x, &w.n1.v, c, dm.eps);
    let (mut q, sq) = w.q.forward(&a1, n)?;
    let (mut k, sk) = w.k.forward(&a1, n)?;
    let (v, sv) = w.v.forward(&a1, n)?;
    rope_rows(&mut q, dm.hd(), dm.d, dm.t, cos, sin, false);
    rope_rows(&mut k, dm.kd(), dm.d, dm.t, cos, sin, false);
    let (p, y) = attention_forward(dm, &q, &k, &v)?;
    let (mut xm, so) = w.o.forward(&y, n)?;
    xm.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(a, b)| *a += b);
    let a2 = rms_forward(&xm, &w.n2.v, c, dm.eps);
    let (g, sg) = w.gate.forward(&a2, n)?;
    let (u, su) = w.up.forward(&a2, n)?;
    let mut mid = g.clone();
    silu_mul(&mut mid, &u);
    let (mut out, sd) = w.down.forward(&mid, n)?;
    out.par_iter_mut()
        .zip(xm.par_iter())
        .for_each(|(a, b)| *a += b);
    let stash = Stash {
        x,
        a1,
        q,
        k,
        v,
        p,
        y,
        xm,
        a2,
        g,
        u,
        lin: [sq, sk, sv, so, sg, su, sd],
    };
    Ok((stash, out))
}

/// One block's backward: `dout` is the gradient of its output; returns that of its input and
/// pushes the gradients of what trains into `out`.
fn layer_backward<'a>(
    dm: &Dims,
    w: &Block<'a>,
    s: Stash,
    dout: Vec<f32>,
    cos: &[f32],
    sin: &[f32],
    out: &mut Grads<'a>,
) -> Result<Vec<f32>> {
    let (n, c, f) = (dm.n, dm.c, dm.f);
    let [sq, sk, sv, so, sg, su, sd] = s.lin;
    // MLP: out = xm + m W_dᵀ.
    let mut mid = s.g.clone();
    silu_mul(&mut mid, &s.u);
    let mut dg = vec![0f32; n * f];
    w.down.backward(&dout, &mid, sd, &mut dg, false, out)?;
    drop(mid);
    let mut du = vec![0f32; n * f];
    (dg.par_chunks_mut(f), du.par_chunks_mut(f))
        .into_par_iter()
        .zip((s.g.par_chunks(f), s.u.par_chunks(f)))
        .for_each(|((dg, du), (g, u))| {
            for i in 0..g.len() {
                let sg = 1.0 / (1.0 + (-g[i]).exp());
                let dmid = dg[i];
                du[i] = dmid * g[i] * sg;
                dg[i] = dmid * u[i] * sg * (1.0 + g[i] * (1.0 - sg));
            }
        });
    let mut da2 = vec![0f32; n * c];
    w.gate.backward(&dg, &s.a2, sg, &mut da2, false, out)?;
    w.up.backward(&du, &s.a2, su, &mut da2, true, out)?;
    drop((dg, du));
    let mut dxm = dout;
    let d_n2 = rms_norm_backward(&s.xm, &w.n2.v, &da2, dm.eps, &mut dxm, true);
    if w.n2.train {
        out.push((w.n2.t, d_n2));
    }
    drop(da2);

    // Attention: xm = x + y W_oᵀ.
    let mut dy = vec![0f32; n * dm.hd()];
    w.o.backward(&dxm, &s.y, so, &mut dy, false, out)?;
    let (mut dq, mut dk, dv) = attention_backward(dm, &s.q, &s.k, &s.v, &s.p, &dy)?;
    drop(dy);
    rope_rows(&mut dq, dm.hd(), dm.d, dm.t, cos, sin, true);
    rope_rows(&mut dk, dm.kd(), dm.d, dm.t, cos, sin, true);
    let mut da1 = vec![0f32; n * c];
    w.q.backward(&dq, &s.a1, sq, &mut da1, false, out)?;
    w.k.backward(&dk, &s.a1, sk, &mut da1, true, out)?;
    w.v.backward(&dv, &s.a1, sv, &mut da1, true, out)?;
    let mut dx = dxm;
    let d_n1 = rms_norm_backward(&s.x, &w.n1.v, &da1, dm.eps, &mut dx, true);
    if w.n1.train {
        out.push((w.n1.t, d_n1));
    }
    Ok(dx)
}
