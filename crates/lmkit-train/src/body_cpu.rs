//! The CPU f32 training path of a dense Llama: the forward and backward passes of every block
//! on plain buffers, each gradient written once.
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
//! linear   y = x Wᵀ (+ b):   dW = dyᵀ x,   dx = dy W,   db = Σ_rows dy
//! RoPE     y = rot(θ)·x per pair:           dx = rot(−θ)·dy
//! attention (per head; kv heads shared by groups of query heads)
//!          S = s·q kᵀ + causal mask, P = softmax(S), y = P v
//!          dP = dy vᵀ, dS = s·P ⊙ (dP − rowsum(dP ⊙ P)), dq = dS k, dk = dSᵀ q, dv = Pᵀ dy
//! MLP      m = silu(g) ⊙ u, g = a W_gᵀ, u = a W_uᵀ, out = m W_dᵀ
//!          dg = dm ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),   du = dm ⊙ silu(g)
//! embedding  x₀ = E[ids]:   dE[idsᵢ] += dx₀ᵢ
//! ```
//!
//! The output layer and the loss stay with [`crate::head_loss`] (its own fused CPU pass),
//! which hands back the gradient of the final hidden states. The trainer takes this path when
//! every weight is a dense f32 CPU variable of the model (full training: no adapters); anything
//! else, and any run with `LMKIT_TRAIN_AUTOGRAD` set, takes candle's autograd. Both paths are
//! checked against PyTorch's gradients (tests).
//!
//! Deviations from the autograd path: none in the math; sums run in another order (f32
//! differences of ~1e-6 relative).

use std::collections::HashMap;

use lmkit_core::candle::backprop::GradStore;
use lmkit_core::candle::Var;
use lmkit_core::cpu::{read_f32, F32Values};
use lmkit_core::fused::rms_norm_backward;
use lmkit_core::linear::Weight;
use lmkit_core::sgemm::{sgemm, sgemm_serial, sgemm_serial_into, View};
use lmkit_core::{DType, Device, Tensor};
use lmkit_models::{Llama, LlamaConfig};
use rayon::prelude::*;

use crate::params::Trainable;
use crate::{Error, Result};

/// Sizes of one pass: `n = b·t` rows of width `c`; `h` query and `kh` kv heads of `d`; MLP
/// width `f`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    n: usize,
    c: usize,
    h: usize,
    kh: usize,
    d: usize,
    f: usize,
    eps: f32,
}

impl Dims {
    fn hd(&self) -> usize {
        self.h * self.d
    }
    fn kd(&self) -> usize {
        self.kh * self.d
    }
    fn group(&self) -> usize {
        self.h / self.kh
    }
}

/// One block's weights.
struct LayerW<'a> {
    n1: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    bias: Option<[&'a [f32]; 3]>,
    o: &'a [f32],
    n2: &'a [f32],
    gate: &'a [f32],
    up: &'a [f32],
    down: &'a [f32],
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
}

/// The names of one block's parameters, in the order [`LayerGrads::into_named`] yields them.
const LAYER_NAMES: [&str; 9] = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];
const BIAS_NAMES: [&str; 3] = [
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
];

/// Whether the trainer should use this path for `t` (see the module doc).
fn wanted(t: &Trainable) -> bool {
    std::env::var_os("LMKIT_TRAIN_AUTOGRAD").is_none() && applies(t)
}

