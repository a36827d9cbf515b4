//! The GPU training path of a dense Llama: the forward and backward passes of every block
//! written out on device tensors, each gradient written once, in the compute dtype (bf16 under
//! mixed precision) with f32 master weights and an f32 residual stream.
//!
//! candle's autograd runs a block's backward as dozens of tensor ops and sums every gradient
//! into a zero-filled buffer (on an H100 its `badd` was the largest kernel of a step); here the
//! step is cuBLAS products (candle's `matmul`) with lmkit's fused kernels between them
//! (`cuda/train.cu`: norms, RoPE with the head layout, SiLU, residual adds; and the causal
//! softmax of `lmkit_core::attn_softmax`). The math is [`crate::body_cpu`]'s:
//!
//! ```text
//! RMSNorm  a = x̂ ⊙ w, x̂ = x·r, r = (mean(x²) + ε)^(−½)
//!          dx = r·(da⊙w − x̂·mean(x̂ ⊙ da ⊙ w)),     dw = Σ_rows da ⊙ x̂
//! q|k|v    one product with the three weights stacked: [q | k | v] = a [W_q; W_k; W_v]ᵀ (+ b),
//!          then RoPE into heads (b, h, t, d);  d[W_q; W_k; W_v] = d[q | k | v]ᵀ a
//! RoPE     y = rot(θ)·x per pair (i, i + d/2):   dx = rot(−θ)·dy
//! attention, per kv head with its g = h/kh query heads as g·t rows:
//!          S = q kᵀ, P = softmax(s·S + causal mask), y = P v
//!          dP = dy vᵀ, dS = s·P ⊙ (dP − rowsum(dP ⊙ P)), dq = dS k, dk = dSᵀ q, dv = Pᵀ dy
//! MLP      [g | u] = a [W_g; W_u]ᵀ, m = silu(g) ⊙ u, out = m W_dᵀ
//!          dg = dm ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),   du = dm ⊙ silu(g)
//! linear   dW = dyᵀ x, dx = dy W
//! embedding  x₀ = E[ids]:   dE[idsᵢ] += dx₀ᵢ
//! ```
//!
//! [`forward`] runs the blocks and the final norm and hands back the hidden states as a
//! variable; the caller's loss (the chunked output layer of [`crate::head_loss`], which computes
//! its gradients in the forward pass for the mean loss) hands back the hidden states' gradient
//! through a one-op graph, and [`Pass::backward`] takes it the rest of the way. The path applies to full and LoRA training and DPO (adapters on any of the
//! block's products, dropout included: `lora.rs`) of a model whose weights are dense f32 tensors
//! on a CUDA device; any run with `LMKIT_TRAIN_AUTOGRAD` set
//! takes candle's autograd, and so does the rest of a process in which this path failed
//! (with a warning). The tests run it on the CPU emulator of the kernels against
//! [`crate::body_cpu`].
//!
//! Deviations from the autograd path: none in the math. Products run in the compute dtype as
//! under autocast (the weights are cast once per step, and each weight gradient is a product in
//! that dtype, then widened to f32); the residual stream, the norms and every sum stay f32.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use lmkit_core::block_ops::{BlockOps, GateUp, Heads, QkvRows, MAX_HIDDEN};
use lmkit_core::candle::backprop::GradStore;
use lmkit_core::candle::{TensorId, Var};
use lmkit_core::embed_grad::embedding_grad;
use lmkit_core::launch::{kernel_suffix, Launcher};
use lmkit_core::linear::Weight;
use lmkit_core::{DType, Tensor};
use lmkit_models::{Llama, BLOCK_LINEARS as LINEARS};

use crate::params::Trainable;
use crate::{Error, Result};

mod attention;
mod lora;

pub use attention::{flash_applies, Attention};

use crate::body_cpu::Dims;

impl Dims {
    /// Output widths of q, k, v, o, gate, up, down.
    fn widths(&self) -> [usize; 7] {
        let (qd, kd) = (self.hd(), self.kd());
        [qd, kd, kd, self.c, self.f, self.f, self.c]
    }

