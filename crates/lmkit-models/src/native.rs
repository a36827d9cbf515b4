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
    /// Entries per slot (every slot holds the same number).
    len: usize,
    /// Tokens seen: the next token's position. Equals `len` until a policy evicts.
    pos: usize,
    /// Per slot, each entry's position; kept only once `track` is set (an eviction policy).
    positions: Vec<Vec<u32>>,
    /// Per `layer · heads + query head`, the attention each entry has received (H2O's score).
    scores: Vec<Vec<f32>>,
    heads: usize,
    kv_heads: usize,
    track: bool,
    score: bool,
    /// Most bytes keys and values held at once (see [`NativeCache::bytes_used`]).
    peak: usize,
    /// Planned sequence length (what a budget share resolves against; 0: unknown).
    planned: usize,
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
    pub(crate) fn new(layers: usize, heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            head_dim,
            keys: vec![Vec::new(); layers * kv_heads],
            values: vec![Vec::new(); layers * kv_heads],
            len: 0,
            pos: 0,
            positions: vec![Vec::new(); layers * kv_heads],
            scores: vec![Vec::new(); layers * heads],
            heads,
            kv_heads,
            track: false,
            score: false,
            peak: 0,
            planned: 0,
            s: Scratch::default(),
        }
    }

    /// Tokens seen so far (the next position).
    #[allow(clippy::misnamed_getters)]
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Entries each (layer, KV head) holds: [`NativeCache::len`] until a policy evicts.
    pub fn entries(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Keeps each entry's position (and, with `scores`, its accumulated attention) so a policy
    /// can evict. Set before the first token.
    pub(crate) fn track(&mut self, scores: bool) {
        if self.pos == 0 {
            self.track = true;
            self.score = scores;
        }
    }

    /// Drops positions from `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.pos {
            return;
        }
        if !self.track {
            // The entries are the consecutive positions `pos − len .. pos`.
            let base = self.pos - self.len;
            self.cut(len.saturating_sub(base));
        } else {
            // Evicted entries are in no order: drop those at positions `len..` one by one.
            for slot in 0..self.positions.len() {
                let gone: Vec<usize> = (0..self.len)
                    .rev()
                    .filter(|&e| self.positions[slot][e] as usize >= len)
                    .collect();
                for e in gone {
                    self.swap_remove(slot, e);
                }
            }
            // Every slot held one entry per position it kept; a slot can now hold fewer than
            // another, so cut all to the smallest (dropping their oldest).
            let keep = (0..self.positions.len())
                .map(|sl| self.slot_len(sl))
                .min()
                .unwrap_or(0);
            for slot in 0..self.positions.len() {
                while self.slot_len(slot) > keep {
                    let e = (0..self.slot_len(slot))
                        .min_by_key(|&e| self.positions[slot][e])
                        .unwrap_or(0);
                    self.swap_remove(slot, e);
                }
            }
            self.cut(keep);
        }
        self.pos = len;
    }

    fn slot_len(&self, slot: usize) -> usize {
        self.positions[slot].len().min(self.len)
    }

    /// Keeps the first `len` entries of every slot.
    fn cut(&mut self, len: usize) {
        self.len = len;
        let n = len * self.head_dim;
        let nk = attn::key_buffer_len(len, self.head_dim);
        self.keys.iter_mut().for_each(|k| k.truncate(nk));
        self.values.iter_mut().for_each(|v| v.truncate(n));
        self.positions.iter_mut().for_each(|p| p.truncate(len));
        self.scores.iter_mut().for_each(|p| p.truncate(len));
    }

    /// Moves entry `last` of `slot` into `e` (keys, values, positions and its query heads'
    /// scores) and shortens the slot's position list; the caller fixes `len`.
    fn swap_remove(&mut self, slot: usize, e: usize) {
        let d = self.head_dim;
        let last = self.positions[slot].len() - 1;
        if e != last {
            let k = &mut self.keys[slot];
            for c in 0..d {
                k[attn::key_index(e, c, d)] = k[attn::key_index(last, c, d)];
            }
            self.values[slot].copy_within(last * d..(last + 1) * d, e * d);
            self.positions[slot][e] = self.positions[slot][last];
        }
        self.positions[slot].pop();
        let g = self.heads / self.kv_heads;
        let (l, hk) = (slot / self.kv_heads, slot % self.kv_heads);
        for hq in hk * g..(hk + 1) * g {
            let sc = &mut self.scores[l * self.heads + hq];
            if last < sc.len() {
                sc[e] = sc[last];
                sc.truncate(last);
            }
        }
    }

    /// Evicts entries `policy` chooses until every slot is within its capacity.
    pub(crate) fn evict(&mut self, policy: &dyn crate::KvPolicy) {
        let cap = policy.capacity(self.pos, self.planned);
        if self.len <= cap || !self.track {
            return;
        }
        let n = self.len - cap;
        let kv_heads = self.kv_heads;
        let g = self.heads / kv_heads;
        let mut sum = Vec::new();
        let mut out = Vec::new();
        for slot in 0..self.keys.len() {
            let (l, hk) = (slot / kv_heads, slot % kv_heads);
            if self.score {
                sum.clear();
                sum.resize(self.len, 0.0f32);
                for hq in hk * g..(hk + 1) * g {
                    for (s, v) in sum.iter_mut().zip(&self.scores[l * self.heads + hq]) {
                        *s += v;
                    }
                }
            }
            out.clear();
            let view = crate::kv_policy::HeadView {
                positions: &self.positions[slot][..self.len],
                scores: self.score.then_some(&sum[..]),
                seen: self.pos,
            };
            policy.evict(&view, n, &mut out);
            out.sort_unstable();
            out.dedup();
            out.retain(|&e| e < self.len);
            // Exactly `n` per slot, so every slot keeps one length: top up with the oldest.
            if out.len() < n {
                let rest: Vec<usize> = (0..self.len)
                    .filter(|e| out.binary_search(e).is_err())
                    .collect();
                let mut by_age = rest.clone();
                by_age.sort_by_key(|&e| self.positions[slot][e]);
                out.extend(by_age.into_iter().take(n - out.len()));
                out.sort_unstable();
            }
            for &e in out.iter().take(n).rev() {
                self.swap_remove(slot, e);
            }
        }
        self.cut(cap);
    }

    /// A copy of the keys and values (not the scratch buffers), for a prefix cache.
    pub(crate) fn snapshot(&self) -> Self {
        Self {
            head_dim: self.head_dim,
            keys: self.keys.clone(),
            values: self.values.clone(),
            len: self.len,
            pos: self.pos,
            positions: self.positions.clone(),
            scores: self.scores.clone(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            track: self.track,
            score: self.score,
            peak: self.peak,
            planned: self.planned,
            s: Scratch::default(),
        }
    }

    pub(crate) fn plan(&mut self, len: usize) {
        self.planned = len;
    }

    /// Starts an empty cache at position `pos` (its first token takes that position).
    pub(crate) fn start_at(&mut self, pos: usize) -> bool {
        if self.pos != 0 {
            return false;
        }
        self.pos = pos;
        true
    }

    /// Each entry's position and accumulated attention (summed over the query heads that read
    /// it) in (`layer`, `kv_head`), when scores are kept.
    pub fn head_scores(&self, layer: usize, kv_head: usize) -> Option<(Vec<u32>, Vec<f32>)> {
        if !self.score || kv_head >= self.kv_heads {
            return None;
        }
        let slot = layer * self.kv_heads + kv_head;
        let positions = self.positions.get(slot)?[..self.len].to_vec();
        let g = self.heads / self.kv_heads;
        let mut sum = vec![0f32; self.len];
        for hq in kv_head * g..(kv_head + 1) * g {
            for (s, v) in sum
                .iter_mut()
                .zip(self.scores.get(layer * self.heads + hq)?)
            {
                *s += v;
            }
        }
        Some((positions, sum))
    }

    /// Bytes keys and values hold now (entries in use, not spare capacity).
    pub fn bytes_used(&self) -> usize {
        (self
            .keys
            .iter()
            .chain(&self.values)
            .map(|b| b.len())
            .sum::<usize>())
            * 4
    }

    /// The most [`NativeCache::bytes_used`] has been, including the entries a forward call adds
    /// before its eviction.
    pub fn peak_bytes(&self) -> usize {
        self.peak
    }

    pub fn clear(&mut self) {
        self.cut(0);
        self.pos = 0;
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
    let t = embedded.len() / dims.hidden.max(1);
    forward_seqs(
        dims,
        consts,
        weights,
        embedded,
        &mut [cache],
        &[t],
        want,
        branches,
        None,
    )
}

/// Scratch buffers for batched calls, owned by the caller (a serving engine), so no sequence's
/// cache keeps buffers sized for the largest batch it once led.
#[derive(Debug, Default)]
pub struct BatchScratch(Scratch);

/// Several sequences in one call (continuous batching): `counts[s]` consecutive tokens of
/// `embedded` continue `caches[s]`. Every matrix product runs once over all the tokens; each
/// token attends only to its own sequence's cache. With [`Want::LastLogits`] the result is the
/// logits of each sequence's last token, `(sequences, v)`. `buffers` (else the first cache's
/// scratch buffers) serve the call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_seqs(
    dims: Dims,
    consts: &Consts,
    weights: &[KernelData],
    embedded: &[f32],
    caches: &mut [&mut NativeCache],
    counts: &[usize],
    want: Want,
    branches: &[usize],
    buffers: Option<&mut BatchScratch>,
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
    let nseq = caches.len();
    if nseq == 0
        || counts.len() != nseq
        || counts.contains(&0)
        || counts.iter().sum::<usize>() != t
        || (nseq > 1 && !branches.is_empty())
    {
        return Err(Error::Unsupported(format!(
            "native forward: {t} tokens split as {counts:?} over {nseq} caches"
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
    // Per sequence: first token, cached entries, next position; per token: its sequence.
    let mut starts = Vec::with_capacity(nseq);
    let mut sid = Vec::with_capacity(t);
    for (k, &n) in counts.iter().enumerate() {
        starts.push(sid.len());
        sid.extend(std::iter::repeat_n(k, n));
    }
    let p0s: Vec<usize> = caches.iter().map(|c| c.len).collect();
    let pos0s: Vec<usize> = caches.iter().map(|c| c.pos).collect();
    if caches[0].track && !branches.is_empty() {
        return Err(Error::Unsupported(
            "a KV cache with an eviction policy cannot run a token tree".into(),
        ));
    }
    let members = rayon::current_num_threads().max(1);

    // Buffers: sized once per shape, reused across calls.
    let mut longest = 0;
    for (k, cache) in caches.iter_mut().enumerate() {
        let (p0, pos0, n) = (p0s[k], pos0s[k], counts[k]);
        let total = p0 + n;
        longest = longest.max(total);
        for b in cache.keys.iter_mut() {
            b.resize(attn::key_buffer_len(total, d), 0.0);
        }
        for b in cache.values.iter_mut() {
            b.resize(total * d, 0.0);
        }
        if cache.track {
            for p in cache.positions.iter_mut() {
                p.extend((pos0..pos0 + n).map(|p| p as u32));
            }
        }
        if cache.score {
            for sc in cache.scores.iter_mut() {
                sc.resize(total, 0.0);
            }
        }
    }
    let score_of: Vec<bool> = caches.iter().map(|c| c.score).collect();
    let score = score_of.iter().any(|&s| s);
    let scratch = attn::scratch_len(attn::MAX_QUERIES, longest);
    let (mut scratch_bufs, scratch_back) = match buffers {
        Some(b) => (std::mem::take(&mut b.0), Some(b)),
        None => (std::mem::take(&mut caches[0].s), None),
    };
    let s = &mut scratch_bufs;
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
        let p = pos0s[sid[i]] + i - starts[sid[i]] - gp;
        for &fr in &consts.inv_freq {
            let a = p as f32 * fr;
            s.cos.push(a.cos());
            s.sin.push(a.sin());
        }
    }
    let out_len = match want {
        Want::Hidden => t * c,
        Want::LastLogits => nseq * vocab,
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
    let shared = |v: &mut Vec<Vec<f32>>| -> Vec<SharedMut<f32>> {
        v.iter_mut().map(|b| SharedMut::new(b)).collect()
    };
    let mut keys = Vec::with_capacity(nseq);
    let mut values = Vec::with_capacity(nseq);
    let mut acc = Vec::with_capacity(nseq);
    for cache in caches.iter_mut() {
        keys.push(shared(&mut cache.keys));
        values.push(shared(&mut cache.values));
        acc.push(shared(&mut cache.scores));
    }
    // Attention work: runs of up to MAX_QUERIES consecutive tokens of one sequence.
    let qb = attn::MAX_QUERIES;
    let mut blocks: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    for (k, (&st, &n)) in starts.iter().zip(counts).enumerate() {
        let mut i = st;
        while i < st + n {
            let e = (i + qb).min(st + n);
            blocks.push((k, i..e));
            i = e;
        }
    }
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
                    let sq = sid[i];
                    let at = p0s[sq] + i - starts[sq];
                    for (c, &v) in k.iter().enumerate() {
                        keys[sq][slot].set(attn::key_index(at, c, d), v);
                    }
                    values[sq][slot]
                        .slice_mut(at * d, d)
                        .copy_from_slice(qkv.slice(i * qkv_w + hd + kd + hk * d, d));
                }
            }
            tm.barrier();
            clock.lap(profile::Op::Rope);
            // D: up to MAX_QUERIES consecutive tokens of one head share each key/value load.
            let nb = blocks.len();
            let items = nb * h;
            // With scores (H2O) one member takes all of a head's queries, so each query head's
            // accumulator has one writer: items go head-major in chunks of a whole head.
            let chunk = if score {
                nb
            } else {
                (items / (tm.n() * 8)).max(1)
            };
            tm.for_chunks(items, chunk, |r| {
                let sc = scores.slice_mut(tm.id() * scratch, scratch);
                for item in r {
                    let (bi, hq) = if score {
                        (item % nb, item / nb)
                    } else {
                        (item / h, item % h)
                    };
                    let slot = l * kh + hq / g;
                    let (sq, tokens) = (blocks[bi].0, blocks[bi].1.clone());
                    let (p0, st) = (p0s[sq], starts[sq]);
                    let n = p0 + tokens.end - st; // positions the last query sees
                    let mut qs = [&[][..]; attn::MAX_QUERIES];
                    let mut lens = [0usize; attn::MAX_QUERIES];
                    let mut skips: [std::ops::Range<usize>; attn::MAX_QUERIES] = Default::default();
                    let mut outs: [&mut [f32]; attn::MAX_QUERIES] = Default::default();
                    for (k, i) in tokens.clone().enumerate() {
                        qs[k] = qkv.slice(i * qkv_w + hq * d, d);
                        lens[k] = p0 + i - st + 1;
                        skips[k] = p0 + trunk..p0 + trunk + gap[i];
                        outs[k] = att.slice_mut(i * hd + hq * d, d);
                    }
                    let nq = tokens.len();
                    let sums = attn::attend_skipping(
                        isa,
                        &qs[..nq],
                        &lens[..nq],
                        &skips[..nq],
                        keys[sq][slot].slice(0, attn::key_buffer_len(n, d)),
                        values[sq][slot].slice(0, n * d),
                        scale,
                        sc,
                        &mut outs[..nq],
                    );
                    if score_of[sq] {
                        // H2O: add each query's attention row to its head's scores.
                        let a = acc[sq][l * h + hq].slice_mut(0, n);
                        let stride = n.next_multiple_of(attn::KEY_BLOCK);
                        for k in 0..nq {
                            let inv = 1.0 / sums[k];
                            let row = &sc[k * stride..k * stride + lens[k]];
                            a[..lens[k]]
                                .iter_mut()
                                .zip(row)
                                .for_each(|(a, &w)| *a += w * inv);
                        }
                    }
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
                // Each sequence's last token, gathered into rows 0..nseq.
                for k in tm.split(nseq, 1) {
                    let i = starts[k] + counts[k] - 1;
                    let xo = xn.slice_mut(k * c, c);
                    ops::rmsnorm(x.slice(i * c, c), &consts.norm, consts.eps, xo);
                    if head.wants_blocks() {
                        quantize_into(xo, acts.slice_mut(k * (c / BLOCK), c / BLOCK));
                    }
                }
                tm.barrier();
                let xs = xn.slice(0, nseq * c);
                let nblk = if head.wants_blocks() {
                    nseq * c / BLOCK
                } else {
                    0
                };
                let a = acts.slice(0, nblk);
                tm.for_chunks(vocab, chunk_rows(vocab, tm.n()), |rows| {
                    head.rows_into(isa, xs, a, nseq, rows, |ti, r, v| {
                        out.set(ti * vocab + r, v)
                    });
                });
                tm.barrier();
            }
        }
        clock.lap(profile::Op::Head);
    });
    drop(keys);
    drop(values);
    drop(acc);
    for (k, cache) in caches.iter_mut().enumerate() {
        cache.len = p0s[k] + counts[k];
        cache.pos = pos0s[k] + counts[k];
        cache.peak = cache.peak.max(cache.bytes_used());
    }
    let result = std::mem::take(&mut scratch_bufs.out);
    match scratch_back {
        Some(b) => b.0 = scratch_bufs,
        None => caches[0].s = scratch_bufs,
    }
    Ok(result)
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