/// Whether every weight of `t.model` is one of `t.params`, dense, f32, on the CPU, with no
/// adapter: then this path computes every gradient the autograd path would.
pub(crate) fn applies(t: &Trainable) -> bool {
    let m = &t.model;
    if !m.device().is_cpu() || m.dtype() != DType::F32 || m.lora_dropout().is_some() {
        return false;
    }
    let cfg = m.config();
    if cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
        return false;
    }
    let vars: HashMap<&str, &Var> = t.params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let same = |name: &str, tensor: &Tensor| {
        vars.get(name)
            .is_some_and(|v| v.as_tensor().id() == tensor.id() && read_f32(v.as_tensor()).is_some())
    };
    let dense = m.named_weights().into_iter().all(|(n, w)| match w {
        Weight::Dense(w) => same(&n, w),
        _ => false,
    });
    let vectors = m.named_vectors().into_iter().all(|(n, v)| same(&n, v));
    let plain = (0..cfg.num_layers).all(|i| {
        LAYER_NAMES[1..5].iter().chain(&LAYER_NAMES[6..]).all(|n| {
            let module = format!("model.layers.{i}.{}", n.trim_end_matches(".weight"));
            m.linear(&module).is_some_and(|l| l.lora().is_none())
        })
    });
    let head = m.lm_head().lora().is_none() && m.lm_head().bias().is_none();
    dense && vectors && plain && head && t.params.len() == cfg.parameter_shapes().len()
}