    /// The geometry of the heads (training: k and v hold the t positions).
    fn heads(&self) -> Heads {
        Heads {
            b: self.b,
            t: self.t,
            h: self.h,
            kh: self.kh,
            d: self.d,
            cap: self.t,
            off: 0,
        }
    }
}

/// A master weight (an f32 variable) and whether it trains.
#[derive(Clone)]
struct Param {
    t: Tensor,
    train: bool,
}

/// One block: its master weights, and this step's copies in the compute dtype.
struct Block {
    n1: Param,
    n2: Param,
    /// q, k, v, o, gate, up, down.
    lin: [Param; 7],
    /// The q, k, v biases.
    bias: Option<[Param; 3]>,
    /// `[W_q; W_k; W_v]` `(qkv, c)`.
    w_qkv: Tensor,
    /// `[b_q; b_k; b_v]` f32.
    b_qkv: Option<Tensor>,
    w_o: Tensor,
    /// `[W_g; W_u]` `(2f, c)`.
    w_gu: Tensor,
    w_d: Tensor,
    /// LoRA adapters of q, k, v, o, gate, up, down.
    lora: [Option<lora::Adapter>; 7],
}

impl Block {
    fn trains(&self) -> bool {
        self.n1.train
            || self.n2.train
            || self.lin.iter().any(|p| p.train)
            || self.bias.iter().flatten().any(|p| p.train)
            || self.lora.iter().flatten().any(|a| a.a.train || a.b.train)
    }
}

/// What one block's backward needs from its forward.
struct Stash {
    /// Block input `(n, c)` f32.
    x: Tensor,
    a1: Tensor,
    /// `(b·kh, g·t, d)`: heads of a kv group as consecutive rows.
    q: Tensor,
    /// `(b·kh, t, d)`.
    k: Tensor,
    v: Tensor,
    /// What attention's backward needs.
    attn: attention::Saved,
    /// Attention output `(n, h·d)`.
    y: Tensor,
    /// After the attention's residual add `(n, c)` f32.
    xm: Tensor,
    a2: Tensor,
    /// `[g | u]` `(n, 2f)`.
    gu: Tensor,
    /// `silu(g) ⊙ u` `(n, f)`.
    m: Tensor,
    /// The adapters' stashes (q, k, v, o, gate, up, down).
    lora: [Option<lora::AdapterStash>; 7],
}

/// Whether this path runs `model`'s attention with the flash kernels (by default: see
/// [`Attention::Auto`]).
pub fn uses_flash(model: &Llama) -> bool {
    let Some(launcher) = Launcher::for_device(model.device()) else {
        return false;
    };
    let Ok(k) = BlockOps::new(launcher, model.dtype(), model.device()) else {
        return false;
    };
    attention::use_flash(Attention::Auto, &k, model.config().head_dim).unwrap_or(false)
}

/// Set when this path failed in this process (see [`or_fall_back`]).
static OFF: AtomicBool = AtomicBool::new(false);

/// Whether the trainer should use this path (see the module doc).
pub fn wanted(model: &Llama, trainable: &[Var]) -> bool {
    std::env::var_os("LMKIT_TRAIN_AUTOGRAD").is_none()
        && !OFF.load(Ordering::Relaxed)
        && model.device().is_cuda()
        && applies(model, trainable)
}

/// `r` from this path, where a failure other than bad data (a kernel or a product the device
/// refused) turns the path off for the rest of the process with a warning and gives None, so
/// that the caller falls back to candle's autograd.
fn or_fall_back<T>(r: Result<Option<T>>) -> Result<Option<T>> {
    match r {
        Err(e) if !matches!(e, Error::Data(_)) => {
            tracing::warn!("lmkit's GPU backward failed ({e}); candle's autograd takes over");
            OFF.store(true, Ordering::Relaxed);
            Ok(None)
        }
        r => r,
    }
}

