//! Decoding one token per sequence on a GPU as a short fixed chain of lmkit's own kernels
//! (`lmkit-core/cuda/decode.cu`), replayed as a CUDA graph.
//!
//! candle's eager ops spend about 35 kernels per block on one new token (norms, casts, copies,
//! cuBLAS GEMVs, the cache's concatenation), each with host-side work; at batch 1 that was
//! 0.23× llama.cpp's CUDA decoding. Here a block is seven launches on preallocated buffers:
//!
//! ```text
//! a  = RMSNorm(x) ⊙ w₁, qkv = [W_q; W_k; W_v] a (+ biases)
//!                                                   dec_gemv (one warp per output row; the
//!                                                   norm folded in: r·W(x ⊙ w₁))
//! q, k ← RoPE(pos); K[slot], V[slot] ← k, v         dec_rope_append
//! y  = softmax(q Kᵀ/√d) V over slots 0..=slot      dec_attn_part (blocks of 64 slots),
//!                                                   dec_attn_merge
//! x += W_o y                                        dec_gemv with the residual added in place
//! a  = RMSNorm(x) ⊙ w₂, m = silu(W_g a) ⊙ (W_u a)   dec_gateup (the norm folded in)
//! x += W_d m                                        dec_gemv
//! ```
//!
//! then the output layer with the final norm folded in. Every buffer is a tensor allocated once per
//! (batch, cache capacity), so the whole step is captured once into a CUDA graph and replayed:
//! the token ids are copied into their buffer before each replay, and the positions advance on
//! the device (uploaded only when they jump: a prompt, a rewind).
//!
//! The cache is the preallocated slab of [`KvCache::new_slab`](crate::KvCache): keys and values
//! `(b, kv_heads, cap, d)` in the compute dtype. Prompts (several tokens per call) run the
//! fused prompt pass of [`prompt`] where it applies (bf16/f16, heads of 64 or 128), else the
//! reference path; both write the same slab in place. Single-token calls of
//! [`Llama::forward_last`](crate::Llama::forward_last) come here.
//!
//! Without a GPU the tests run these kernels on lmkit's CUDA emulator (feature `cuda-emu`)
//! and compare the logits with the reference path's.
//!
//! Deviations from the reference path: activations stay f32 between the products (the
//! reference path rounds them to the compute dtype), RoPE's angles are computed on the device
//! in f32, and sums run in another order.

mod prompt;
mod weights;

use std::sync::{Arc, Mutex};

use lmkit_core::launch::{kernel_suffix, Arg, Graph, Launcher};
use lmkit_core::linear::Weight;
use lmkit_core::{DType, GgmlDType, Linear, Tensor};
use lmkit_kernels::matmul::QFormat;

use weights::{mat, unsupported_weight, Mat};

use crate::llama::BLOCK_LINEARS as LINEARS;
use crate::{Error, KvCache, Llama, Result};

/// Threads of the GEMV blocks (four warps, one output row each). The kernels are compiled with
/// `__launch_bounds__(128, …)`: a larger block would not launch.
const GEMV_THREADS: u32 = 128;
/// Threads of the tensor-core products' blocks: `TC_WARPS · 32` in decode.cu, which maps each
/// thread to one (sequence, row) of a 16 × 8 tile.
const TC_THREADS: u32 = 128;
/// Rows of x a GEMV launch takes at once (the kernels' largest batch template).
const MAX_NB: usize = 16;
/// Cached positions per attention block (`ATT_CH` in decode.cu).
const ATT_CH: usize = 64;

/// The kind of a weight the kernels read (`bf16`, `q8_0`, ...), or why they cannot.
fn kind_of(w: &Weight) -> std::result::Result<String, String> {
    if let Some(why) = unsupported_weight(w) {
        return Err(why);
    }
    Ok(match w {
        Weight::Dense(t) => format!("{:?}", t.dtype()),
        Weight::Packed(p) if p.format == QFormat::Q8_0 => "Q8_0".into(),
        Weight::Quantized(q) if q.dtype() == GgmlDType::Q8_0 => "Q8_0".into(),
        // Q4_0 and Q4_1 both run the Q4_1 kernels.
        _ => "Q4".into(),
    })
}