/// The mean loss of `ids (b, t + 1)` (targets weighted by `mask (b, t)` as
/// [`crate::trainer::loss_masked`] does) and the gradient of every parameter; None when this
/// path does not apply to `t` (then use the autograd path).
pub fn loss_and_grads(
    t: &Trainable,
    ids: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<(Tensor, GradStore)>> {
    if !wanted(t) {
        return Ok(None);
    }
    let m = &t.model;
    let cfg = m.config();
    let (b, t1) = ids.dims2()?;
    if t1 < 2 {
        return Err(Error::Data(format!(
            "a training sequence needs at least 2 tokens, got {t1}"
        )));
    }
    let tl = t1 - 1;
    if tl > cfg.max_position_embeddings {
        return Err(Error::Data(format!(
            "sequences of {tl} tokens exceed the model's context of {}",
            cfg.max_position_embeddings
        )));
    }
    let all: Vec<u32> = ids.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    if let Some(bad) = all.iter().find(|&&i| i as usize >= cfg.vocab_size) {
        return Err(Error::Data(format!(
            "token id {bad} is outside the model's vocabulary of {}",
            cfg.vocab_size
        )));
    }
    let inputs: Vec<u32> = all.chunks(t1).flat_map(|r| r[..tl].to_vec()).collect();
    let dm = Dims {
        b,
        t: tl,
        n: b * tl,
        c: cfg.hidden_size,
        h: cfg.num_heads,
        kh: cfg.num_kv_heads,
        d: cfg.head_dim,
        f: cfg.intermediate_size,
        eps: cfg.rms_norm_eps as f32,
    };

    let vars: HashMap<&str, &Var> = t.params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let held: HashMap<&str, F32Values> = vars
        .iter()
        .filter_map(|(n, v)| Some((*n, read_f32(v.as_tensor())?)))
        .collect();
    let get = |name: &str| -> Result<&[f32]> {
        held.get(name)
            .map(|v| &**v)
            .ok_or_else(|| Error::Data(format!("parameter {name} is not an f32 CPU tensor")))
    };
    let layers: Vec<LayerW> = (0..cfg.num_layers)
        .map(|i| {
            let p = |n: &str| get(&format!("model.layers.{i}.{n}"));
            let bias = match cfg.attention_bias {
                true => Some([p(BIAS_NAMES[0])?, p(BIAS_NAMES[1])?, p(BIAS_NAMES[2])?]),
                false => None,
            };
            Ok(LayerW {
                n1: p(LAYER_NAMES[0])?,
                q: p(LAYER_NAMES[1])?,
                k: p(LAYER_NAMES[2])?,
                v: p(LAYER_NAMES[3])?,
                bias,
                o: p(LAYER_NAMES[4])?,
                n2: p(LAYER_NAMES[5])?,
                gate: p(LAYER_NAMES[6])?,
                up: p(LAYER_NAMES[7])?,
                down: p(LAYER_NAMES[8])?,
            })
        })
        .collect::<Result<_>>()?;
    let embed = get("model.embed_tokens.weight")?;
    let final_norm = get("model.norm.weight")?;
    let (cos, sin) = rope_tables(m, cfg, tl);

    // Forward.
    let mut x = vec![0f32; dm.n * dm.c];
    x.par_chunks_mut(dm.c)
        .zip(inputs.par_iter())
        .for_each(|(row, &id)| {
            row.copy_from_slice(&embed[id as usize * dm.c..][..dm.c]);
        });
    let mut stashes = Vec::with_capacity(layers.len());
    for w in &layers {
        let (s, out) = layer_forward(&dm, w, x, &cos, &sin)?;
        stashes.push(s);
        x = out;
    }
    let hidden = rms_forward(&x, final_norm, dm.c, dm.eps);

    // The output layer and the loss, through the head's own fused pass.
    let hv = Var::from_vec(hidden, (dm.n, dm.c), &Device::Cpu)?;
    let head = crate::head_loss::dense_head(m)
        .ok_or_else(|| Error::Data("the output layer is not a plain dense layer".into()))?;
    let targets = Tensor::from_vec(
        all.chunks(t1)
            .flat_map(|r| r[1..].to_vec())
            .collect::<Vec<u32>>(),
        dm.n,
        &Device::Cpu,
    )?;
    let weights = match mask {
        Some(mk) => Some(mk.to_device(&Device::Cpu)?.flatten_all()?),
        None => None,
    };
    let loss =
        crate::head_loss::output_cross_entropy(hv.as_tensor(), head, &targets, weights.as_ref())?;
    let mut grads = loss.backward()?;
    let dh = grads
        .remove(hv.as_tensor())
        .ok_or_else(|| Error::Data("the output layer gave no gradient".into()))?;
    let dh: Vec<f32> = dh.flatten_all()?.to_vec1()?;

    // Backward.
    let mut out: Vec<(String, Vec<f32>)> = Vec::new();
    let mut dx = vec![0f32; dm.n * dm.c];
    out.push((
        "model.norm.weight".into(),
        rms_norm_backward(&x, final_norm, &dh, dm.eps, &mut dx, true),
    ));
    drop((x, dh));
    for (i, (w, s)) in layers.iter().zip(stashes).enumerate().rev() {
        let (dx_in, named) = layer_backward(&dm, w, s, dx, &cos, &sin)?;
        dx = dx_in;
        for (n, g) in named {
            out.push((format!("model.layers.{i}.{n}"), g));
        }
    }
    let mut de = vec![0f32; cfg.vocab_size * dm.c];
    for (row, &id) in dx.chunks(dm.c).zip(&inputs) {
        for (a, g) in de[id as usize * dm.c..][..dm.c].iter_mut().zip(row) {
            *a += g;
        }
    }
    out.push(("model.embed_tokens.weight".into(), de));

    for (name, g) in out {
        let var = vars
            .get(name.as_str())
            .ok_or_else(|| Error::Data(format!("no variable for {name}")))?;
        let shape = var.as_tensor().shape().clone();
        let mut g = Tensor::from_vec(g, shape, &Device::Cpu)?;
        // The tied embedding also has the output layer's gradient.
        if let Some(prev) = grads.remove(var.as_tensor()) {
            g = (g + prev)?;
        }
        grads.insert(var.as_tensor(), g);
    }
    Ok(Some((loss, grads)))
}

/// RoPE's `cos`/`sin` tables `(t, d/2)`, as the model computes them.
fn rope_tables(m: &Llama, cfg: &LlamaConfig, t: usize) -> (Vec<f32>, Vec<f32>) {
    let inv = m.rope_inv_freq();
    let half = cfg.head_dim / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        for &f in &inv[..half.min(inv.len())] {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

fn layer_forward(
    dm: &Dims,
    w: &LayerW,
    x: Vec<f32>,
    cos: &[f32],
    sin: &[f32],
) -> Result<(Stash, Vec<f32>)> {
    let (n, c, f) = (dm.n, dm.c, dm.f);
    let a1 = rms_forward(&x, w.n1, c, dm.eps);
    let mut q = linear(&a1, w.q, n, c, dm.hd())?;
    let mut k = linear(&a1, w.k, n, c, dm.kd())?;
    let mut v = linear(&a1, w.v, n, c, dm.kd())?;
    if let Some([bq, bk, bv]) = w.bias {
        add_rows(&mut q, bq);
        add_rows(&mut k, bk);
        add_rows(&mut v, bv);
    }
    rope_rows(&mut q, dm.hd(), dm.d, dm.t, cos, sin, false);
    rope_rows(&mut k, dm.kd(), dm.d, dm.t, cos, sin, false);
    let (p, y) = attention_forward(dm, &q, &k, &v)?;
    let mut xm = linear(&y, w.o, n, dm.hd(), c)?;
    xm.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(a, b)| *a += b);
    let a2 = rms_forward(&xm, w.n2, c, dm.eps);
    let g = linear(&a2, w.gate, n, c, f)?;
    let u = linear(&a2, w.up, n, c, f)?;
    let mut mid = g.clone();
    silu_mul(&mut mid, &u);
    let mut out = linear(&mid, w.down, n, f, c)?;
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
    };
    Ok((stash, out))
}

/// Gradients by parameter name (relative to the block).
type Named = Vec<(&'static str, Vec<f32>)>;

/// One block's backward: `dout` is the gradient of its output; returns that of its input and
/// the named gradients of its parameters.
fn layer_backward(
    dm: &Dims,
    w: &LayerW,
    s: Stash,
    dout: Vec<f32>,
    cos: &[f32],
    sin: &[f32],
) -> Result<(Vec<f32>, Named)> {
    let (n, c, f) = (dm.n, dm.c, dm.f);
    // MLP: out = xm + m W_dᵀ.
    let mut mid = s.g.clone();
    silu_mul(&mut mid, &s.u);
    let d_down = weight_grad(&dout, &mid, n, c, f)?;
    drop(mid);
    let mut dg = vec![0f32; n * f];
    sgemm(
        &mut dg,
        View::rows(&dout, n, c),
        View::rows(w.down, c, f),
        false,
    )?;
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
    let d_gate = weight_grad(&dg, &s.a2, n, f, c)?;
    let d_up = weight_grad(&du, &s.a2, n, f, c)?;
    let mut da2 = vec![0f32; n * c];
    sgemm(
        &mut da2,
        View::rows(&dg, n, f),
        View::rows(w.gate, f, c),
        false,
    )?;
    sgemm(
        &mut da2,
        View::rows(&du, n, f),
        View::rows(w.up, f, c),
        true,
    )?;
    drop((dg, du));
    let mut dxm = dout;
    let d_n2 = rms_norm_backward(&s.xm, w.n2, &da2, dm.eps, &mut dxm, true);
    drop(da2);

    // Attention: xm = x + y W_oᵀ.
    let d_o = weight_grad(&dxm, &s.y, n, c, dm.hd())?;
    let mut dy = vec![0f32; n * dm.hd()];
    sgemm(
        &mut dy,
        View::rows(&dxm, n, c),
        View::rows(w.o, c, dm.hd()),
        false,
    )?;
    let (mut dq, mut dk, dv) = attention_backward(dm, &s.q, &s.k, &s.v, &s.p, &dy)?;
    drop(dy);
    rope_rows(&mut dq, dm.hd(), dm.d, dm.t, cos, sin, true);
    rope_rows(&mut dk, dm.kd(), dm.d, dm.t, cos, sin, true);
    let d_q = weight_grad(&dq, &s.a1, n, dm.hd(), c)?;
    let d_k = weight_grad(&dk, &s.a1, n, dm.kd(), c)?;
    let d_v = weight_grad(&dv, &s.a1, n, dm.kd(), c)?;
    let mut da1 = vec![0f32; n * c];
    for (i, (dp, wp, m)) in [
        (&dq, w.q, dm.hd()),
        (&dk, w.k, dm.kd()),
        (&dv, w.v, dm.kd()),
    ]
    .into_iter()
    .enumerate()
    {
        sgemm(&mut da1, View::rows(dp, n, m), View::rows(wp, m, c), i > 0)?;
    }
    let mut dx = dxm;
    let d_n1 = rms_norm_backward(&s.x, w.n1, &da1, dm.eps, &mut dx, true);

    let mut named = vec![
        (LAYER_NAMES[0], d_n1),
        (LAYER_NAMES[1], d_q),
        (LAYER_NAMES[2], d_k),
        (LAYER_NAMES[3], d_v),
        (LAYER_NAMES[4], d_o),
        (LAYER_NAMES[5], d_n2),
        (LAYER_NAMES[6], d_gate),
        (LAYER_NAMES[7], d_up),
        (LAYER_NAMES[8], d_down),
    ];
    if w.bias.is_some() {
        named.push((BIAS_NAMES[0], column_sums(&dq, dm.hd())));
        named.push((BIAS_NAMES[1], column_sums(&dk, dm.kd())));
        named.push((BIAS_NAMES[2], column_sums(&dv, dm.kd())));
    }
    Ok((dx, named))
}

/// `x (n, k) · Wᵀ` for `W (m, k)`: `(n, m)`.
fn linear(x: &[f32], w: &[f32], n: usize, k: usize, m: usize) -> Result<Vec<f32>> {
    let mut y = vec![0f32; n * m];
    sgemm(&mut y, View::rows(x, n, k), View::rows(w, m, k).t(), false)?;
    Ok(y)
}

/// `dyᵀ x` for `dy (n, m)`, `x (n, k)`: the gradient `(m, k)` of a linear layer's weight.
fn weight_grad(dy: &[f32], x: &[f32], n: usize, m: usize, k: usize) -> Result<Vec<f32>> {
    let mut dw = vec![0f32; m * k];
    sgemm(
        &mut dw,
        View::rows(dy, n, m).t(),
        View::rows(x, n, k),
        false,
    )?;
    Ok(dw)
}

fn add_rows(x: &mut [f32], bias: &[f32]) {
    x.par_chunks_mut(bias.len()).for_each(|row| {
        row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    });
}

/// Rows per partial sum of a reduction over rows: fixed, so that sums run in the same order
/// whatever threads take which rows (runs are reproducible).
const GROUP: usize = 64;

/// The sum, in order, of per-group partial sums of width `m`.
fn ordered_sum(partials: Vec<Vec<f32>>, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; m];
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    out
}

/// `Σ_rows x` of `x (n, m)`.
fn column_sums(x: &[f32], m: usize) -> Vec<f32> {
    let partials = x
        .par_chunks(m * GROUP)
        .map(|rows| {
            let mut acc = vec![0f32; m];
            for row in rows.chunks(m) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect();
    ordered_sum(partials, m)
}

/// `g ← silu(g) ⊙ u`.
fn silu_mul(g: &mut [f32], u: &[f32]) {
    let isa = lmkit_kernels::isa();
    g.par_chunks_mut(4096)
        .zip(u.par_chunks(4096))
        .for_each(|(g, u)| lmkit_kernels::ops::silu_mul(isa, g, u));
}

/// RMSNorm of each row of `x (n, c)` (the inference kernel, on the thread pool).
fn rms_forward(x: &[f32], w: &[f32], c: usize, eps: f32) -> Vec<f32> {
    let mut a = vec![0f32; x.len()];
    a.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(a, x)| lmkit_kernels::ops::rmsnorm(x, w, eps, a));
    a
}

/// Rotates every head of every row of `x (b·t, width)` (heads of `d`) by RoPE at the row's
/// position (row mod `t`), or back (`inverse`: the backward pass).
fn rope_rows(
    x: &mut [f32],
    width: usize,
    d: usize,
    t: usize,
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    let half = d / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(width).enumerate().for_each(|(row, xs)| {
        let pos = row % t;
        let (cs, sn) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        for head in xs.chunks_mut(d) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2, s) = (a[i], b[i], sign * sn[i]);
                a[i] = x1 * cs[i] - x2 * s;
                b[i] = x1 * s + x2 * cs[i];
            }
        }
    });
}