/// [`forward`] on the model's GPU, when [`wanted`] (None otherwise, or after a failure: see
/// [`or_fall_back`]).
pub fn forward_on_device(
    model: &Llama,
    trainable: &[Var],
    inputs: &Tensor,
) -> Result<Option<Pass>> {
    if !wanted(model, trainable) {
        return Ok(None);
    }
    match Launcher::for_device(model.device()) {
        Some(l) => or_fall_back(forward(model, trainable, inputs, l, Attention::Auto)),
        None => Ok(None),
    }
}

/// Whether every weight of `model` is dense, computing in f32, bf16 or f16, and every variable
/// of `trainable` is one of its weights or LoRA adapters: then this path computes every
/// gradient the autograd path would (on any device with a kernel launcher). What trains is
/// f32 (master weights), and so are the norms' and biases' vectors; a frozen matrix may also
/// be stored in the compute dtype (a LoRA base loaded in bf16, as `lmkit train --lora` does
/// on a GPU), and is then used as it is, with no cast.
pub fn applies(m: &Llama, trainable: &[Var]) -> bool {
    let cfg = m.config();
    let cd = m.dtype();
    let kernels_take = cfg.head_dim.is_multiple_of(2)
        && cfg.hidden_size <= MAX_HIDDEN
        && kernel_suffix(cd).is_ok();
    let train: HashSet<TensorId> = trainable.iter().map(|v| v.as_tensor().id()).collect();
    let ok = |t: &Tensor| {
        t.dtype() == DType::F32 || (t.rank() == 2 && t.dtype() == cd && !train.contains(&t.id()))
    };
    kernels_take && crate::body_cpu::trains_only_known(m, trainable, &ok)
}

/// The forward pass of the blocks, kept for their backward; the hidden states `(b, t, c)` (in
/// the compute dtype) are a variable for the caller's loss.
pub struct Pass {
    dm: Dims,
    k: BlockOps,
    blocks: Vec<Block>,
    stashes: Vec<Stash>,
    embed: Param,
    final_norm: Param,
    /// The input of the final norm `(n, c)` f32.
    x: Tensor,
    /// `(n,)` u32 on the device.
    ids: Tensor,
    /// RoPE's `(t, d/2)` f32 tables on the device.
    cos: Tensor,
    sin: Tensor,
    hidden: Var,
}

