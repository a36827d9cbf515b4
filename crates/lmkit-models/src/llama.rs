//! The Llama family in one file: Llama 1–3, SmolLM/SmolLM2, Mistral and Qwen2 (they differ only
//! by [`LlamaConfig`]: GQA, RoPE theta and scaling, tied embeddings, q/k/v bias).
//!
//! Reference: Touvron et al., "LLaMA: Open and Efficient Foundation Language Models"
//! (arXiv:2302.13971); HF transformers `modeling_llama.py`. Weights use HF's rotate-half RoPE
//! layout; GGUF `llama` files are un-permuted at load (see `weights.rs`).
//!
//! Per block: `h = x + Attn(RMSNorm(x))`, `y = h + MLP(RMSNorm(h))`,
//! `Attn = softmax(q kᵀ / √d + causal mask) v` with RoPE on q and k,
//! `MLP(x) = W_down (silu(W_gate x) ⊙ W_up x)`.

use lmkit_core::candle_nn::ops::softmax_last_dim;
use lmkit_core::candle_nn::rotary_emb::rope;
use lmkit_core::linear::Weight;
use lmkit_core::{attn_softmax, fused};
use lmkit_core::{DType, Device, Embedding, Linear, RmsNorm, Tensor};

use crate::cache::KvCache;
use crate::config::{LlamaConfig, RopeScaling};
use crate::flash_cpu;
use crate::fused_decode;
use crate::native::{self, Consts, Dims, NativeCache, Want};
use crate::weights::{LoadOptions, WeightSource};
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    device: Device,
    /// The activations' dtype on the reference path (weights in another dtype are cast to it).
    dtype: DType,
    /// Set when every weight has an lmkit CPU kernel: the native path is available.
    native: Option<Consts>,
    /// Fused decoding's view of the weights, built by its first step.
    fused: fused_decode::FusedSlot,
}

/// A block's linear layers by HF module name (relative to `model.layers.{i}.`), in forward
/// order: q, k, v, o, gate, up, down.
pub const BLOCK_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The linear layers of a block grouped by the input they read, in forward order: capture site
/// name and the HF module names (relative to `model.layers.{i}.`) that read it.
pub const CAPTURE_SITES: [(&str, &[&str]); 4] = [
    (
        "qkv",
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ),
    ("o", &["self_attn.o_proj"]),
    ("gate_up", &["mlp.gate_proj", "mlp.up_proj"]),
    ("down", &["mlp.down_proj"]),
];

/// RoPE inverse frequencies `θ^(-2i/d)`, with optional scaling.
fn inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    (0..d / 2)
        .map(|i| {
            let f = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64);
            let f = match &cfg.rope_scaling {
                None => f,
                Some(RopeScaling::Linear { factor }) => f / factor,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => {
                    let old = *original_max_position_embeddings as f64;
                    let low_wavelen = old / low_freq_factor;
                    let high_wavelen = old / high_freq_factor;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                }
            };
            f as f32
        })
        .collect()
}