/// A head's `(t, d)` block of a row-major `(b·t, width)` buffer: batch `bi`, head `hi`.
fn head_view(x: &[f32], width: usize, d: usize, t: usize, bi: usize, hi: usize) -> View<'_> {
    View {
        data: &x[bi * t * width + hi * d..],
        rows: t,
        cols: d,
        rs: width,
        cs: 1,
    }
}

/// Query rows per block of attention: each block multiplies only the keys it may see.
const BLOCK: usize = 64;

/// Rows `r0..r1`, columns `0..r1` of a row-major `(·, t)` buffer.
fn block(x: &[f32], t: usize, r0: usize, r1: usize) -> View<'_> {
    View {
        data: &x[r0 * t..],
        rows: r1 - r0,
        cols: r1,
        rs: t,
        cs: 1,
    }
}

/// Rows `r0..r1` of a view.
fn row_block(v: View<'_>, r0: usize, r1: usize) -> View<'_> {
    View {
        data: &v.data[r0 * v.rs..],
        rows: r1 - r0,
        ..v
    }
}

/// Causal attention of `q (b·t, h·d)` over `k`, `v (b·t, kh·d)`: the probabilities
/// `(b, h, t, t)` and the output `(b·t, h·d)`.
fn attention_forward(dm: &Dims, q: &[f32], k: &[f32], v: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    let (t, d, h) = (dm.t, dm.d, dm.h);
    let (hd, kd, g) = (dm.hd(), dm.kd(), dm.group());
    let scale = 1.0 / (d as f32).sqrt();
    let isa = lmkit_kernels::isa();
    let mut p = vec![0f32; dm.b * h * t * t];
    let mut yh = vec![0f32; dm.b * h * t * d]; // (b, h, t, d)
    p.par_chunks_mut(t * t)
        .zip(yh.par_chunks_mut(t * d))
        .enumerate()
        .try_for_each(|(i, (pc, yc))| -> Result<()> {
            let (bi, hi) = (i / h, i % h);
            let j = hi / g;
            let qh = head_view(q, hd, d, t, bi, hi);
            let (kv, vv) = (head_view(k, kd, d, t, bi, j), head_view(v, kd, d, t, bi, j));
            // Blocks of query rows see keys 0..r1 only: the masked triangle is never computed.
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(t);
                let qb = row_block(qh, r0, r1);
                let seen = View { rows: r1, ..kv };
                sgemm_serial_into(&mut pc[r0 * t..], t, qb, seen.t(), false)?;
                for (r, row) in (r0..r1).zip(pc[r0 * t..r1 * t].chunks_mut(t)) {
                    let (seen, unseen) = row.split_at_mut(r + 1);
                    seen.iter_mut().for_each(|s| *s *= scale);
                    let inv = 1.0 / lmkit_kernels::ops::softmax_unnormalized(isa, seen);
                    seen.iter_mut().for_each(|s| *s *= inv);
                    unseen.fill(0.0);
                }
                let pb = block(pc, t, r0, r1);
                sgemm_serial(&mut yc[r0 * d..r1 * d], pb, View { rows: r1, ..vv }, false)?;
            }
            Ok(())
        })?;
    let mut y = vec![0f32; dm.n * hd];
    from_heads(&yh, &mut y, dm, h);
    Ok((p, y))
}