/// Runs the blocks of `model` on `inputs (b, t)` with kernels from `launcher` and attention as
/// `attn` says; `trainable` are the variables that get gradients. None when this path does not
/// apply.
pub fn forward(
    model: &Llama,
    trainable: &[Var],
    inputs: &Tensor,
    launcher: Launcher,
    attn: Attention,
) -> Result<Option<Pass>> {
    if !applies(model, trainable) {
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
    let dev = m.device().clone();
    // Ids made on the host are checked there (no wait for the device).
    if inputs.device().is_cpu() {
        let ids: Vec<u32> = inputs.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(Error::Data(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                cfg.vocab_size
            )));
        }
    }
    let ids = inputs
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_device(&dev)?;
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
    let k = BlockOps::new(launcher, m.dtype(), &dev)?;
    let flash = attention::use_flash(attn, &k, dm.d)?;
    let train: HashSet<TensorId> = trainable.iter().map(|v| v.as_tensor().id()).collect();
    let param = |t: &Tensor| Param {
        t: t.clone(),
        train: train.contains(&t.id()),
    };
    let weights = m.named_weights();
    let dense = |name: &str| -> Result<Param> {
        match weights.iter().find(|(n, _)| n == name).map(|(_, w)| *w) {
            Some(Weight::Dense(w)) => Ok(param(w)),
            _ => Err(Error::Data(format!("no dense tensor {name}"))),
        }
    };
    let vectors = m.named_vectors();
    let vector = |name: &str| -> Result<Param> {
        let v = vectors
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| Error::Data(format!("no tensor {name}")))?;
        Ok(param(v.1))
    };
    let cd = m.dtype();
    // This step's copies of the weights in the compute dtype, q/k/v and gate/up each stacked
    // into one: laid out here, filled after the blocks by a few multi-tensor launches
    // (`BlockOps::cast_into`, eight weights each) instead of a cast and a copy per weight.
    // Each entry: the f32 master weight, its copy, and where in the copy it starts.
    let mut casts: Vec<(Tensor, Tensor, usize)> = Vec::new();
    let mut copy = |ps: &[&Param]| -> Result<Tensor> {
        if ps.len() == 1 && ps[0].t.dtype() == cd {
            return Ok(ps[0].t.contiguous()?); // the weight itself
        }
        let mut rows = 0;
        for p in ps {
            rows += p.t.dim(0)?;
        }
        let dst = k.empty((rows, ps[0].t.dim(1)?), cd)?;
        let mut at = 0;
        for p in ps {
            match p.t.dtype() == cd {
                // A frozen weight stored in the compute dtype: copied into its rows.
                true => dst.slice_set(&p.t.contiguous()?, 0, at / p.t.dim(1)?)?,
                false => casts.push((p.t.contiguous()?, dst.clone(), at)),
            }
            at += p.t.elem_count();
        }
        Ok(dst)
    };
    let blocks: Vec<Block> = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let lin: Vec<Param> = LINEARS
                .iter()
                .map(|name| dense(&format!("{p}.{name}.weight")))
                .collect::<Result<_>>()?;
            let lin: [Param; 7] = lin
                .try_into()
                .map_err(|_| Error::Data("a block has seven linear layers".into()))?;
            let bias = match cfg.attention_bias {
                true => Some([0, 1, 2].map(|j| format!("{p}.{}.bias", LINEARS[j]))),
                false => None,
            };
            let bias = match bias {
                Some([q, k, v]) => Some([vector(&q)?, vector(&k)?, vector(&v)?]),
                None => None,
            };
            let mut lora: [Option<lora::Adapter>; 7] = Default::default();
            for (j, slot) in lora.iter_mut().enumerate() {
                let l = m
                    .linear(&format!("{p}.{}", LINEARS[j]))
                    .ok_or_else(|| Error::Data(format!("no layer {i}.{}", LINEARS[j])))?;
                if let Some(a) = l.lora() {
                    *slot = Some(lora::Adapter {
                        a: param(&a.a),
                        b: param(&a.b),
                        scale: a.scale,
                        mask: lora::mask(a, dm.n, l.in_features(), cd, &a.a)?,
                    });
                }
            }
            Ok(Block {
                lora,
                n1: vector(&format!("{p}.input_layernorm.weight"))?,
                n2: vector(&format!("{p}.post_attention_layernorm.weight"))?,
                w_qkv: copy(&[&lin[0], &lin[1], &lin[2]])?,
                b_qkv: match &bias {
                    Some(bs) => Some(Tensor::cat(&[&bs[0].t, &bs[1].t, &bs[2].t], 0)?),
                    None => None,
                },
                w_o: copy(&[&lin[3]])?,
                w_gu: copy(&[&lin[4], &lin[5]])?,
                w_d: copy(&[&lin[6]])?,
                lin,
                bias,
            })
        })
        .collect::<Result<_>>()?;
    let items: Vec<(&Tensor, &Tensor, usize)> = casts.iter().map(|(s, d, a)| (s, d, *a)).collect();
    k.cast_into(&items)?;
    drop(items);
    let embed = dense("model.embed_tokens.weight")?;
    let final_norm = vector("model.norm.weight")?;
    let (cos, sin) = m.rope_angles(0, t);
    let half = dm.d / 2;
    let cos = Tensor::from_vec(cos, (t, half), &dev)?;
    let sin = Tensor::from_vec(sin, (t, half), &dev)?;

    let mut x = embed.t.index_select(&ids, 0)?.to_dtype(DType::F32)?; // (n, c) f32
    let mut stashes = Vec::with_capacity(blocks.len());
    for w in &blocks {
        let (s, out) = layer_forward(&dm, &k, w, x, &cos, &sin, flash)?;
        stashes.push(s);
        x = out;
    }
    let hidden = k.rms(&x, &final_norm.t, dm.eps)?.reshape((b, t, dm.c))?;
    let hidden = Var::from_tensor(&hidden)?;
    Ok(Some(Pass {
        dm,
        k,
        blocks,
        stashes,
        embed,
        final_norm,
        x,
        ids,
        cos,
        sin,
        hidden,
    }))
}

