//! The Llama forward pass on lmkit-kernels, for the CPU: the same math as `llama.rs` (which
//! stays the differentiable, any-device reference), run as one thread team per call.
//!
//! Every phase below is split across the team's members and ends at a spinning barrier, so a
//! decoding step costs one thread hand-off, not hundreds. Per layer:
//!
//! | phase | work | split |
//! |---|---|---|
//! | A | `x̂ = RMSNorm(x)`, quantized to 8-bit blocks if a weight wants them | tokens |
//! | B | `[q k v] = x̂ [W_q W_k W_v]ᵀ (+ bias)` | weight rows |
//! | C | RoPE on q and k; k, v appended to the cache | (token, head) |
//! | D | `a = softmax(q kᵀ/√d) v` per head, causal, GQA (`q` head `j` reads kv head `j/g`) | (token, head) |
//! | E | `x += a W_oᵀ` | weight rows |
//! | F | as A with the MLP norm | tokens |
//! | G | `m = silu(x̂ W_gateᵀ) ⊙ (x̂ W_upᵀ)`, quantized per row chunk | weight rows |
//! | H | `x += m W_downᵀ` | weight rows |
//!
//! The KV cache keeps each (layer, kv head) in its own f32 buffers, keys in blocks of 16
//! positions stored channel-major and values as `(positions, d)` rows (see `lmkit_kernels::attn`),
//! so attention streams both in order with no horizontal sums; buffers grow by doubling and are reused across calls, as are
//! all scratch buffers (no allocation per decoded token once warm).

use lmkit_core::linear::KernelData;
use lmkit_core::Linear;
use lmkit_kernels::act::{quantize_into, A8Block};
use lmkit_kernels::team::{self, SharedMut, Team};
use lmkit_kernels::{attn, ops, Rotation, WeightView, BLOCK};

use crate::{Error, Result};

/// Per-model constants the native path keeps as plain vectors.
#[derive(Debug, Clone)]
pub(crate) struct Consts {
    pub attn_norm: Vec<Vec<f32>>,
    pub mlp_norm: Vec<Vec<f32>>,
    pub norm: Vec<f32>,
    /// Concatenated q|k|v bias per layer, if the model has one.
    pub qkv_bias: Vec<Option<Vec<f32>>>,
    pub eps: f32,
    pub inv_freq: Vec<f32>,
}

/// Shapes of the model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
}

/// The KV cache and scratch buffers of the native path (one sequence).
#[derive(Debug, Clone, Default)]
pub struct NativeCache {
    head_dim: usize,
    /// `[layer · kv_heads + head]` → `(positions, d)`.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    s: Scratch,
}

#[derive(Debug, Clone, Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    acts: Vec<A8Block>,
    /// The down projection's quantized input (written while `acts` is still being read).
    acts_ffn: Vec<A8Block>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Products of layers with an output rotation, before it is applied.
    rot: Vec<f32>,
    scores: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    out: Vec<f32>,
}

impl NativeCache {
    pub(crate) fn new(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            head_dim,
            keys: vec![Vec::new(); layers * kv_heads],
            values: vec![Vec::new(); layers * kv_heads],
            len: 0,
            s: Scratch::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops positions past `len`.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            let n = len * self.head_dim;
            let nk = attn::key_buffer_len(len, self.head_dim);
            self.keys.iter_mut().for_each(|k| k.truncate(nk));
            self.values.iter_mut().for_each(|v| v.truncate(n));
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Reserves room for `positions` in total, so a known context never reallocates.
    pub fn reserve(&mut self, positions: usize) {
        let n = positions * self.head_dim;
        let nk = attn::key_buffer_len(positions, self.head_dim);
        for b in &mut self.keys {
            b.reserve(nk.saturating_sub(b.len()));
        }
        for b in &mut self.values {
            b.reserve(n.saturating_sub(b.len()));
        }
    }

    /// Bytes held by keys and values.
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|b| b.capacity() * 4)
            .sum()
    }
}