/// `(b, heads, t, d)` → row-major `(b·t, heads·d)`.
fn from_heads(src: &[f32], dst: &mut [f32], dm: &Dims, heads: usize) {
    let (t, d) = (dm.t, dm.d);
    dst.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(row, out)| {
            let (bi, r) = (row / t, row % t);
            for (hi, o) in out.chunks_mut(d).enumerate() {
                o.copy_from_slice(&src[((bi * heads + hi) * t + r) * d..][..d]);
            }
        });
}

/// The backward of [`attention_forward`] given `dy (b·t, h·d)`: `dq`, `dk`, `dv`, row-major,
/// with respect to the rotated `q` and `k`.
#[allow(clippy::type_complexity)]
fn attention_backward(
    dm: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f32],
    dy: &[f32],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (t, d, h, kh) = (dm.t, dm.d, dm.h, dm.kh);
    let (hd, kd, g) = (dm.hd(), dm.kd(), dm.group());
    let scale = 1.0 / (d as f32).sqrt();
    let mut dqh = vec![0f32; dm.b * h * t * d]; // (b, h, t, d)
    let mut dkh = vec![0f32; dm.b * kh * t * d]; // (b, kh, t, d)
    let mut dvh = vec![0f32; dm.b * kh * t * d];
    // One task per kv head: its group of query heads add into its dk and dv.
    dqh.par_chunks_mut(g * t * d)
        .zip(dkh.par_chunks_mut(t * d).zip(dvh.par_chunks_mut(t * d)))
        .enumerate()
        .try_for_each(|(i, (dqc, (dkc, dvc)))| -> Result<()> {
            let (bi, j) = (i / kh, i % kh);
            let (kv, vv) = (head_view(k, kd, d, t, bi, j), head_view(v, kd, d, t, bi, j));
            let mut ds = vec![0f32; t * t];
            for r in 0..g {
                let hi = j * g + r;
                let pc = &p[(bi * h + hi) * t * t..][..t * t];
                let (qh, dyh) = (
                    head_view(q, hd, d, t, bi, hi),
                    head_view(dy, hd, d, t, bi, hi),
                );
                for r0 in (0..t).step_by(BLOCK) {
                    let r1 = (r0 + BLOCK).min(t);
                    let (qb, dyb) = (row_block(qh, r0, r1), row_block(dyh, r0, r1));
                    let (ks, vs) = (View { rows: r1, ..kv }, View { rows: r1, ..vv });
                    // dv += Pᵀ dy, dP = dy vᵀ.
                    sgemm_serial(&mut dvc[..r1 * d], block(pc, t, r0, r1).t(), dyb, true)?;
                    sgemm_serial_into(&mut ds[r0 * t..], t, dyb, vs.t(), false)?;
                    // dS = s·P ⊙ (dP − rowsum(dP ⊙ P)) on the seen columns.
                    for (row, (dsr, pr)) in
                        (r0..r1).zip(ds[r0 * t..].chunks_mut(t).zip(pc[r0 * t..].chunks(t)))
                    {
                        let seen = row + 1;
                        let dot: f32 = dsr[..seen]
                            .iter()
                            .zip(&pr[..seen])
                            .map(|(a, b)| a * b)
                            .sum();
                        for (x, &pv) in dsr[..seen].iter_mut().zip(&pr[..seen]) {
                            *x = scale * pv * (*x - dot);
                        }
                        dsr[seen..r1].fill(0.0);
                    }
                    let dsb = block(&ds, t, r0, r1);
                    // dq = dS k, dk += dSᵀ q.
                    sgemm_serial(
                        &mut dqc[(r * t + r0) * d..][..(r1 - r0) * d],
                        dsb,
                        ks,
                        false,
                    )?;
                    sgemm_serial(&mut dkc[..r1 * d], dsb.t(), qb, true)?;
                }
            }
            Ok(())
        })?;
    let mut dq = vec![0f32; dm.n * hd];
    let mut dk = vec![0f32; dm.n * kd];
    let mut dv = vec![0f32; dm.n * kd];
    from_heads(&dqh, &mut dq, dm, h);
    from_heads(&dkh, &mut dk, dm, kh);
    from_heads(&dvh, &mut dv, dm, kh);
    Ok((dq, dk, dv))
}