fn layer_forward(
    dm: &Dims,
    k: &BlockOps,
    w: &Block,
    x: Tensor,
    cos: &Tensor,
    sin: &Tensor,
    flash: bool,
) -> Result<(Stash, Tensor)> {
    let (b, t, kh, d, g) = (dm.b, dm.t, dm.kh, dm.d, dm.group());
    let mut ls: [Option<lora::AdapterStash>; 7] = Default::default();
    let [lq, lk, lv, lo, lg, lu, ld] = &mut ls;
    let [aq, ak, av, ao, ag, au, ad] = &w.lora;
    let widths = dm.widths();
    let a1 = k.rms(&x, &w.n1.t, dm.eps)?; // (n, c)
    let qkv = a1.matmul(&w.w_qkv.t()?)?; // (n, qkv)
    let qkv = with_adapters(qkv, &a1, &mut [(aq, lq), (ak, lk), (av, lv)], &widths[0..3])?;
    let kk = k.empty((b * kh, t, d), k.dtype())?;
    let v = k.empty((b * kh, t, d), k.dtype())?;
    // (b, h, t, d) = (b·kh, g·t, d): a kv head's query heads as consecutive rows.
    let q = k.rope_split(
        QkvRows::Stacked(&qkv),
        w.b_qkv.as_ref(),
        cos,
        sin,
        &kk,
        &v,
        &dm.heads(),
    )?;
    let q = q.reshape((b * kh, g * t, d))?;
    drop(qkv);
    let (attn, y) = attention::forward(dm, k, &q, &kk, &v, flash)?; // y (n, h·d)
    let o = y.matmul(&w.w_o.t()?)?; // (n, c)
    let o = with_adapters(o, &y, &mut [(ao, lo)], &widths[3..4])?;
    let xm = k.add(&x, &o)?;
    drop(o);
    let a2 = k.rms(&xm, &w.n2.t, dm.eps)?;
    let gu = a2.matmul(&w.w_gu.t()?)?; // (n, 2f)
    let gu = with_adapters(gu, &a2, &mut [(ag, lg), (au, lu)], &widths[4..6])?;
    let m = k.silu_mul(GateUp::Stacked(&gu), dm.f)?; // (n, f)
    let down = m.matmul(&w.w_d.t()?)?; // (n, c)
    let down = with_adapters(down, &m, &mut [(ad, ld)], &widths[6..7])?;
    let out = k.add(&xm, &down)?;
    let stash = Stash {
        x,
        a1,
        q,
        k: kk,
        v,
        attn,
        y,
        xm,
        a2,
        gu,
        m,
        lora: ls,
    };
    Ok((stash, out))
}

/// `base` (the product of `x` with weights stacked by columns of `widths`) plus the terms of
/// those weights' adapters, whose stashes are kept.
fn with_adapters(
    base: Tensor,
    x: &Tensor,
    ads: &mut [(&Option<lora::Adapter>, &mut Option<lora::AdapterStash>)],
    widths: &[usize],
) -> Result<Tensor> {
    if ads.iter().all(|(a, _)| a.is_none()) {
        return Ok(base);
    }
    let n = x.dim(0)?;
    let mut parts = Vec::with_capacity(ads.len());
    for ((a, st), &w) in ads.iter_mut().zip(widths) {
        match a {
            Some(a) => {
                let (delta, s) = a.forward(x)?;
                **st = Some(s);
                parts.push(delta);
            }
            None => parts.push(Tensor::zeros((n, w), x.dtype(), x.device())?),
        }
    }
    let delta = match parts.len() {
        1 => parts.remove(0),
        _ => Tensor::cat(&parts, 1)?,
    };
    Ok((base + delta)?)
}