impl Llama {
    /// Builds the model from a weight source.
    pub fn load(
        cfg: LlamaConfig,
        src: &WeightSource,
        opts: LoadOptions,
        device: &Device,
    ) -> Result<Self> {
        let c = cfg.hidden_size;
        let (h, kh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let ffn = cfg.intermediate_size;
        // GGUF `llama` files store q/k rows permuted for interleaved RoPE.
        let permuted = matches!(src, WeightSource::Gguf(_)) && cfg.arch == "llama";
        let embed = src.embedding(
            "model.embed_tokens.weight",
            (cfg.vocab_size, c),
            opts,
            device,
        )?;
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                src.tensor_f32(name, &[c], device)?,
                cfg.rms_norm_eps,
            ))
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let lin = |name: &str, shape, bias, heads: Option<usize>| {
                src.linear(
                    &format!("{p}.{name}"),
                    shape,
                    bias,
                    heads.filter(|_| permuted),
                    opts,
                    device,
                )
            };
            let bias = cfg.attention_bias;
            blocks.push(Block {
                attn_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                attn: Attention {
                    q: lin("self_attn.q_proj", (h * d, c), bias, Some(h))?,
                    k: lin("self_attn.k_proj", (kh * d, c), bias, Some(kh))?,
                    v: lin("self_attn.v_proj", (kh * d, c), bias, None)?,
                    o: lin("self_attn.o_proj", (c, h * d), false, None)?,
                },
                mlp_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate: lin("mlp.gate_proj", (ffn, c), false, None)?,
                    up: lin("mlp.up_proj", (ffn, c), false, None)?,
                    down: lin("mlp.down_proj", (c, ffn), false, None)?,
                },
            });
        }
        let lm_head = if cfg.tie_word_embeddings || !src.contains("lm_head.weight") {
            embed.as_linear()?
        } else {
            src.linear("lm_head", (cfg.vocab_size, c), false, None, opts, device)?
        };
        let mut model = Self {
            norm: norm("model.norm.weight")?,
            inv_freq: inv_freq(&cfg),
            cfg,
            embed,
            blocks,
            lm_head,
            device: device.clone(),
            dtype: opts.dtype.unwrap_or(DType::F32),
            native: None,
            fused: Default::default(),
        };
        model.native = model.native_consts()?;
        Ok(model)
    }

    /// The native path's constants, if every weight has a CPU kernel.
    fn native_consts(&self) -> Result<Option<Consts>> {
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return Ok(None);
        }
        let linears = self.kernel_linears();
        let Some(data) = native::kernel_data(&linears)? else {
            return Ok(None);
        };
        let rin: Vec<_> = data.iter().map(|d| d.input_rotation()).collect();
        if native::check_rotations(&rin, self.blocks.len()).is_err() {
            return Ok(None);
        }
        let vec = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1()?) };
        let mut qkv_bias = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let parts = [&b.attn.q, &b.attn.k, &b.attn.v].map(|l| l.bias());
            qkv_bias.push(match parts {
                [Some(q), Some(k), Some(v)] => Some([vec(q)?, vec(k)?, vec(v)?].concat()),
                [None, None, None] => None,
                _ => return Ok(None),
            });
        }
        Ok(Some(Consts {
            attn_norm: self
                .blocks
                .iter()
                .map(|b| vec(b.attn_norm.weight()))
                .collect::<Result<_>>()?,
            mlp_norm: self
                .blocks
                .iter()
                .map(|b| vec(b.mlp_norm.weight()))
                .collect::<Result<_>>()?,
            norm: vec(self.norm.weight())?,
            qkv_bias,
            eps: self.cfg.rms_norm_eps as f32,
            inv_freq: self.inv_freq.clone(),
        }))
    }

    /// The linears in the native path's order: per layer q, k, v, o, gate, up, down; the head.
    fn kernel_linears(&self) -> Vec<&Linear> {
        let mut v = Vec::with_capacity(self.blocks.len() * 7 + 1);
        for b in &self.blocks {
            v.extend([
                &b.attn.q,
                &b.attn.k,
                &b.attn.v,
                &b.attn.o,
                &b.mlp.gate,
                &b.mlp.up,
                &b.mlp.down,
            ]);
        }
        v.push(&self.lm_head);
        v
    }

    /// Replaces linear layers: `f(hf_module_name, layer)` returns a new layer or `None` to keep
    /// it (names as in HF checkpoints, e.g. `model.layers.0.self_attn.q_proj`; the tied output
    /// layer is `lm_head`). The native CPU path is re-derived after, so layers without a kernel
    /// (LoRA adapters, for one) make the model run on the reference path.
    pub fn update_linears(
        &mut self,
        mut f: impl FnMut(&str, &Linear) -> Result<Option<Linear>>,
    ) -> Result<()> {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            for (n, l) in [
                ("self_attn.q_proj", &mut b.attn.q),
                ("self_attn.k_proj", &mut b.attn.k),
                ("self_attn.v_proj", &mut b.attn.v),
                ("self_attn.o_proj", &mut b.attn.o),
                ("mlp.gate_proj", &mut b.mlp.gate),
                ("mlp.up_proj", &mut b.mlp.up),
                ("mlp.down_proj", &mut b.mlp.down),
            ] {
                if let Some(new) = f(&format!("{p}.{n}"), l)? {
                    *l = new;
                }
            }
        }
        if let Some(new) = f("lm_head", &self.lm_head)? {
            self.lm_head = new;
        }
        self.native = self.native_consts()?;
        self.fused = Default::default();
        Ok(())
    }

    /// The switch shared by this model's LoRA adapters' dropout (None without dropout): the
    /// trainer turns it on for training micro-batches and off for evaluation.
    pub fn lora_dropout(&self) -> Option<std::sync::Arc<lmkit_core::DropoutState>> {
        self.kernel_linears()
            .iter()
            .find_map(|l| l.lora()?.dropout.as_ref().map(|d| d.state.clone()))
    }

    /// Whether this model runs on lmkit's native CPU path (all weights have kernels).
    pub fn is_native(&self) -> bool {
        self.native.is_some()
    }

    fn native_forward(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        want: Want,
        branches: &[usize],
    ) -> Result<Vec<f32>> {
        let consts = self
            .native
            .as_ref()
            .ok_or_else(|| Error::Unsupported("this model has no native CPU path".into()))?;
        // A tree holds more tokens than positions: `forward_tree_hidden` checks its depth.
        let (b, _) = if branches.is_empty() {
            self.check_ids(ids, cache.len())?
        } else {
            self.check_ids(ids, None)?
        };
        if b != 1 {
            return Err(Error::Unsupported(format!(
                "the native CPU path runs one sequence at a time, got a batch of {b} \
                 (use KvCache::new for batches)"
            )));
        }
        let emb = self.embed.forward(ids)?.flatten_all()?.to_vec1::<f32>()?;
        let linears = self.kernel_linears();
        let data = native::kernel_data(&linears)?
            .ok_or_else(|| Error::Unsupported("a weight lost its kernel".into()))?;
        let nc = cache
            .native_mut()
            .ok_or_else(|| Error::Unsupported("not a native cache".into()))?;
        let out = native::forward(self.dims(), consts, &data, &emb, nc, want, branches)?;
        cache.evict()?;
        Ok(out)
    }

    /// Several sequences in one native call (continuous batching): `ids[s]` continues
    /// `caches[s]`; returns the logits of each sequence's last token. Every weight matrix is read
    /// once for all the tokens, so decoding `n` sequences together costs far less than `n` calls;
    /// prompts and decoding steps can share a call. Each cache applies its own eviction policy.
    pub fn forward_batch_last(
        &self,
        ids: &[&[u32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Vec<f32>>> {
        self.forward_batch_last_with(ids, caches, None)
    }

    /// [`Llama::forward_batch_last`] with scratch buffers the caller keeps across calls (a
    /// serving engine), rather than the first cache's.
    pub fn forward_batch_last_with(
        &self,
        ids: &[&[u32]],
        caches: &mut [&mut KvCache],
        scratch: Option<&mut native::BatchScratch>,
    ) -> Result<Vec<Vec<f32>>> {
        let consts = self
            .native
            .as_ref()
            .ok_or_else(|| Error::Unsupported("this model has no native CPU path".into()))?;
        if ids.len() != caches.len() || ids.is_empty() {
            return Err(Error::Unsupported(format!(
                "forward_batch_last: {} sequences for {} caches",
                ids.len(),
                caches.len()
            )));
        }
        let mut all = Vec::with_capacity(ids.iter().map(|s| s.len()).sum());
        for (s, c) in ids.iter().zip(caches.iter()) {
            if s.is_empty() {
                return Err(Error::Unsupported(
                    "forward_batch_last: an empty sequence".into(),
                ));
            }
            let row = Tensor::new(*s, &Device::Cpu)?.unsqueeze(0)?;
            self.check_ids(&row, c.len())?;
            all.extend_from_slice(s);
        }
        let counts: Vec<usize> = ids.iter().map(|s| s.len()).collect();
        let x = Tensor::new(all.as_slice(), &self.device)?;
        let emb = self.embed.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let linears = self.kernel_linears();
        let data = native::kernel_data(&linears)?
            .ok_or_else(|| Error::Unsupported("a weight lost its kernel".into()))?;
        let mut natives = Vec::with_capacity(caches.len());
        for c in caches.iter_mut() {
            natives.push(c.native_mut().ok_or_else(|| {
                Error::Unsupported("forward_batch_last needs native caches (new_cache)".into())
            })?);
        }
        let out = native::forward_seqs(
            self.dims(),
            consts,
            &data,
            &emb,
            &mut natives,
            &counts,
            Want::LastLogits,
            &[],
            scratch,
        )?;
        drop(natives);
        for c in caches.iter_mut() {
            c.evict()?;
        }
        let v = self.cfg.vocab_size;
        Ok(out.chunks_exact(v).map(|r| r.to_vec()).collect())
    }

    fn dims(&self) -> Dims {
        Dims {
            layers: self.cfg.num_layers,
            hidden: self.cfg.hidden_size,
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            ffn: self.cfg.intermediate_size,
            vocab: self.cfg.vocab_size,
        }
    }

    /// Logits `(n, v)` f32 of final hidden states `(n, c)` (as `forward_hidden` returns them):
    /// the output layer, on the native thread team when the model has the native path.
    pub fn logits_of_hidden(&self, rows: &Tensor) -> Result<Tensor> {
        if self.native.is_some() && rows.device().is_cpu() && rows.rank() == 2 {
            if let Some(head) = self.lm_head.kernel_data()? {
                let (n, c) = rows.dims2()?;
                let x = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let v = self.cfg.vocab_size;
                let y = native::head_logits(&head, &x, c, v)?;
                return Ok(Tensor::from_vec(y, (n, v), &self.device)?);
            }
        }
        Ok(self.lm_head.forward(rows)?.to_dtype(DType::F32)?)
    }

    /// Final hidden states of a tree on top of the cached context: `trunk` continues the cache,
    /// and each branch continues the trunk as if run alone after it. Returns `(trunk + Σ len,
    /// c)` f32 rows: the trunk's, then the branches' one after another. The cache keeps the
    /// trunk. The native path runs the whole tree as one batch (tree attention), the reference
    /// path the trunk and then each branch.
    pub fn forward_tree_hidden(
        &self,
        trunk: &[u32],
        branches: &[&[u32]],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let p0 = cache.len();
        let longest = branches.iter().map(|b| b.len()).max().unwrap_or(0);
        let needed = p0 + trunk.len() + longest;
        if needed > self.cfg.max_position_embeddings {
            return Err(Error::ContextOverflow {
                needed,
                context: self.cfg.max_position_embeddings,
            });
        }
        let branches: Vec<&[u32]> = branches.iter().copied().filter(|b| !b.is_empty()).collect();
        let total = trunk.len() + branches.iter().map(|b| b.len()).sum::<usize>();
        let c = self.cfg.hidden_size;
        if total == 0 {
            return Ok(Tensor::zeros((0, c), DType::F32, &self.device)?);
        }
        let keep = p0 + trunk.len();
        if cache.is_native() {
            let mut starts = Vec::with_capacity(branches.len());
            let mut ids = trunk.to_vec();
            for b in &branches {
                starts.push(ids.len());
                ids.extend_from_slice(b);
            }
            let x = Tensor::from_vec(ids, (1, total), &Device::Cpu)?;
            let h = self.native_forward(&x, cache, Want::Hidden, &starts);
            cache.truncate(if h.is_ok() { keep } else { p0 })?;
            return Ok(Tensor::from_vec(h?, (total, c), &self.device)?);
        }
        let mut rows = Vec::with_capacity(branches.len() + 1);
        for (i, b) in std::iter::once(trunk)
            .chain(branches.iter().copied())
            .enumerate()
        {
            if b.is_empty() {
                continue;
            }
            let x = Tensor::from_vec(b.to_vec(), (1, b.len()), &Device::Cpu)?;
            let h = self.forward_hidden(&x, cache);
            if h.is_err() || i > 0 {
                cache.truncate(if i > 0 { keep } else { p0 })?;
            }
            rows.push(h?.squeeze(0)?.to_dtype(DType::F32)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype activations are computed in on the reference path.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Computes in `dtype` from now on (mixed precision: weights in another dtype, e.g. f32
    /// master weights under training, are cast to it in each product, differentiably). The
    /// native CPU path needs f32.
    pub fn set_dtype(&mut self, dtype: DType) -> Result<()> {
        self.dtype = dtype;
        self.native = self.native_consts()?;
        self.fused = Default::default();
        Ok(())
    }

    /// The output projection (hidden → vocabulary logits).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// Where fused decoding keeps its view of the weights (`fused_decode`).
    pub(crate) fn fused_slot(&self) -> &fused_decode::FusedSlot {
        &self.fused
    }

    /// The token embedding's table `(vocab, c)`.
    pub fn embed_weight(&self) -> &Weight {
        self.embed.weight()
    }

    /// Block `i`'s two RMSNorm weights (attention's, then the MLP's).
    pub(crate) fn block_norms(&self, i: usize) -> Result<(&Tensor, &Tensor)> {
        let b = self
            .blocks
            .get(i)
            .ok_or_else(|| Error::Unsupported(format!("no block {i}")))?;
        Ok((b.attn_norm.weight(), b.mlp_norm.weight()))
    }

    /// The final RMSNorm's weight.
    pub(crate) fn final_norm_weight(&self) -> &Tensor {
        self.norm.weight()
    }

    /// A fresh KV cache for this model: the native CPU path's when the model has one (see
    /// [`Llama::is_native`]), else the reference path's.
    pub fn new_cache(&self) -> KvCache {
        if !self.device.is_cpu() && fused_decode::wanted() {
            match self.new_fused_cache() {
                Ok(c) => return c,
                Err(e) if fused_decode::asked() => tracing::warn!("{e}; decoding on candle's ops"),
                Err(e) => tracing::debug!("{e}; decoding on candle's ops"),
            }
        }
        if self.native.is_some() {
            KvCache::native(NativeCache::new(
                self.cfg.num_layers,
                self.cfg.num_heads,
                self.cfg.num_kv_heads,
                self.cfg.head_dim,
            ))
        } else {
            self.new_reference_cache()
        }
    }

    /// A KV cache whose single-token steps run lmkit's fused decoding kernels
    /// (`crate::fused_decode`; a CUDA device, or the CPU emulator in tests); prompts run the
    /// reference path on the same preallocated slab. The batch is set by the first call. An
    /// error says why the model cannot decode this way.
    pub fn new_fused_cache(&self) -> Result<KvCache> {
        if let Some(why) = fused_decode::unsupported(self) {
            return Err(Error::Unsupported(format!("fused decoding: {why}")));
        }
        fused_decode::prepare(self)?;
        let cfg = &self.cfg;
        Ok(KvCache::new_slab(
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.dtype,
            &self.device,
        ))
    }

    /// Whether prompts on a fused-decoding cache ([`Llama::new_fused_cache`]) run the fused
    /// prompt pass (bf16/f16, heads of 64 or 128, on a GPU or the kernels' emulator); else
    /// they run candle's ops.
    pub fn fused_prompt_applies(&self) -> bool {
        fused_decode::prompt_applies(self)
    }

    /// A prompt on a slab cache through the fused prompt pass (`fused_decode::prompt`): the
    /// final hidden states `(b, t, c)`, or None where it does not apply.
    fn fused_prompt(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Option<Tensor>> {
        if !cache.is_slab() || ids.dims2()?.1 < 2 {
            return Ok(None);
        }
        self.check_ids(ids, cache.len())?;
        let ids = self.on_device(ids)?;
        fused_decode::prompt_pass(self, cache, &ids)
    }

    /// One single-token step on the fused path: ids `(b, 1)` → logits `(b, v)` f32.
    fn fused_step(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        // Checks the ids when they come from the host (see `check_ids`).
        let (b, _) = self.check_ids(ids, cache.len())?;
        cache.fused_step(self, b, ids)
    }

    /// A KV cache that runs the reference path (candle ops; any device, batches; the path
    /// training differentiates).
    pub fn new_reference_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers)
    }

    /// Every weight with its HF name (for `info`, export and analysis).
    pub fn named_weights(&self) -> Vec<(String, &Weight)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.weight())];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (n, l) in [
                ("self_attn.q_proj", &b.attn.q),
                ("self_attn.k_proj", &b.attn.k),
                ("self_attn.v_proj", &b.attn.v),
                ("self_attn.o_proj", &b.attn.o),
                ("mlp.gate_proj", &b.mlp.gate),
                ("mlp.up_proj", &b.mlp.up),
                ("mlp.down_proj", &b.mlp.down),
            ] {
                out.push((format!("{p}.{n}.weight"), l.weight()));
            }
        }
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".into(), self.lm_head.weight()));
        }
        out
    }

    /// The vectors with their HF names: every RMSNorm weight, and the q/k/v biases when the
    /// model has them (export; [`Llama::named_weights`] has the matrices).
    pub fn named_vectors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), b.attn_norm.weight()));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.mlp_norm.weight(),
            ));
            for (n, l) in [
                ("q_proj", &b.attn.q),
                ("k_proj", &b.attn.k),
                ("v_proj", &b.attn.v),
            ] {
                if let Some(bias) = l.bias() {
                    out.push((format!("{p}.self_attn.{n}.bias"), bias));
                }
            }
        }
        out.push(("model.norm.weight".into(), self.norm.weight()));
        out
    }

    /// Parameters, counting tied embeddings once and including norms and biases.
    pub fn num_parameters(&self) -> usize {
        let c = self.cfg.hidden_size;
        let mats: usize = self
            .named_weights()
            .iter()
            .map(|(_, w)| w.dims2().map(|(a, b)| a * b).unwrap_or(0))
            .sum();
        let norms = c * (2 * self.cfg.num_layers + 1);
        let d = self.cfg.head_dim;
        let biases = if self.cfg.attention_bias {
            self.cfg.num_layers * d * (self.cfg.num_heads + 2 * self.cfg.num_kv_heads)
        } else {
            0
        };
        mats + norms + biases
    }

    /// RoPE's angles for positions `offset..offset + t`: cos and sin, row-major `(t, d/2)` f32
    /// (for paths that apply RoPE themselves).
    pub fn rope_angles(&self, offset: usize, t: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in offset..offset + t {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }

    /// cos and sin tables for positions `offset..offset+t`, each `(t, d/2)` in `dtype`: f32 for
    /// inference (RoPE computed in f32 and rounded once, as the GPU's fused kernels do), the
    /// compute dtype for training.
    fn rope_tables(&self, offset: usize, t: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (cos, sin) = self.rope_angles(offset, t);
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (t, half), &self.device)?.to_dtype(dtype)?,
        ))
    }

    /// `(batch, tokens)` of `ids`, checked: token ids in the vocabulary and, unless `offset`
    /// is `None` (a tree, whose positions its caller checks), `offset + t` positions within the
    /// context.
    fn check_ids(&self, ids: &Tensor, offset: impl Into<Option<usize>>) -> Result<(usize, usize)> {
        let (b, t) = ids.dims2()?;
        let needed = offset.into().map_or(0, |o| o + t);
        if needed > self.cfg.max_position_embeddings {
            return Err(Error::ContextOverflow {
                needed,
                context: self.cfg.max_position_embeddings,
            });
        }
        // Ids already on a GPU are the caller's to check (reading them back would stall it).
        if ids.device().is_cpu() {
            let flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            if let Some(&id) = flat.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                return Err(Error::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
        }
        Ok((b, t))
    }

    /// `ids` on the model's device (uploaded when they come from the host).
    fn on_device(&self, ids: &Tensor) -> Result<Tensor> {
        if ids.device().same_device(&self.device) {
            return Ok(ids.clone());
        }
        Ok(ids.to_device(&self.device)?)
    }

    /// Token embeddings `(b, t, c)` in f32: the input of block 0 (calibration).
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        self.check_ids(ids, 0)?;
        let ids = &self.on_device(ids)?;
        Ok(self.embed.forward(ids)?.to_dtype(DType::F32)?)
    }

    /// Block `l` on the reference path over whole sequences (no cache): `x (b, t, c)` f32 in,
    /// the next residual stream out. `capture(site, input)` sees the input of each group of
    /// linear layers, named by [`CAPTURE_SITES`]: `qkv` (q/k/v), `o`, `gate_up` (gate/up),
    /// `down` (post-training quantization collects Hessians here).
    pub fn block_forward(
        &self,
        l: usize,
        x: &Tensor,
        capture: &mut dyn FnMut(&str, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let blk = self.blocks.get(l).ok_or_else(|| {
            Error::Unsupported(format!("block {l} of a {}-block model", self.blocks.len()))
        })?;
        let (b, t, _) = x.dims3()?;
        let (cos, sin) = self.rope_tables(0, t, DType::F32)?;
        let mask = causal_mask(t, 0, &self.device, DType::F32)?;
        let h = self.lowp(blk.attn_norm.forward(x)?)?;
        capture("qkv", &h)?;
        let h = self.attention(
            &blk.attn,
            &h,
            (b, t),
            Rope::Fused(&cos, &sin),
            mask.as_ref(),
            None,
        )?;
        capture("o", &h)?;
        let x = (x + blk.attn.o.forward(&h)?.to_dtype(DType::F32)?)?;
        let h = self.lowp(blk.mlp_norm.forward(&x)?)?;
        capture("gate_up", &h)?;
        let gu = Linear::forward_many(&[&blk.mlp.gate, &blk.mlp.up], &h)?;
        let m = silu_mul(&gu[0], &gu[1])?;
        capture("down", &m)?;
        Ok((&x + blk.mlp.down.forward(&m)?.to_dtype(DType::F32)?)?)
    }

    /// RoPE's inverse frequencies `(head_dim / 2)`, scaling applied: position `p` rotates pair
    /// `i` by `p · inv_freq[i]` (a training path that applies RoPE itself).
    pub fn rope_inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Number of transformer blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// A linear layer by HF module name (`model.layers.3.mlp.up_proj`, `lm_head`).
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        if name == "lm_head" {
            return Some(&self.lm_head);
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (i, module) = rest.split_once('.')?;
        let b = self.blocks.get(i.parse::<usize>().ok()?)?;
        Some(match module {
            "self_attn.q_proj" => &b.attn.q,
            "self_attn.k_proj" => &b.attn.k,
            "self_attn.v_proj" => &b.attn.v,
            "self_attn.o_proj" => &b.attn.o,
            "mlp.gate_proj" => &b.mlp.gate,
            "mlp.up_proj" => &b.mlp.up,
            "mlp.down_proj" => &b.mlp.down,
            _ => return None,
        })
    }

    /// Final hidden states (after the last norm).
    ///
    /// # Shapes
    /// `ids`: `(b, t)` u32 → `(b, t, c)`.
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if let Some(x) = self.fused_prompt(ids, cache)? {
            return Ok(x);
        }
        if cache.is_native() {
            let t = ids.dims2()?.1;
            let h = self.native_forward(ids, cache, Want::Hidden, &[])?;
            return Ok(Tensor::from_vec(
                h,
                (1, t, self.cfg.hidden_size),
                &self.device,
            )?);
        }
        let offset = cache.len();
        let (b, t) = self.check_ids(ids, offset)?;
        let ids = &self.on_device(ids)?;
        // RoPE takes the true positions; the mask, the entries held (fewer under eviction: the
        // new tokens are the last ones and see every entry before them).
        let (cos, sin) = self.rope_tables(offset, t, DType::F32)?;
        let mask = causal_mask(t, cache.entries(), &self.device, DType::F32)?;
        // The residual stream stays f32; blocks compute in `self.dtype` (see `lowp`).
        let mut x = self.embed.forward(ids)?.to_dtype(DType::F32)?; // (b, t, c)
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = self.lowp(blk.attn_norm.forward(&x)?)?;
            let rope = Rope::Fused(&cos, &sin);
            let h = self.attention(&blk.attn, &h, (b, t), rope, mask.as_ref(), Some((i, cache)))?;
            let h = blk.attn.o.forward(&h)?;
            x = (x + h.to_dtype(DType::F32)?)?;
            let h = self.lowp(blk.mlp_norm.forward(&x)?)?;
            let h = mlp(&blk.mlp, &h, true)?;
            x = (x + h.to_dtype(DType::F32)?)?;
        }
        cache.evict()?;
        self.lowp(self.norm.forward(&x)?)
    }

    /// `x` in the compute dtype. With bf16/f16 the products and attention run in it while the
    /// residual stream and the norms stay f32, as under PyTorch's autocast (an f32 embedding
    /// plus a bf16 block output promotes to f32) and as llama.cpp keeps activations.
    fn lowp(&self, x: Tensor) -> Result<Tensor> {
        Ok(x.to_dtype(self.dtype)?)
    }

    /// Logits at every position.
    ///
    /// # Shapes
    /// `ids`: `(b, t)` u32 → `(b, t, v)` f32.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.forward_hidden(ids, cache)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Logits at the last position only (generation).
    ///
    /// # Shapes
    /// `ids`: `(b, t)` u32 → `(b, v)` f32.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.is_slab() && ids.dims2()?.1 == 1 {
            return self.fused_step(ids, cache);
        }
        if let Some(x) = self.fused_prompt(ids, cache)? {
            let t = x.dims()[1];
            let last = x.narrow(1, t - 1, 1)?.squeeze(1)?; // (b, c)
            return Ok(self.lm_head.forward(&last)?.to_dtype(DType::F32)?);
        }
        if cache.is_native() {
            let logits = self.native_forward(ids, cache, Want::LastLogits, &[])?;
            return Ok(Tensor::from_vec(
                logits,
                (1, self.cfg.vocab_size),
                &self.device,
            )?);
        }
        let x = self.forward_hidden(ids, cache)?;
        let t = x.dims()[1];
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?; // (b, c)
        Ok(self.lm_head.forward(&last)?.to_dtype(DType::F32)?)
    }

    /// Logits at every position, with gradients (training): RMSNorm, RoPE and softmax run
    /// candle's fused kernels with the backward passes of `lmkit_core::fused` (the bare kernels
    /// cut the graph). The whole sequence runs at once, without a KV cache.
    ///
    /// # Shapes
    /// `ids`: `(b, t)` u32 → `(b, t, v)` f32.
    pub fn forward_train(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.forward_train_hidden(ids)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// [`Llama::forward_train`] up to the final norm: the hidden states the output layer takes,
    /// in the compute dtype (for a loss that fuses the output layer, see `lmkit_train`).
    ///
    /// # Shapes
    /// `ids`: `(b, t)` u32 → `(b, t, c)`.
    pub fn forward_train_hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = self.check_ids(ids, 0)?;
        let ids = &self.on_device(ids)?;
        let (cos, sin) = self.rope_tables(0, t, self.dtype)?;
        let mut x = self.embed.forward(ids)?.to_dtype(DType::F32)?; // (b, t, c)
        for blk in &self.blocks {
            let h = self.lowp(blk.attn_norm.forward_diff(&x)?)?;
            let rope = Rope::Diff(&cos, &sin);
            // The causal mask is part of the training softmax.
            let h = self.attention(&blk.attn, &h, (b, t), rope, None, None)?;
            let h = blk.attn.o.forward(&h)?;
            x = (x + h.to_dtype(DType::F32)?)?;
            let h = self.lowp(blk.mlp_norm.forward_diff(&x)?)?;
            // Training: candle's SiLU·up in the compute dtype (f32 copies would stay alive for
            // the backward pass).
            let h = mlp(&blk.mlp, &h, false)?;
            x = (x + h.to_dtype(DType::F32)?)?;
        }
        self.lowp(self.norm.forward_diff(&x)?)
    }

    /// Attention of `x (b, t, c)` before the output projection (`(b, t, h·d)`); with a cache,
    /// its layer's keys and values are extended.
    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        (b, t): (usize, usize),
        rope: Rope,
        mask: Option<&Tensor>,
        cache: Option<(usize, &mut KvCache)>,
    ) -> Result<Tensor> {
        let (h, kh, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let g = h / kh;
        // One pass for q, k and v (the input is quantized once): (b, t, h·d), (b, t, k·d) ×2.
        let layers = [&a.q, &a.k, &a.v];
        let f32_bias = self.dtype != DType::F32
            && matches!(rope, Rope::Fused(..))
            && layers.iter().any(|l| l.bias().is_some());
        let qkv = match f32_bias {
            // Inference in bf16/f16 with biases: the products' outputs rounded, the biases
            // added in f32 and the sums rounded once, after RoPE (as the GPU's kernels do).
            true => {
                let bare: Vec<Linear> = layers.iter().map(|l| l.without_bias()).collect();
                let ys = Linear::forward_many(&bare.iter().collect::<Vec<_>>(), x)?;
                let mut out = Vec::with_capacity(3);
                for (y, l) in ys.into_iter().zip(layers) {
                    let y = y.to_dtype(self.dtype)?.to_dtype(DType::F32)?;
                    out.push(match l.bias() {
                        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
                        None => y,
                    });
                }
                out
            }
            // Quantized products return f32: rounded to the compute dtype, as a GPU's are.
            false => Linear::forward_many(&layers, x)?
                .into_iter()
                .map(|t| t.to_dtype(self.dtype))
                .collect::<std::result::Result<_, _>>()?,
        };
        let q = qkv[0]
            .reshape((b, t, h, d))?
            .transpose(1, 2)?
            .contiguous()?; // (b, h, t, d)
        let k = qkv[1]
            .reshape((b, t, kh, d))?
            .transpose(1, 2)?
            .contiguous()?; // (b, k, t, d)
        let v = qkv[2]
            .reshape((b, t, kh, d))?
            .transpose(1, 2)?
            .contiguous()?
            .to_dtype(self.dtype)?; // (b, k, t, d)
                                    // Attention runs in the compute dtype.
        let (q, k) = (
            rope.apply(&q)?.to_dtype(self.dtype)?,
            rope.apply(&k)?.to_dtype(self.dtype)?,
        );
        let (k, v, cache) = match cache {
            Some((layer, cache)) => {
                let (k, v) = cache.append(layer, k, v)?; // (b, k, T, d)
                (k, v, Some((layer, cache)))
            }
            None => (k, v, None),
        };
        let total = k.dims()[2];
        // Grouped-query attention without copying kv: q heads j·g..j·g+g share kv head j.
        let q = q.reshape((b, kh, g * t, d))?; // (b, k, g·t, d)
        let scale = 1.0 / (d as f64).sqrt();
        let wants_scores = cache.as_ref().is_some_and(|(_, c)| c.wants_scores());
        let y = match rope {
            // Inference in bf16/f16 on the CPU: rounded where the GPU's flash attention rounds.
            Rope::Fused(..) if q.device().is_cpu() && q.dtype() != DType::F32 && !wants_scores => {
                flash_cpu::attention(&q, &k, &v, t, scale)?
            }
            // Inference: the scores and the softmax in f32, the probabilities rounded to the
            // compute dtype for their product with v (candle's bf16 ops would round the scores
            // and, on the CPU, sum the softmax in bf16).
            Rope::Fused(..) => {
                let att = match q.dtype() {
                    DType::F32 => q.matmul(&k.t()?)?,
                    _ => q
                        .to_dtype(DType::F32)?
                        .matmul(&k.to_dtype(DType::F32)?.t()?)?,
                }; // (b, k, g·t, T)
                let att = (att * scale)?;
                let att = match mask {
                    Some(m) => att
                        .reshape((b, kh, g, t, total))?
                        .broadcast_add(m)?
                        .reshape((b, kh, g * t, total))?,
                    None => att,
                };
                let att = softmax_last_dim(&att)?;
                // An eviction policy that ranks entries by attention (H2O) accumulates it.
                if let Some((layer, c)) = cache {
                    if c.wants_scores() {
                        c.add_scores(layer, &att)?;
                    }
                }
                att.to_dtype(v.dtype())?.matmul(&v.contiguous()?)?
            }
            // Training: scale, causal mask and softmax in one op with a backward, computed in
            // f32 whatever the storage dtype (as autocast does).
            Rope::Diff(..) => {
                let att = q.matmul(&k.t()?)?; // (b, k, g·t, T)
                let att = attn_softmax::causal_softmax(&att, t, total - t, scale)?;
                att.matmul(&v.contiguous()?)?
            }
        }; // (b, k, g·t, d)
        let y = y
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?; // (b, t, h·d)
        Ok(y)
    }
}