/// Why `model` cannot decode on the fused path; None when it can.
pub(crate) fn unsupported(model: &Llama) -> Option<String> {
    let cfg = model.config();
    let d = cfg.head_dim;
    if d == 0 || !d.is_multiple_of(2) || d > 256 {
        return Some(format!(
            "head dimension {d} (the kernels take even ones up to 256)"
        ));
    }
    if cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
        return Some("query heads not a multiple of the kv heads".into());
    }
    if Launcher::for_device(model.device()).is_none() {
        return Some("the model is not on a CUDA device".into());
    }
    if let Err(e) = kernel_suffix(model.dtype()) {
        return Some(e.to_string());
    }
    let check = || -> std::result::Result<(), String> {
        let linear = |l: &Linear, what: &str| -> std::result::Result<String, String> {
            if l.lora().is_some() {
                return Err(format!("{what} has a LoRA adapter"));
            }
            kind_of(l.weight()).map_err(|e| format!("{what}: {e}"))
        };
        for i in 0..cfg.num_layers {
            let mut kinds = Vec::with_capacity(7);
            for (j, n) in LINEARS.iter().enumerate() {
                let l = model
                    .linear(&format!("model.layers.{i}.{n}"))
                    .ok_or_else(|| format!("no layer {i}.{n}"))?;
                if l.bias().is_some() && j >= 3 {
                    return Err(format!("a bias on {n}"));
                }
                kinds.push(linear(l, n)?);
            }
            if kinds[0] != kinds[1] || kinds[1] != kinds[2] || kinds[4] != kinds[5] {
                return Err("q/k/v or gate/up weights of different types".into());
            }
        }
        let head = model.lm_head();
        linear(head, "lm_head")?;
        if head.bias().is_some() {
            return Err("an output layer with a bias".into());
        }
        kind_of(model.embed_weight()).map_err(|e| format!("the token embedding: {e}"))?;
        Ok(())
    };
    check().err()
}

/// One block's weights, with the tensors kept alive in [`FusedWeights::_keep`].
struct BlockWeights {
    n1: u64,
    n2: u64,
    /// q, k, v, o, gate, up, down.
    mats: [Mat; 7],
    bias: [u64; 3],
}

/// A model's weights as the kernels read them, built once per model (repacking quantized
/// weights takes a copy through the host) and shared by every cache's decoding step.
pub(crate) struct FusedWeights {
    blocks: Vec<BlockWeights>,
    embed: Mat,
    final_norm: u64,
    head: Mat,
    inv_freq: u64,
    /// The weights of the fused prompt pass, where it applies (`prompt`).
    prompt: Option<prompt::PromptWeights>,
    /// Set when the prompt pass failed on this device: prompts take candle's ops from then on.
    prompt_failed: std::sync::atomic::AtomicBool,
    /// Everything whose address a launch takes.
    _keep: Vec<Tensor>,
}

impl std::fmt::Debug for FusedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedWeights")
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl FusedWeights {
    fn new(model: &Llama, launcher: &Launcher) -> Result<Self> {
        if let Some(why) = unsupported(model) {
            return Err(Error::Unsupported(format!("fused decoding: {why}")));
        }
        let cfg = model.config();
        let dev = model.device();
        let mut keep: Vec<Tensor> = Vec::new();
        // Norm weights and biases as f32 vectors (the model's own when they are f32 already).
        let vector = |t: &Tensor, keep: &mut Vec<Tensor>| -> Result<u64> {
            let t = t.to_dtype(DType::F32)?.contiguous()?;
            let p = launcher.ptr(&t)?;
            keep.push(t);
            Ok(p)
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let (n1, n2) = model.block_norms(i)?;
            let mut mats = Vec::with_capacity(7);
            let mut bias = [0u64; 3];
            for (j, n) in LINEARS.iter().enumerate() {
                let l = model
                    .linear(&format!("model.layers.{i}.{n}"))
                    .ok_or_else(|| Error::Unsupported(format!("no layer {i}.{n}")))?;
                mats.push(mat(l.weight(), launcher, dev, &mut keep)?);
                if let (Some(b), Some(slot)) = (l.bias(), bias.get_mut(j)) {
                    *slot = vector(b, &mut keep)?;
                }
            }
            let mats: [Mat; 7] = mats
                .try_into()
                .map_err(|_| Error::Unsupported("seven linear layers per block".into()))?;
            blocks.push(BlockWeights {
                n1: vector(n1, &mut keep)?,
                n2: vector(n2, &mut keep)?,
                mats,
                bias,
            });
        }
        let embed = mat(model.embed_weight(), launcher, dev, &mut keep)?;
        let head = mat(model.lm_head().weight(), launcher, dev, &mut keep)?;
        let final_norm = vector(model.final_norm_weight(), &mut keep)?;
        let inv = Tensor::new(model.rope_inv_freq(), dev)?;
        let inv_freq = launcher.ptr(&inv)?;
        keep.push(inv);
        let prompt = match prompt::unsupported(model) {
            Some(why) => {
                tracing::debug!("prompts take candle's ops: {why}");
                None
            }
            None => match prompt::PromptWeights::new(model) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!("prompts take candle's ops: {e}");
                    None
                }
            },
        };
        Ok(Self {
            blocks,
            embed,
            final_norm,
            head,
            inv_freq,
            prompt,
            prompt_failed: Default::default(),
            _keep: keep,
        })
    }
}