/// The adapters' share of the gradient of the input `x` of a product whose output gradient
/// `dy` holds the stacked weights' columns (`widths`); pushes the adapters' gradients.
fn adapters_backward(
    dy: &Tensor,
    x: &Tensor,
    ads: Vec<(&Option<lora::Adapter>, Option<lora::AdapterStash>)>,
    widths: &[usize],
    out: &mut Grads,
) -> Result<Option<Tensor>> {
    let (mut acc, mut at): (Option<Tensor>, usize) = (None, 0);
    let single = ads.len() == 1;
    for ((a, st), &w) in ads.into_iter().zip(widths) {
        if let (Some(a), Some(s)) = (a, st) {
            let dyj = match single {
                true => dy.clone(),
                false => dy.narrow(1, at, w)?.contiguous()?,
            };
            let dx = a.backward(&dyj, x, s, out)?;
            acc = Some(match acc {
                None => dx,
                Some(p) => (p + dx)?,
            });
        }
        at += w;
    }
    Ok(acc)
}

/// `base + extra` when there is an extra term.
fn plus(base: Tensor, extra: Option<Tensor>) -> Result<Tensor> {
    Ok(match extra {
        Some(e) => (base + e)?,
        None => base,
    })
}

/// Gradients found so far: each trained parameter with its gradient (any float dtype).
type Grads = Vec<(Tensor, Tensor)>;

/// Pushes the row ranges of a stacked weight's gradient `dw` to the parameters that train.
fn push_rows(out: &mut Grads, params: &[&Param], dw: &Tensor) -> Result<()> {
    let mut at = 0;
    for p in params {
        let rows = p.t.dim(0)?;
        if p.train {
            out.push((p.t.clone(), dw.narrow(0, at, rows)?));
        }
        at += rows;
    }
    Ok(())
}

impl Pass {
    /// The final hidden states `(b, t, c)` (after the last norm), a variable.
    pub fn hidden(&self) -> &Tensor {
        self.hidden.as_tensor()
    }

    /// Takes `dh`, the gradient of [`Pass::hidden`], back through the blocks and adds the
    /// gradient of every trained variable (f32) into `grads`.
    pub fn backward(self, dh: &Tensor, grads: &mut GradStore) -> Result<()> {
        let Pass {
            dm,
            k,
            blocks,
            stashes,
            embed,
            final_norm,
            x,
            ids,
            cos,
            sin,
            ..
        } = self;
        if dh.elem_count() != dm.n * dm.c {
            return Err(Error::Data(format!(
                "the hidden states' gradient has {} values, expected {}",
                dh.elem_count(),
                dm.n * dm.c
            )));
        }
        let dh = dh
            .reshape((dm.n, dm.c))?
            .to_dtype(k.dtype())?
            .contiguous()?;
        let mut out: Grads = Vec::new();
        let stop = match embed.train {
            true => 0,
            false => blocks
                .iter()
                .position(Block::trains)
                .unwrap_or(blocks.len()),
        };
        let dx = k.empty((dm.n, dm.c), DType::F32)?;
        let (mut dx_lp, d_norm) = k.rms_bwd(&x, &final_norm.t, &dh, &dx, false, dm.eps)?;
        let mut dx = dx;
        if final_norm.train {
            out.push((final_norm.t.clone(), d_norm));
        }
        drop((x, dh));
        for (i, (w, s)) in blocks.iter().zip(stashes).enumerate().rev() {
            if i < stop {
                break;
            }
            (dx, dx_lp) = layer_backward(&dm, &k, w, s, dx, &dx_lp, &cos, &sin, &mut out)?;
        }
        if embed.train {
            let de = embedding_grad(&dx, &ids, embed.t.dim(0)?)?;
            out.push((embed.t.clone(), de));
        }
        // Gradients in the compute dtype (the weights' products) widen to f32 in a few
        // multi-tensor launches; the others (f32 already: the norms') as they are.
        let low: Vec<usize> = (0..out.len())
            .filter(|&i| out[i].1.dtype() == k.dtype() && k.dtype() != DType::F32)
            .collect();
        let srcs: Vec<Tensor> = low
            .iter()
            .map(|&i| out[i].1.contiguous())
            .collect::<std::result::Result<_, _>>()?;
        let wide = k.widen(&srcs.iter().collect::<Vec<_>>())?;
        for (&i, g) in low.iter().zip(wide) {
            out[i].1 = g;
        }
        drop(srcs);
        for (t, g) in out {
            let mut g = g.to_dtype(DType::F32)?.contiguous()?;
            // The tied embedding also has the output layer's gradient.
            if let Some(prev) = grads.remove(&t) {
                g = (g + prev)?;
            }
            grads.insert(&t, g);
        }
        Ok(())
    }
}