/// RoPE tables `(t, d/2)` and which path applies them: inference (candle's fused kernel) or
/// training (the same kernel with a backward, `lmkit_core::fused`; the softmax likewise).
#[derive(Clone, Copy)]
enum Rope<'a> {
    Fused(&'a Tensor, &'a Tensor),
    Diff(&'a Tensor, &'a Tensor),
}

impl Rope<'_> {
    /// Rotates `x (b, h, t, d)`: `x·cos + rotate_half(x)·sin`, `rotate_half(x) = (−x₂, x₁)`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match *self {
            // Inference: in the tables' dtype (f32), rounded once to x's.
            Rope::Fused(cos, sin) if x.dtype() != cos.dtype() => {
                let y = rope(&x.to_dtype(cos.dtype())?.contiguous()?, cos, sin)?;
                Ok(y.to_dtype(x.dtype())?)
            }
            Rope::Fused(cos, sin) => Ok(rope(x, cos, sin)?),
            Rope::Diff(cos, sin) => Ok(fused::rope(x, cos, sin)?),
        }
    }
}

/// The MLP; `inference` computes SiLU·up in f32 and rounds once ([`silu_mul`]), training in
/// the compute dtype with candle's differentiable ops.
fn mlp(m: &Mlp, x: &Tensor, inference: bool) -> Result<Tensor> {
    // One pass for gate and up: (b, t, f) ×2.
    let gu = Linear::forward_many(&[&m.gate, &m.up], x)?;
    let h = match inference {
        true => silu_mul(&gu[0], &gu[1])?,
        false => (gu[0].silu()? * &gu[1])?,
    };
    Ok(m.down.forward(&h)?)
}

/// `silu(g) ⊙ u`, computed in f32 and rounded once to the inputs' dtype (as the GPU's fused
/// kernel does; candle's ops in bf16 round after the SiLU and again after the product).
fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let dtype = g.dtype();
    if dtype == DType::F32 {
        return Ok((g.silu()? * u)?);
    }
    let m = (g.to_dtype(DType::F32)?.silu()? * u.to_dtype(DType::F32)?)?;
    Ok(m.to_dtype(dtype)?)
}

/// Additive causal mask `(t, T)` for `t` new positions after `offset` cached ones; `None` for a
/// single new position (it may see everything).
fn causal_mask(t: usize, offset: usize, device: &Device, dtype: DType) -> Result<Option<Tensor>> {
    if t <= 1 {
        return Ok(None);
    }
    let total = offset + t;
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(
        Tensor::from_vec(m, (t, total), device)?.to_dtype(dtype)?,
    ))
}