/// Whether [`prompt_pass`] runs for `model` (see [`prompt`]).
pub(crate) fn prompt_applies(model: &Llama) -> bool {
    unsupported(model).is_none() && prompt::unsupported(model).is_none()
}

/// A prompt `ids (b, t)` through the fused prompt pass ([`prompt`]) over the slab `cache`: the
/// final hidden states `(b, t, c)` in the compute dtype, or None where the pass does not apply
/// (then the caller runs candle's ops).
pub(crate) fn prompt_pass(
    model: &Llama,
    cache: &mut KvCache,
    ids: &Tensor,
) -> Result<Option<Tensor>> {
    if !prompt_applies(model) {
        return Ok(None);
    }
    let Some(launcher) = Launcher::for_device(model.device()) else {
        return Ok(None);
    };
    let w = weights_of(model, &launcher)?;
    use std::sync::atomic::Ordering;
    let Some(pw) = w
        .prompt
        .as_ref()
        .filter(|_| !w.prompt_failed.load(Ordering::Relaxed))
    else {
        return Ok(None);
    };
    match prompt::run(model, pw, launcher, cache, ids) {
        Ok(h) => Ok(Some(h)),
        // A kernel the device refuses (say, flash attention on a GPU older than sm_80): the
        // cache's length did not move, and candle's ops take this and later prompts.
        Err(e) => {
            tracing::warn!("the fused prompt pass failed ({e}); prompts take candle's ops");
            w.prompt_failed.store(true, Ordering::Relaxed);
            Ok(None)
        }
    }
}

/// Builds the model's [`FusedWeights`] and loads the kernels ahead of the first step (which
/// a benchmark times).
pub(crate) fn prepare(model: &Llama) -> Result<()> {
    let launcher = Launcher::for_device(model.device())
        .ok_or_else(|| Error::Unsupported("fused decoding needs a CUDA device".into()))?;
    launcher.preload()?;
    weights_of(model, &launcher)?;
    // The weights were uploaded on this thread's stream; another thread (a server's engine)
    // may run the steps on its own.
    lmkit_core::device::synchronize(model.device())?;
    Ok(())
}

/// The model's [`FusedWeights`], built on first use and kept in the model (a clone of the
/// model starts without them).
fn weights_of(model: &Llama, launcher: &Launcher) -> Result<Arc<FusedWeights>> {
    let mut slot = model.fused_slot().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = slot.as_ref() {
        return Ok(w.clone());
    }
    let w = Arc::new(FusedWeights::new(model, launcher)?);
    *slot = Some(w.clone());
    Ok(w)
}

/// Where a model keeps its [`FusedWeights`]: empty until the first fused step, and empty
/// again in a clone (whose weights may then be replaced).
#[derive(Default)]
pub(crate) struct FusedSlot(Mutex<Option<Arc<FusedWeights>>>);

impl FusedSlot {
    pub(crate) fn lock(
        &self,
    ) -> std::sync::LockResult<std::sync::MutexGuard<'_, Option<Arc<FusedWeights>>>> {
        self.0.lock()
    }
}

impl Clone for FusedSlot {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for FusedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FusedSlot")
    }
}

/// The decoding step of one model over one slab (batch, capacity); rebuilt when either
/// changes.
pub(crate) struct FusedDecoder {
    launcher: Launcher,
    batch: usize,
    cap: usize,
    /// The KV cache's dtype in the kernels' names.
    kv_sfx: &'static str,
    weights: Arc<FusedWeights>,
    /// Per layer, the slab's keys and values.
    kv: Vec<(u64, u64)>,
    // Buffers.
    ids: Tensor,
    /// `[pos; b]` then `[slot; b]` (u32): one upload when they change, else advanced on the
    /// device by the step's last kernel.
    meta: Tensor,
    pos: Tensor,
    slot: Tensor,
    /// The (position, slot) that `meta` holds for the next step, when known.
    next: Option<(u32, u32)>,
    x: Tensor,
    qkv: Tensor,
    q: Tensor,
    att: Tensor,
    /// Attention's partial results: `(b·hq, cap / ATT_CH, d + 2)`.
    part: Tensor,
    m: Tensor,
    logits: Tensor,
    graph: Option<Graph>,
    /// Steps run so far (the first runs eagerly, loading the kernels; the second is captured).
    steps: usize,
    /// No graph: every step launches its kernels one by one.
    eager: bool,
    /// Which launches of 2-16 sequences take the tensor-core products (`dec_tgemv`,
    /// `dec_tgateup`; `dec_tq*` for Q8_0/Q4_1 blocks) where their shapes allow ([`Tc`]).
    tc: Tc,
}

impl std::fmt::Debug for FusedDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedDecoder")
            .field("batch", &self.batch)
            .field("cap", &self.cap)
            .field("graph", &self.graph.is_some())
            .finish()
    }
}