/// One block's backward: `dout` is the gradient of its output (f32, updated in place into that
/// of its input) and `dout_lp` the same in the compute dtype; returns both for its input and
/// pushes the gradients of what trains into `out`.
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    dm: &Dims,
    k: &BlockOps,
    w: &Block,
    s: Stash,
    dout: Tensor,
    dout_lp: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    out: &mut Grads,
) -> Result<(Tensor, Tensor)> {
    let f = dm.f;
    let [lq, lk, lv, lo, lg, lu, ld] = &w.lin;
    let [aq, ak, av, ao, ag, au, ad] = &w.lora;
    let [sq, sk, sv, so, sg, su, sd] = s.lora;
    let widths = dm.widths();
    // MLP: out = xm + m W_dᵀ.
    let dmid = dout_lp.matmul(&w.w_d)?; // (n, f)
    let extra = adapters_backward(dout_lp, &s.m, vec![(ad, sd)], &widths[6..7], out)?;
    let dmid = plus(dmid, extra)?;
    if ld.train {
        out.push((ld.t.clone(), dout_lp.t()?.matmul(&s.m)?)); // (c, f)
    }
    drop(s.m);
    let dgu = k.silu_mul_bwd(&s.gu, &dmid, f)?; // (n, 2f)
    drop((s.gu, dmid));
    let da2 = dgu.matmul(&w.w_gu)?; // (n, c)
    let extra = adapters_backward(&dgu, &s.a2, vec![(ag, sg), (au, su)], &widths[4..6], out)?;
    let da2 = plus(da2, extra)?;
    if lg.train || lu.train {
        push_rows(out, &[lg, lu], &dgu.t()?.matmul(&s.a2)?)?; // (2f, c)
    }
    drop((dgu, s.a2));
    // dxm = dout + the norm's backward, in place.
    let (dxm_lp, d_n2) = k.rms_bwd(&s.xm, &w.n2.t, &da2, &dout, true, dm.eps)?;
    if w.n2.train {
        out.push((w.n2.t.clone(), d_n2));
    }
    drop((da2, s.xm));

    // Attention: xm = x + y W_oᵀ.
    let dy = dxm_lp.matmul(&w.w_o)?; // (n, h·d)
    let extra = adapters_backward(&dxm_lp, &s.y, vec![(ao, so)], &widths[3..4], out)?;
    let dy = plus(dy, extra)?;
    if lo.train {
        out.push((lo.t.clone(), dxm_lp.t()?.matmul(&s.y)?)); // (c, h·d)
    }
    drop(dxm_lp);
    let (dq, dk, dv) = attention::backward(dm, k, s.attn, &s.q, &s.k, &s.v, &s.y, &dy)?;
    drop((dy, s.y));
    let dqkv = k.rope_merge(&dq, &dk, &dv, cos, sin, &dm.heads())?; // (n, qkv)
    drop((dq, dk, dv));
    if let Some(bias) = &w.bias {
        if bias.iter().any(|p| p.train) {
            let db = dqkv.to_dtype(DType::F32)?.sum(0)?;
            push_rows(out, &[&bias[0], &bias[1], &bias[2]], &db)?;
        }
    }
    let da1 = dqkv.matmul(&w.w_qkv)?; // (n, c)
    let ads = vec![(aq, sq), (ak, sk), (av, sv)];
    let da1 = plus(
        da1,
        adapters_backward(&dqkv, &s.a1, ads, &widths[0..3], out)?,
    )?;
    if lq.train || lk.train || lv.train {
        push_rows(out, &[lq, lk, lv], &dqkv.t()?.matmul(&s.a1)?)?; // (qkv, c)
    }
    drop((dqkv, s.a1));
    let dx = dout;
    let (dx_lp, d_n1) = k.rms_bwd(&s.x, &w.n1.t, &da1, &dx, true, dm.eps)?;
    if w.n1.train {
        out.push((w.n1.t.clone(), d_n1));
    }
    Ok((dx, dx_lp))
}