/// What a call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// Final-norm hidden states of every position, `(t, c)`.
    Hidden,
    /// Logits of the last position, `(v)`.
    LastLogits,
}

/// The weights in the order the engine reads them: per layer q, k, v, o, gate, up, down; then
/// the output head.
pub(crate) fn kernel_data<'a>(linears: &[&'a Linear]) -> Result<Option<Vec<KernelData<'a>>>> {
    let mut out = Vec::with_capacity(linears.len());
    for l in linears {
        match l.kernel_data()? {
            Some(d) => out.push(d),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// Rows per dynamically scheduled chunk: about eight chunks per member, in whole blocks.
fn chunk_rows(rows: usize, members: usize) -> usize {
    (rows / (members * 8)).next_multiple_of(BLOCK).max(BLOCK)
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Runs `ids` (one sequence) after the cached positions and appends them to the cache.
/// `embedded` is the `(t, c)` token embeddings.
///
/// `branches` (sorted token indices; empty for one sequence) makes a tree: the tokens before
/// `branches[0] = b` are a trunk that continues the cache, and each branch continues the trunk
/// on its own: a token of the branch starting at `s` sits at position `p0 + b + (i − s)` and
/// attends to the cache, the trunk and its own branch's earlier tokens only (tree attention).
/// All branches land in the cache one after another; the caller cuts it back.
pub(crate) fn forward(
    dims: Dims,
    consts: &Consts,
    weights: &[KernelData],
    embedded: &[f32],
    cache: &mut NativeCache,
    want: Want,
    branches: &[usize],
) -> Result<Vec<f32>> {
    let Dims {
        layers,
        hidden: c,
        heads: h,
        kv_heads: kh,
        head_dim: d,
        ffn: f,
        vocab,
    } = dims;
    let t = embedded.len() / c;
    if t == 0 || embedded.len() != t * c || weights.len() != layers * 7 + 1 {
        return Err(Error::Unsupported(format!(
            "native forward: {} embedded values for hidden {c}, {} weights for {layers} layers",
            embedded.len(),
            weights.len()
        )));
    }
    if branches.windows(2).any(|w| w[0] >= w[1]) || branches.last().is_some_and(|&b| b >= t) {
        return Err(Error::Unsupported(format!(
            "native forward: branch starts {branches:?} for {t} tokens"
        )));
    }
    // Tokens each token does not see, from its own position: `gap[i]` tokens before its
    // branch (the other branches before it); 0 on the trunk.
    let trunk = branches.first().copied().unwrap_or(t);
    let mut gap = vec![0usize; t];
    for (k, &b) in branches.iter().enumerate() {
        let end = branches.get(k + 1).copied().unwrap_or(t);
        gap[b..end].iter_mut().for_each(|g| *g = b - trunk);
    }
    let views: Vec<WeightView> = weights
        .iter()
        .map(|w| w.view())
        .collect::<std::result::Result<_, _>>()?;
    // Low-bit layers with rotations (QuIP): layers that read one input share its rotation
    // (checked by `check_rotations`), so it is applied once where that input is quantized.
    let rin: Vec<Option<&Rotation>> = weights.iter().map(|w| w.input_rotation()).collect();
    let rout: Vec<Option<&Rotation>> = weights.iter().map(|w| w.output_rotation()).collect();
    check_rotations(&rin, layers)?;
    let isa = lmkit_kernels::isa();
    let (hd, kd) = (h * d, kh * d);
    let g = h / kh;
    let qkv_w = hd + 2 * kd;
    let p0 = cache.len;
    let total = p0 + t;
    let members = rayon::current_num_threads().max(1);

    // Buffers: sized once per shape, reused across calls.
    for b in cache.keys.iter_mut() {
        b.resize(attn::key_buffer_len(total, d), 0.0);
    }
    for b in cache.values.iter_mut() {
        b.resize(total * d, 0.0);
    }
    let scratch = attn::scratch_len(attn::MAX_QUERIES, total);
    let s = &mut cache.s;
    let wide = c.max(hd);
    grow(&mut s.x, t * c);
    s.x[..t * c].copy_from_slice(embedded);
    grow(&mut s.xn, t * c.max(hd));
    grow(&mut s.acts, t * wide.div_ceil(BLOCK));
    grow(&mut s.acts_ffn, t * f.div_ceil(BLOCK));
    grow(&mut s.qkv, t * qkv_w);
    grow(&mut s.att, t * hd);
    grow(&mut s.gate, t * f);
    grow(&mut s.up, t * f);
    if rout.iter().any(|r| r.is_some()) {
        grow(&mut s.rot, t * c);
    }
    grow(&mut s.scores, members * scratch);
    let half = d / 2;
    s.cos.clear();
    s.sin.clear();
    for (i, &gp) in gap.iter().enumerate() {
        let p = p0 + i - gp;
        for &fr in &consts.inv_freq {
            let a = p as f32 * fr;
            s.cos.push(a.cos());
            s.sin.push(a.sin());
        }
    }
    let out_len = match want {
        Want::Hidden => t * c,
        Want::LastLogits => vocab,
    };
    s.out.clear();
    s.out.resize(out_len, 0.0);

    let x = SharedMut::new(&mut s.x);
    let xn = SharedMut::new(&mut s.xn);
    let acts = SharedMut::new(&mut s.acts);
    let acts_ffn = SharedMut::new(&mut s.acts_ffn);
    let qkv = SharedMut::new(&mut s.qkv);
    let att = SharedMut::new(&mut s.att);
    let gate = SharedMut::new(&mut s.gate);
    let up = SharedMut::new(&mut s.up);
    let rot = SharedMut::new(&mut s.rot);
    let scores = SharedMut::new(&mut s.scores);
    let out = SharedMut::new(&mut s.out);
    let keys: Vec<SharedMut<f32>> = cache.keys.iter_mut().map(|b| SharedMut::new(b)).collect();
    let values: Vec<SharedMut<f32>> = cache.values.iter_mut().map(|b| SharedMut::new(b)).collect();
    let (cos, sin) = (&s.cos, &s.sin);
    let scale = 1.0 / (d as f32).sqrt();

    // SAFETY (all `unsafe` below): every phase writes disjoint ranges of the shared buffers
    // (split by token, by weight row or by (token, head)), reads only what earlier phases wrote,
    // and ends at a barrier before any other member reads it; ranges are bounds-checked.
    let norm_phase = |tm: &Team, w: &[f32], blocks: bool, r: Option<&Rotation>| unsafe {
        let mine = tm.split(t, 1);
        for i in mine.clone() {
            ops::rmsnorm(x.slice(i * c, c), w, consts.eps, xn.slice_mut(i * c, c));
        }
        if let Some(r) = r {
            r.apply_rows(xn.slice_mut(mine.start * c, mine.len() * c));
        }
        for i in mine {
            let xo = xn.slice_mut(i * c, c);
            if blocks {
                quantize_into(xo, acts.slice_mut(i * (c / BLOCK), c / BLOCK));
            }
        }
        tm.barrier();
    };
    // `y += W x` into the residual stream (o and down projections); with an output rotation
    // `y += Rₒᵀ (Ŵ x)`, the product gathered first.
    let residual_phase = |tm: &Team,
                          w: &WeightView,
                          r: Option<&Rotation>,
                          input: SharedMut<f32>,
                          blocks: SharedMut<A8Block>| unsafe {
        let k = w.cols();
        let xs = input.slice(0, t * k);
        let a = blocks.slice(0, if w.wants_blocks() { t * k / BLOCK } else { 0 });
        match r {
            None => {
                tm.for_chunks(c, chunk_rows(c, tm.n()), |rows| {
                    w.rows_into(isa, xs, a, t, rows, |ti, r, v| {
                        x.set(ti * c + r, x.get(ti * c + r) + v)
                    });
                });
                tm.barrier();
            }
            Some(ro) => {
                tm.for_chunks(c, chunk_rows(c, tm.n()), |rows| {
                    w.rows_into(isa, xs, a, t, rows, |ti, r, v| rot.set(ti * c + r, v));
                });
                tm.barrier();
                let mine = tm.split(t, 1);
                ro.apply_t_rows(rot.slice_mut(mine.start * c, mine.len() * c));
                for i in mine {
                    for (j, v) in rot.slice(i * c, c).iter().enumerate() {
                        x.set(i * c + j, x.get(i * c + j) + v);
                    }
                }
                tm.barrier();
            }
        }
    };

    team::run(layers * 5 + 1, |tm| unsafe {
        let mut clock = profile::Clock::new(tm.id() == 0);
        for l in 0..layers {
            let lw = &views[l * 7..l * 7 + 7];
            let (wq, wk, wv, wo, wg, wu, wd) =
                (&lw[0], &lw[1], &lw[2], &lw[3], &lw[4], &lw[5], &lw[6]);
            // A
            let li = l * 7;
            norm_phase(
                tm,
                &consts.attn_norm[l],
                wq.wants_blocks() || wk.wants_blocks() || wv.wants_blocks(),
                rin[li],
            );
            clock.lap(profile::Op::Norm);
            // B
            {
                let xs = xn.slice(0, t * c);
                let a = acts.slice(0, t * c / BLOCK);
                let bias = consts.qkv_bias[l].as_deref();
                tm.for_chunks(qkv_w, chunk_rows(qkv_w, tm.n()), |rows| {
                    for (w, off) in [(wq, 0), (wk, hd), (wv, hd + kd)] {
                        let lo = rows.start.max(off);
                        let hi = rows.end.min(off + w.rows());
                        if lo >= hi {
                            continue;
                        }
                        w.rows_into(isa, xs, a, t, lo - off..hi - off, |ti, r, v| {
                            let j = off + r;
                            qkv.set(ti * qkv_w + j, v + bias.map_or(0.0, |b| b[j]));
                        });
                    }
                });
                tm.barrier();
                // Output rotations: q, k, v per token, before RoPE (the bias was added to the
                // product: undo and redo it around the rotation).
                if rout[li..li + 3].iter().any(|r| r.is_some()) {
                    let mine = tm.split(t, 1);
                    let mut seg = Vec::new();
                    let parts = [(0, hd), (hd, kd), (hd + kd, kd)];
                    for (m, (off, n)) in parts.into_iter().enumerate() {
                        let Some(ro) = rout[li + m] else { continue };
                        // This member's tokens' segments, rotated together and put back.
                        seg.clear();
                        for i in mine.clone() {
                            seg.extend_from_slice(qkv.slice(i * qkv_w + off, n));
                            if let Some(b) = bias {
                                let k = seg.len() - n;
                                seg[k..]
                                    .iter_mut()
                                    .zip(&b[off..off + n])
                                    .for_each(|(v, b)| *v -= b);
                            }
                        }
                        ro.apply_t_rows(&mut seg);
                        for (k, i) in mine.clone().enumerate() {
                            let out = qkv.slice_mut(i * qkv_w + off, n);
                            out.copy_from_slice(&seg[k * n..(k + 1) * n]);
                            if let Some(b) = bias {
                                out.iter_mut()
                                    .zip(&b[off..off + n])
                                    .for_each(|(v, b)| *v += b);
                            }
                        }
                    }
                    tm.barrier();
                }
            }
            clock.lap(profile::Op::Qkv);
            // C
            for item in tm.split(t * (h + kh), 1) {
                if item < t * h {
                    let (i, hq) = (item / h, item % h);
                    let q = qkv.slice_mut(i * qkv_w + hq * d, d);
                    ops::rope(
                        q,
                        &cos[i * half..(i + 1) * half],
                        &sin[i * half..(i + 1) * half],
                    );
                } else {
                    let j = item - t * h;
                    let (i, hk) = (j / kh, j % kh);
                    let k = qkv.slice_mut(i * qkv_w + hd + hk * d, d);
                    ops::rope(
                        k,
                        &cos[i * half..(i + 1) * half],
                        &sin[i * half..(i + 1) * half],
                    );
                    let slot = l * kh + hk;
                    for (c, &v) in k.iter().enumerate() {
                        keys[slot].set(attn::key_index(p0 + i, c, d), v);
                    }
                    values[slot]
                        .slice_mut((p0 + i) * d, d)
                        .copy_from_slice(qkv.slice(i * qkv_w + hd + kd + hk * d, d));
                }
            }
            tm.barrier();
            clock.lap(profile::Op::Rope);
            // D: up to MAX_QUERIES consecutive tokens of one head share each key/value load.
            let qb = attn::MAX_QUERIES;
            let items = t.div_ceil(qb) * h;
            tm.for_chunks(items, (items / (tm.n() * 8)).max(1), |r| {
                let sc = scores.slice_mut(tm.id() * scratch, scratch);
                for item in r {
                    let (bi, hq) = (item / h, item % h);
                    let slot = l * kh + hq / g;
                    let tokens = bi * qb..((bi + 1) * qb).min(t);
                    let n = p0 + tokens.end; // positions the last query sees
                    let mut qs = [&[][..]; attn::MAX_QUERIES];
                    let mut lens = [0usize; attn::MAX_QUERIES];
                    let mut skips: [std::ops::Range<usize>; attn::MAX_QUERIES] = Default::default();
                    let mut outs: [&mut [f32]; attn::MAX_QUERIES] = Default::default();
                    for (k, i) in tokens.clone().enumerate() {
                        qs[k] = qkv.slice(i * qkv_w + hq * d, d);
                        lens[k] = p0 + i + 1;
                        skips[k] = p0 + trunk..p0 + trunk + gap[i];
                        outs[k] = att.slice_mut(i * hd + hq * d, d);
                    }
                    let nq = tokens.len();
                    attn::attend_skipping(
                        isa,
                        &qs[..nq],
                        &lens[..nq],
                        &skips[..nq],
                        keys[slot].slice(0, attn::key_buffer_len(n, d)),
                        values[slot].slice(0, n * d),
                        scale,
                        sc,
                        &mut outs[..nq],
                    );
                }
            });
            tm.barrier();
            if wo.wants_blocks() {
                let mine = tm.split(t, 1);
                if let Some(r) = rin[li + 3] {
                    r.apply_rows(att.slice_mut(mine.start * hd, mine.len() * hd));
                }
                for i in mine {
                    quantize_into(
                        att.slice(i * hd, hd),
                        acts.slice_mut(i * (hd / BLOCK), hd / BLOCK),
                    );
                }
                tm.barrier();
            }
            clock.lap(profile::Op::Attention);
            // E
            residual_phase(tm, wo, rout[li + 3], att, acts);
            clock.lap(profile::Op::O);
            // F
            norm_phase(
                tm,
                &consts.mlp_norm[l],
                wg.wants_blocks() || wu.wants_blocks(),
                rin[li + 4],
            );
            clock.lap(profile::Op::Norm);
            // G
            if rout[li + 4].is_some() || rout[li + 5].is_some() || rin[li + 6].is_some() {
                // Rotations span whole rows: products first, then per token the output
                // rotations, silu·up, the down projection's input rotation and quantization.
                let xs = xn.slice(0, t * c);
                let a = acts.slice(0, t * c / BLOCK);
                tm.for_chunks(f, chunk_rows(f, tm.n()), |rows| {
                    wg.rows_into(isa, xs, a, t, rows.clone(), |ti, r, v| {
                        gate.set(ti * f + r, v)
                    });
                    wu.rows_into(isa, xs, a, t, rows, |ti, r, v| up.set(ti * f + r, v));
                });
                tm.barrier();
                let mine = tm.split(t, 1);
                let (g0, len) = (mine.start * f, mine.len() * f);
                if let Some(r) = rout[li + 4] {
                    r.apply_t_rows(gate.slice_mut(g0, len));
                }
                if let Some(r) = rout[li + 5] {
                    r.apply_t_rows(up.slice_mut(g0, len));
                }
                for ti in mine.clone() {
                    ops::silu_mul(isa, gate.slice_mut(ti * f, f), up.slice(ti * f, f));
                }
                if let Some(r) = rin[li + 6] {
                    r.apply_rows(gate.slice_mut(g0, len));
                }
                for ti in mine {
                    let gr = gate.slice(ti * f, f);
                    if wd.wants_blocks() {
                        quantize_into(gr, acts_ffn.slice_mut(ti * (f / BLOCK), f / BLOCK));
                    }
                }
                tm.barrier();
            } else {
                let xs = xn.slice(0, t * c);
                let a = acts.slice(0, t * c / BLOCK);
                let down_blocks = wd.wants_blocks();
                tm.for_chunks(f, chunk_rows(f, tm.n()), |rows| {
                    let (r0, nr) = (rows.start, rows.len());
                    wg.rows_into(isa, xs, a, t, rows.clone(), |ti, r, v| {
                        gate.set(ti * f + r, v)
                    });
                    wu.rows_into(isa, xs, a, t, rows.clone(), |ti, r, v| {
                        up.set(ti * f + r, v)
                    });
                    for ti in 0..t {
                        let gr = gate.slice_mut(ti * f + r0, nr);
                        ops::silu_mul(isa, gr, up.slice(ti * f + r0, nr));
                        if down_blocks {
                            let fb = f / BLOCK;
                            quantize_into(gr, acts_ffn.slice_mut(ti * fb + r0 / BLOCK, nr / BLOCK));
                        }
                    }
                });
                tm.barrier();
            }
            clock.lap(profile::Op::GateUp);
            // H
            residual_phase(tm, wd, rout[li + 6], gate, acts_ffn);
            clock.lap(profile::Op::Down);
        }
        // Final norm and head.
        let head = &views[layers * 7];
        match want {
            Want::Hidden => {
                for i in tm.split(t, 1) {
                    ops::rmsnorm(
                        x.slice(i * c, c),
                        &consts.norm,
                        consts.eps,
                        out.slice_mut(i * c, c),
                    );
                }
            }
            Want::LastLogits => {
                let i = t - 1;
                if tm.id() == 0 {
                    let xo = xn.slice_mut(0, c);
                    ops::rmsnorm(x.slice(i * c, c), &consts.norm, consts.eps, xo);
                    if head.wants_blocks() {
                        quantize_into(xo, acts.slice_mut(0, c / BLOCK));
                    }
                }
                tm.barrier();
                let xs = xn.slice(0, c);
                let a = acts.slice(0, if head.wants_blocks() { c / BLOCK } else { 0 });
                tm.for_chunks(vocab, chunk_rows(vocab, tm.n()), |rows| {
                    head.rows_into(isa, xs, a, 1, rows, |_, r, v| out.set(r, v));
                });
                tm.barrier();
            }
        }
        clock.lap(profile::Op::Head);
    });
    drop(keys);
    drop(values);
    cache.len = total;
    Ok(std::mem::take(&mut cache.s.out))
}

/// Checks that the layers reading one input share its rotation (q/k/v; gate/up) and that the
/// output layer has none: the forward rotates each input once.
pub(crate) fn check_rotations(rin: &[Option<&Rotation>], layers: usize) -> Result<()> {
    for l in 0..layers {
        let r = &rin[l * 7..l * 7 + 7];
        if r[0] != r[1] || r[0] != r[2] || r[4] != r[5] {
            return Err(Error::Unsupported(format!(
                "layer {l}: layers reading one input have different input rotations"
            )));
        }
    }
    if rin.get(layers * 7).is_some_and(|r| r.is_some()) {
        return Err(Error::Unsupported("a rotated output layer".into()));
    }
    Ok(())
}

/// `(n, vocab)` logits of `n` final-normed hidden rows `(n, c)` on the thread team (many rows
/// at once: scoring a continuation).
pub(crate) fn head_logits(
    head: &KernelData,
    rows: &[f32],
    c: usize,
    vocab: usize,
) -> Result<Vec<f32>> {
    let n = rows.len() / c.max(1);
    if c == 0 || rows.len() != n * c || !c.is_multiple_of(BLOCK) {
        return Err(Error::Unsupported(format!(
            "native head: {} values for hidden {c}",
            rows.len()
        )));
    }
    let head = head.view()?;
    let isa = lmkit_kernels::isa();
    let mut acts = vec![
        A8Block::default();
        if head.wants_blocks() {
            n * c / BLOCK
        } else {
            0
        }
    ];
    if head.wants_blocks() {
        for (x, a) in rows.chunks_exact(c).zip(acts.chunks_exact_mut(c / BLOCK)) {
            quantize_into(x, a);
        }
    }
    let mut out = vec![0f32; n * vocab];
    let o = SharedMut::new(&mut out);
    team::run(1, |tm| {
        // SAFETY: chunks are disjoint weight rows, so each output index is written once.
        tm.for_chunks(vocab, chunk_rows(vocab, tm.n()), |r| unsafe {
            head.rows_into(isa, rows, &acts, n, r, |ti, r, v| o.set(ti * vocab + r, v));
        });
    });
    Ok(out)
}

/// Wall-clock time per kind of operation inside the native forward pass, summed over calls
/// while enabled (for `lmkit bench --kernel-report`). Member 0 of the team reads the clock at
/// the end of each phase, after its barrier, so a phase's time includes waiting for the
/// slowest member: it is the time the whole team spends in it.
pub mod profile {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    /// Operation kinds, in forward order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Op {
        Norm,
        Qkv,
        Rope,
        Attention,
        O,
        GateUp,
        Down,
        Head,
    }

    impl Op {
        pub const ALL: [Op; 8] = [
            Op::Norm,
            Op::Qkv,
            Op::Rope,
            Op::Attention,
            Op::O,
            Op::GateUp,
            Op::Down,
            Op::Head,
        ];

        pub fn name(self) -> &'static str {
            match self {
                Op::Norm => "rmsnorm + quantize",
                Op::Qkv => "q/k/v matmul",
                Op::Rope => "rope + kv store",
                Op::Attention => "attention (+ quantize)",
                Op::O => "o matmul + residual",
                Op::GateUp => "gate/up matmul + silu",
                Op::Down => "down matmul + residual",
                Op::Head => "final norm + lm head",
            }
        }
    }

    static ENABLED: AtomicBool = AtomicBool::new(false);
    static NANOS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

    /// Turns timing on or off and clears the totals.
    pub fn enable(on: bool) {
        for n in &NANOS {
            n.store(0, Ordering::Relaxed);
        }
        ENABLED.store(on, Ordering::Relaxed);
    }

    /// Seconds per operation since [`enable`].
    pub fn totals() -> Vec<(Op, f64)> {
        Op::ALL
            .iter()
            .map(|&op| (op, NANOS[op as usize].load(Ordering::Relaxed) as f64 * 1e-9))
            .collect()
    }

    pub(crate) struct Clock {
        last: Option<Instant>,
    }

    impl Clock {
        pub(crate) fn new(leader: bool) -> Self {
            let on = leader && ENABLED.load(Ordering::Relaxed);
            Self {
                last: on.then(Instant::now),
            }
        }

        #[inline]
        pub(crate) fn lap(&mut self, op: Op) {
            if let Some(last) = self.last {
                let now = Instant::now();
                NANOS[op as usize].fetch_add((now - last).as_nanos() as u64, Ordering::Relaxed);
                self.last = Some(now);
            }
        }
    }
}