impl FusedDecoder {
    /// The step for `model` over the slab `kv` (per layer `(b, kh, cap, d)`).
    pub(crate) fn new(
        model: &Llama,
        kv: &[(Tensor, Tensor)],
        batch: usize,
        cap: usize,
    ) -> Result<Self> {
        let launcher = Launcher::for_device(model.device())
            .ok_or_else(|| Error::Unsupported("fused decoding needs a CUDA device".into()))?;
        let weights = weights_of(model, &launcher)?;
        let cfg = model.config();
        let dev = model.device();
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (hq, hk, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        if kv.len() != cfg.num_layers {
            return Err(Error::Kv(format!(
                "a slab of {} layers for a model of {}",
                kv.len(),
                cfg.num_layers
            )));
        }
        let kv_ptrs = kv
            .iter()
            .map(|(k, v)| Ok((launcher.ptr(k)?, launcher.ptr(v)?)))
            .collect::<Result<Vec<_>>>()?;
        let kv_dtype = kv.first().map(|(k, _)| k.dtype()).unwrap_or(model.dtype());
        let zeros = |n: usize, dt: DType| Tensor::zeros(n, dt, dev);
        let b = batch;
        let meta = zeros(2 * b, DType::U32)?;
        Ok(Self {
            batch,
            cap,
            kv_sfx: kernel_suffix(kv_dtype)?,
            weights,
            kv: kv_ptrs,
            ids: zeros(b, DType::U32)?,
            pos: meta.narrow(0, 0, b)?,
            slot: meta.narrow(0, b, b)?,
            meta,
            next: None,
            x: zeros(b * c, DType::F32)?,
            qkv: zeros(b * (hq + 2 * hk) * d, DType::F32)?,
            q: zeros(b * hq * d, DType::F32)?,
            att: zeros(b * hq * d, DType::F32)?,
            part: zeros(b * hq * cap.div_ceil(ATT_CH) * (d + 2), DType::F32)?,
            m: zeros(b * f, DType::F32)?,
            logits: zeros(b * v, DType::F32)?,
            graph: None,
            steps: 0,
            eager: false,
            tc: Tc::from_env(),
            launcher,
        })
    }

    /// Whether this step was built for `batch` sequences over a slab of `cap` positions, and
    /// for the model's current weights (a replaced layer or dtype makes new ones).
    pub(crate) fn fits(&self, model: &Llama, batch: usize, cap: usize) -> bool {
        let current = model
            .fused_slot()
            .lock()
            .map(|w| w.as_ref().is_some_and(|w| Arc::ptr_eq(w, &self.weights)))
            .unwrap_or(false);
        current && self.batch == batch && self.cap == cap
    }

    /// One step: token `ids[j]` (u32 on the model's device) of sequence j at RoPE position
    /// `pos` and cache slot `slot` (the same for every sequence); returns the logits
    /// `(b, vocab)` f32.
    pub(crate) fn step(
        &mut self,
        model: &Llama,
        ids: &Tensor,
        pos: usize,
        slot: usize,
    ) -> Result<Tensor> {
        let b = self.batch;
        if ids.elem_count() != b {
            return Err(Error::Kv(format!(
                "a fused step for {b} sequences got {} tokens",
                ids.elem_count()
            )));
        }
        if slot >= self.cap {
            return Err(Error::Kv(format!(
                "cache slot {slot} is past the slab's {} positions",
                self.cap
            )));
        }
        let dev = model.device();
        let as_u32 = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| Error::Kv(format!("{what} {v} is too large")))
        };
        let (pos, slot) = (as_u32(pos, "position")?, as_u32(slot, "slot")?);
        let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_device(dev)?;
        self.ids.slice_set(&ids, 0, 0)?;
        // Consecutive steps find the position already advanced on the device.
        if self.next.take() != Some((pos, slot)) {
            let mut meta = vec![pos; b];
            meta.resize(2 * b, slot);
            self.meta
                .slice_set(&Tensor::new(meta.as_slice(), dev)?, 0, 0)?;
        }
        match (&self.graph, self.steps) {
            (Some(g), _) => g.launch()?,
            // The first step runs eagerly (it loads the kernels); the second is captured.
            (None, 0) => self.launch_all(model)?,
            (None, _) if self.eager => self.launch_all(model)?,
            (None, _) => self.capture(model)?,
        }
        self.steps += 1;
        self.next = Some((pos + 1, slot + 1));
        Ok(self
            .logits
            .copy()?
            .reshape((b, model.config().vocab_size))?)
    }

    /// Records the step's launches into a CUDA graph and replays it; where capturing fails
    /// (or `LMKIT_CUDA_GRAPH=0`), this and later steps launch eagerly.
    fn capture(&mut self, model: &Llama) -> Result<()> {
        let graph: Result<Option<Graph>> =
            if std::env::var("LMKIT_CUDA_GRAPH").is_ok_and(|v| v == "0") {
                Ok(None)
            } else {
                match self.launcher.begin_capture() {
                    Ok(true) => {
                        let run = self.launch_all(model);
                        let graph = self.launcher.end_capture();
                        run.and(graph.map_err(Error::from))
                    }
                    Ok(false) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            };
        match graph {
            Ok(Some(g)) => {
                g.launch()?;
                self.graph = Some(g);
                return Ok(());
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("CUDA graph capture failed ({e}); launching eagerly"),
        }
        self.eager = true;
        self.launch_all(model)
    }

    /// The step's launches, in order.
    fn launch_all(&self, model: &Llama) -> Result<()> {
        let cfg = model.config();
        let l = &self.launcher;
        let b = self.batch;
        let (c, f, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (hq, hk, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let p = |t: &Tensor| l.ptr(t);
        let (ids, pos, slot) = (p(&self.ids)?, p(&self.pos)?, p(&self.slot)?);
        let (x, qkv, q, att, part, m, logits) = (
            p(&self.x)?,
            p(&self.qkv)?,
            p(&self.q)?,
            p(&self.att)?,
            p(&self.part)?,
            p(&self.m)?,
            p(&self.logits)?,
        );
        let bu = u32::try_from(b).map_err(|_| Error::Kv(format!("a batch of {b}")))?;
        let int = |v: usize, what: &str| Ok::<_, Error>(Arg::int(v, what)?);
        // Ids at or past the table's rows (or the vocabulary) give NaN rows on the device.
        let vocab_rows = model
            .embed_weight()
            .dims2()
            .map_or(cfg.vocab_size, |(rows, _)| rows.min(cfg.vocab_size));
        let embed_args = |w: &[Arg]| {
            let mut a = w.to_vec();
            a.extend([
                Arg::Ptr(ids),
                Arg::Ptr(x),
                Arg::int(c, "width")?,
                Arg::int(vocab_rows, "vocabulary")?,
            ]);
            Ok::<_, Error>(a)
        };
        let w = &*self.weights;
        match w.embed {
            Mat::Dense { w, sfx } => l.launch(
                &format!("dec_embed_{sfx}"),
                (bu, 1),
                256,
                &embed_args(&[Arg::Ptr(w)])?,
            )?,
            Mat::Quant { q, s, m, fmt } => l.launch(
                &format!("dec_qembed_{fmt}"),
                (bu, 1),
                256,
                &embed_args(&[Arg::Ptr(q), Arg::Ptr(s), Arg::Ptr(m)])?,
            )?,
        }
        let rope_threads = (d / 2).div_ceil(32).clamp(1, 8) as u32 * 32;
        let heads_grid = u32::try_from(hq + hk).map_err(|_| Error::Kv("too many heads".into()))?;
        let scale = 1.0 / (d as f32).sqrt();
        for (blk, &(kc, vc)) in w.blocks.iter().zip(&self.kv) {
            let [mq, mk, mv, mo, mg, mu, md] = blk.mats;
            // RMSNorm folded into the products that read it (see `dec_gemv`).
            self.gemv(
                [(mq, hq * d), (mk, hk * d), (mv, hk * d)],
                blk.bias,
                (x, c),
                Some((blk.n1, eps)),
                None,
                qkv,
            )?;
            l.launch(
                &format!("dec_rope_append_{}", self.kv_sfx),
                (bu, heads_grid),
                rope_threads,
                &[
                    Arg::Ptr(qkv),
                    Arg::Ptr(q),
                    Arg::Ptr(kc),
                    Arg::Ptr(vc),
                    Arg::Ptr(pos),
                    Arg::Ptr(slot),
                    Arg::Ptr(w.inv_freq),
                    int(hq, "heads")?,
                    int(hk, "kv heads")?,
                    int(d, "head dim")?,
                    int(self.cap, "capacity")?,
                ],
            )?;
            let bh = u32::try_from(b * hq).map_err(|_| Error::Kv("too many heads".into()))?;
            let splits = self.cap.div_ceil(ATT_CH);
            // A grid's y extent is at most 65,535 blocks.
            let sy = u32::try_from(splits)
                .ok()
                .filter(|&y| y <= 65_535)
                .ok_or_else(|| {
                    Error::Kv(format!("a cache of {} positions is too long", self.cap))
                })?;
            l.launch(
                &format!("dec_attn_part_{}", self.kv_sfx),
                (bh, sy),
                ATT_CH as u32,
                &[
                    Arg::Ptr(q),
                    Arg::Ptr(kc),
                    Arg::Ptr(vc),
                    Arg::Ptr(slot),
                    Arg::Ptr(part),
                    int(hq, "heads")?,
                    int(hk, "kv heads")?,
                    int(d, "head dim")?,
                    int(self.cap, "capacity")?,
                    int(splits, "splits")?,
                    Arg::F32(scale),
                ],
            )?;
            l.launch(
                "dec_attn_merge",
                (bh, 1),
                64,
                &[
                    Arg::Ptr(part),
                    Arg::Ptr(att),
                    int(hq, "heads")?,
                    int(d, "head dim")?,
                    int(splits, "splits")?,
                ],
            )?;
            self.gemv(
                [(mo, c), (mo, 0), (mo, 0)],
                [0; 3],
                (att, hq * d),
                None,
                Some(x),
                x,
            )?;
            self.gateup(mg, mu, (x, c), (blk.n2, eps), m, f)?;
            self.gemv(
                [(md, c), (md, 0), (md, 0)],
                [0; 3],
                (m, f),
                None,
                Some(x),
                x,
            )?;
        }
        self.gemv(
            [(w.head, vocab), (w.head, 0), (w.head, 0)],
            [0; 3],
            (x, c),
            Some((w.final_norm, eps)),
            None,
            logits,
        )?;
        // The next step's position and slot.
        l.launch(
            "dec_advance",
            (1, 1),
            64,
            &[Arg::Ptr(p(&self.meta)?), int(2 * b, "positions")?],
        )?;
        Ok(())
    }

    /// `y = [W₀; W₁; W₂] a (+ bias) (+ res)` for every sequence, in launches of up to
    /// [`MAX_NB`] sequences; `w` = (matrix, rows; rows 0 for an unused slot, which repeats
    /// the first matrix), `x = (address, k)`, `a = x` or with `norm = (weight, ε)` the
    /// RMSNorm of x. The three matrices share their kind (checked at load).
    fn gemv(
        &self,
        w: [(Mat, usize); 3],
        bias: [u64; 3],
        (x, k): (u64, usize),
        norm: Option<(u64, f32)>,
        res: Option<u64>,
        y: u64,
    ) -> Result<()> {
        let n: usize = w.iter().map(|(_, r)| r).sum();
        for (j0, nb) in chunks(self.batch) {
            let at = |base: u64, width: usize| base + (j0 * width * 4) as u64;
            let mut args = Vec::with_capacity(20);
            let (mut grid, mut threads) = (blocks_for(n)?, GEMV_THREADS);
            let name = match w[0].0 {
                Mat::Dense { sfx, .. } => {
                    let mut ptrs = vec![at(x, k), norm.map_or(0, |(p, _)| p)];
                    for (mat, _) in w {
                        let p = match mat {
                            Mat::Dense { w, .. } => w,
                            Mat::Quant { q, .. } => q,
                        };
                        ptrs.push(p);
                        args.push(Arg::Ptr(p));
                    }
                    let rows = w.map(|(_, r)| r);
                    let bf16 = sfx == "bf16"; // f16: see decode.cu (x·nw may pass f16's range)
                    if self.tc.applies(nb, false) && bf16 && tc_applies(nb, &rows, k, &ptrs) {
                        (grid, threads) = (tc_blocks(n)?, TC_THREADS);
                        format!("dec_tgemv_{sfx}")
                    } else {
                        format!("dec_gemv_{sfx}_{}", template_nb(nb))
                    }
                }
                Mat::Quant { fmt, .. } => {
                    let mut ptrs = vec![at(x, k), norm.map_or(0, |(p, _)| p)];
                    for part in 0..3 {
                        for (mat, _) in w {
                            let p = match (mat, part) {
                                (Mat::Quant { q, .. }, 0) => q,
                                (Mat::Quant { s, .. }, 1) => s,
                                (Mat::Quant { m, .. }, _) => m,
                                (Mat::Dense { w, .. }, _) => w,
                            };
                            if part == 0 {
                                ptrs.push(p);
                            }
                            args.push(Arg::Ptr(p));
                        }
                    }
                    let rows = w.map(|(_, r)| r);
                    if self.tc.applies(nb, true) && tc_applies(nb, &rows, k, &ptrs) {
                        (grid, threads) = (tc_blocks(n)?, TC_THREADS);
                        format!("dec_tqgemv_{fmt}")
                    } else {
                        format!("dec_qgemv_{fmt}_{}", template_nb(nb))
                    }
                }
            };
            for (_, rows) in w {
                args.push(Arg::int(rows, "rows")?);
            }
            args.extend(bias.iter().map(|&p| Arg::Ptr(p)));
            args.push(Arg::Ptr(at(x, k)));
            args.push(Arg::Ptr(res.map_or(0, |r| at(r, n))));
            args.push(Arg::Ptr(at(y, n)));
            args.push(Arg::int(k, "width")?);
            args.push(Arg::int(nb, "batch")?);
            args.push(Arg::Ptr(norm.map_or(0, |(w, _)| w)));
            args.push(Arg::F32(norm.map_or(0.0, |(_, eps)| eps)));
            self.launcher.launch(&name, (grid, 1), threads, &args)?;
        }
        Ok(())
    }

    /// `m = silu(W_g a) ⊙ (W_u a)`, `a` the RMSNorm of `x (b, k)` with `norm = (weight, ε)`,
    /// `m (b, n)`.
    fn gateup(
        &self,
        wg: Mat,
        wu: Mat,
        (x, k): (u64, usize),
        (nw, eps): (u64, f32),
        m: u64,
        n: usize,
    ) -> Result<()> {
        for (j0, nb) in chunks(self.batch) {
            let (mut grid, mut threads) = (blocks_for(n)?, GEMV_THREADS);
            let mut args = match (wg, wu) {
                (Mat::Dense { w: g, .. }, Mat::Dense { w: u, .. }) => {
                    vec![Arg::Ptr(g), Arg::Ptr(u)]
                }
                (
                    Mat::Quant {
                        q: qg,
                        s: sg,
                        m: mg,
                        ..
                    },
                    Mat::Quant {
                        q: qu,
                        s: su,
                        m: mu,
                        ..
                    },
                ) => [qg, qu, sg, su, mg, mu].map(Arg::Ptr).to_vec(),
                _ => {
                    return Err(Error::Unsupported(
                        "gate and up weights of different kinds".into(),
                    ))
                }
            };
            args.extend([
                Arg::Ptr(x + (j0 * k * 4) as u64),
                Arg::Ptr(m + (j0 * n * 4) as u64),
                Arg::int(n, "rows")?,
                Arg::int(k, "width")?,
                Arg::int(nb, "batch")?,
                Arg::Ptr(nw),
                Arg::F32(eps),
            ]);
            let xj = x + (j0 * k * 4) as u64;
            let name = match (wg, wu) {
                (Mat::Dense { sfx, w: g }, Mat::Dense { w: u, .. })
                    if self.tc.applies(nb, false)
                        && sfx == "bf16"
                        && tc_applies(nb, &[n], k, &[xj, nw, g, u]) =>
                {
                    (grid, threads) = (tc_blocks(n)?, TC_THREADS);
                    format!("dec_tgateup_{sfx}")
                }
                (Mat::Quant { fmt, q: g, .. }, Mat::Quant { q: u, .. })
                    if self.tc.applies(nb, true) && tc_applies(nb, &[n], k, &[xj, nw, g, u]) =>
                {
                    (grid, threads) = (tc_blocks(n)?, TC_THREADS);
                    format!("dec_tqgateup_{fmt}")
                }
                (Mat::Dense { sfx, .. }, _) => format!("dec_gateup_{sfx}_{}", template_nb(nb)),
                (Mat::Quant { fmt, .. }, _) => format!("dec_qgateup_{fmt}_{}", template_nb(nb)),
            };
            self.launcher.launch(&name, (grid, 1), threads, &args)?;
        }
        Ok(())
    }
}

/// Whether a launch of `nb` sequences takes the tensor-core products (`dec_tgemv`,
/// `dec_tgateup`, and `dec_tq*` for Q8_0/Q4_1 blocks; the caller checks the weights' kind):
/// 2-16 sequences, matrices of whole tiles of eight rows, `k` in chunks of 32, and every
/// buffer they read in 8- or 16-byte loads on a 16-byte boundary (`ptrs`; 0 for an absent one).
fn tc_applies(nb: usize, rows: &[usize], k: usize, ptrs: &[u64]) -> bool {
    (2..=MAX_NB).contains(&nb)
        && rows.iter().all(|r| r.is_multiple_of(8))
        && k.is_multiple_of(32)
        && ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// Blocks of the tensor-core products: one per eight output rows.
fn tc_blocks(n: usize) -> Result<u32> {
    u32::try_from(n / 8).map_err(|_| Error::Kv(format!("{n} output rows")))
}

/// When batched decoding's products run on tensor cores (`dec_t*`) rather than a warp per
/// output row: `LMKIT_DECODE_TC=0`/`off` never, `1`/`on` for any 2-16 sequences, and by default
/// from the batch where they were measured faster on an H200 (default model's shape,
/// docs/benchmarks.md): 8 sequences for bf16 weights (2 and 4 were 28% and 13% slower, 8 was
/// 16% faster, 16 was 1.9×), 4 for Q8_0/Q4_1 blocks (2 even, 4 17% faster, 8 1.7×, 16 2.5×).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tc {
    Off,
    Auto,
    On,
}

/// The default's smallest batch on tensor cores: dense weights, quantized blocks.
const TC_FROM_DENSE: usize = 8;
const TC_FROM_QUANT: usize = 4;

impl Tc {
    fn from_env() -> Self {
        Self::parse(&std::env::var("LMKIT_DECODE_TC").unwrap_or_default())
    }

    fn parse(v: &str) -> Self {
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Tc::Auto,
            "0" | "off" | "false" | "no" => Tc::Off,
            "1" | "on" | "true" | "yes" => Tc::On,
            other => {
                tracing::warn!("LMKIT_DECODE_TC={other}: expected 0/off, 1/on or auto; using auto");
                Tc::Auto
            }
        }
    }

    /// Whether a launch of `nb` sequences over dense (`quant` false) or quantized weights
    /// takes the tensor-core kernels (their shape conditions aside: [`tc_applies`]).
    fn applies(self, nb: usize, quant: bool) -> bool {
        match self {
            Tc::Off => false,
            Tc::On => true,
            Tc::Auto => nb >= if quant { TC_FROM_QUANT } else { TC_FROM_DENSE },
        }
    }
}

/// GEMV blocks for `n` output rows (one warp each).
fn blocks_for(n: usize) -> Result<u32> {
    u32::try_from(n.div_ceil((GEMV_THREADS / 32) as usize))
        .map_err(|_| Error::Kv(format!("{n} output rows")))
}

/// `(first sequence, count)` of each GEMV launch.
fn chunks(batch: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..batch)
        .step_by(MAX_NB)
        .map(move |j0| (j0, (batch - j0).min(MAX_NB)))
}

/// The smallest batch template of the kernels that holds `nb` rows.
fn template_nb(nb: usize) -> usize {
    nb.next_power_of_two().clamp(1, MAX_NB)
}

/// Whether fused decoding is on: the default on a GPU since it was measured there (2026-11-29,
/// H200: 7× candle's ops at batch 1, the same greedy tokens); `LMKIT_CUDA_DECODE=off` (or
/// `candle`) runs candle's ops instead.
pub(crate) fn wanted() -> bool {
    !std::env::var("LMKIT_CUDA_DECODE").is_ok_and(|v| matches!(v.as_str(), "off" | "candle" | "0"))
}

/// Whether fused decoding was asked for by name (`LMKIT_CUDA_DECODE=fused`): a model it does
/// not take is then worth a warning, not only a debug line.
pub(crate) fn asked() -> bool {
    std::env::var("LMKIT_CUDA_DECODE").is_ok_and(|v| v == "fused")
}

#[cfg(test)]
mod tc_tests {
    use super::Tc;

    /// The default takes tensor cores from 8 sequences on dense weights and from 4 on blocks;
    /// `on` from 2, `off` never.
    #[test]
    fn tensor_cores_from_the_measured_batch() {
        let auto: Vec<(usize, bool, bool)> = [2, 4, 7, 8, 16]
            .iter()
            .flat_map(|&nb| [(nb, false), (nb, true)])
            .map(|(nb, q)| (nb, q, Tc::Auto.applies(nb, q)))
            .collect();
        for (nb, q, on) in auto {
            assert_eq!(
                on,
                nb >= if q { 4 } else { 8 },
                "{nb} sequences, quantized {q}"
            );
        }
        assert!(Tc::On.applies(2, false) && !Tc::Off.applies(16, true));
        for (v, want) in [
            ("", Tc::Auto),
            ("auto", Tc::Auto),
            ("0", Tc::Off),
            (" OFF", Tc::Off),
            ("false", Tc::Off),
            ("1", Tc::On),
            ("Yes", Tc::On),
            ("maybe", Tc::Auto),
        ] {
            assert_eq!(Tc::parse(v), want, "{v:?}");
        }
    }
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use lmkit_core::{DType, Device, Tensor};

    use crate::testing::random_weights;
    use crate::{Llama, LlamaConfig, LoadOptions, WeightSource};

    /// Ids made on the device skip the host's check; an id outside the vocabulary must not
    /// read past the embedding table, and its logits come out NaN.
    #[test]
    fn device_ids_outside_the_vocabulary_give_nan_logits() -> crate::Result<()> {
        let cfg = LlamaConfig::tiny();
        let mut tensors = std::collections::HashMap::new();
        for (n, s, v) in random_weights(&cfg, 3) {
            tensors.insert(n, Tensor::from_vec(v, s, &Device::Cpu)?);
        }
        let opts = LoadOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        };
        let m = Llama::load(cfg.clone(), &WeightSource::Map(tensors), opts, &Device::Cpu)?;
        let mut cache = m.new_fused_cache()?;
        let step = |id: u32, cache: &mut crate::KvCache| -> crate::Result<Vec<f32>> {
            let ids = Tensor::new(&[[id]], &Device::Cpu)?;
            Ok(cache.fused_step(&m, 1, &ids)?.flatten_all()?.to_vec1()?)
        };
        assert!(step(5, &mut cache)?.iter().all(|v| v.is_finite()));
        let bad = step(cfg.vocab_size as u32 + 7, &mut cache)?;
        assert!(bad.iter().all(|v| v.is_nan()), "{:?}", &bad[..4]);
        Ok(())
    }
}