/// The mean loss of `ids (b, t + 1)` (targets weighted by `mask (b, t)` as
/// [`crate::trainer::loss_masked`] does) and the gradient of every parameter of `t`, with
/// kernels from `launcher` and attention as `attn` says; None when this path does not apply
/// to `t`.
pub fn loss_and_grads_with(
    t: &Trainable,
    ids: &Tensor,
    mask: Option<&Tensor>,
    launcher: Launcher,
    attn: Attention,
) -> Result<Option<(Tensor, GradStore)>> {
    loss_and_grads_laps(t, ids, mask, (launcher, attn), 1.0, &mut |_| Ok(()))
}

/// [`loss_and_grads_with`] with the loss and its gradients times `scale`, computed at that
/// scale (loss scaling: [`crate::loss_scale`]).
pub fn loss_and_grads_scaled(
    t: &Trainable,
    ids: &Tensor,
    mask: Option<&Tensor>,
    (launcher, attn): (Launcher, Attention),
    scale: f64,
) -> Result<Option<(Tensor, GradStore)>> {
    loss_and_grads_laps(t, ids, mask, (launcher, attn), scale, &mut |_| Ok(()))
}

/// [`loss_and_grads_with`], calling `lap("forward")` once the loss is computed (the trainer's
/// per-phase step times).
fn loss_and_grads_laps(
    t: &Trainable,
    ids: &Tensor,
    mask: Option<&Tensor>,
    (launcher, attn): (Launcher, Attention),
    scale: f64,
    lap: &mut dyn FnMut(&'static str) -> Result<()>,
) -> Result<Option<(Tensor, GradStore)>> {
    let tl = crate::body_cpu::input_len(ids)?;
    // Targets made on the host are checked there too (on the device an outside target would
    // give a NaN loss, not an error).
    if ids.device().is_cpu() {
        let vocab = t.model.config().vocab_size;
        let all: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        if let Some(bad) = all.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::Data(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
    }
    let vars: Vec<Var> = t.params.iter().map(|(_, v)| v.clone()).collect();
    let Some(pass) = forward(&t.model, &vars, &ids.narrow(1, 0, tl)?, launcher, attn)? else {
        return Ok(None);
    };
    let (loss, mut grads, dh) =
        crate::body_cpu::head_loss(t, &vars, ids, mask, pass.hidden(), scale, lap)?;
    pass.backward(&dh, &mut grads)?;
    Ok(Some((loss, grads)))
}

/// [`loss_and_grads_scaled`] on the model's GPU, when [`wanted`] (None otherwise, or after a
/// failure: see [`or_fall_back`]); `lap("forward")` is called between the passes.
pub fn loss_and_grads(
    t: &Trainable,
    ids: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    lap: &mut dyn FnMut(&'static str) -> Result<()>,
) -> Result<Option<(Tensor, GradStore)>> {
    let vars: Vec<Var> = t.params.iter().map(|(_, v)| v.clone()).collect();
    if !wanted(&t.model, &vars) {
        return Ok(None);
    }
    match Launcher::for_device(t.model.device()) {
        Some(l) => or_fall_back(loss_and_grads_laps(
            t,
            ids,
            mask,
            (l, Attention::Auto),
            scale,
            lap,
        )),
        None => Ok(None),
    }
}
