//! The key/value cache: per layer, keys and values of every position seen so far.
//!
//! Two layouts, chosen when the cache is made: [`Llama::new_cache`](crate::Llama::new_cache)
//! gives the native CPU path's preallocated per-head buffers when the model runs on lmkit's
//! kernels, and [`KvCache::new`] gives the candle tensors of the reference path (any device,
//! batches). The cache kind decides which forward path a call takes.

use std::sync::Arc;

use lmkit_core::{DType, Device, Tensor};

use crate::fused_decode::FusedDecoder;
use crate::native::NativeCache;
use crate::tensor_evict::Tracked;
use crate::{Error, KvPolicy, Result};

#[derive(Debug)]
enum Inner {
    /// Per layer: keys and values `(b, k, T, d)`.
    Tensors(Vec<Option<(Tensor, Tensor)>>),
    Native(Box<NativeCache>),
    Slab(Box<Slab>),
}

/// Preallocated keys and values, written in place: per layer `(b, k, cap, d)` in the compute
/// dtype. The cache of fused decoding (`crate::fused_decode`), whose step it keeps.
pub(crate) struct Slab {
    kv: Vec<(Tensor, Tensor)>,
    layers: usize,
    batch: usize,
    cap: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    /// Positions to allocate at first (see [`KvCache::reserve`]).
    reserved: usize,
    decoder: Option<Box<FusedDecoder>>,
}

/// A slab cache's buffers as [`KvCache::slab_for`] hands them out.
pub(crate) struct SlabView {
    /// Per layer: keys and values `(b, kv_heads, cap, d)`.
    pub kv: Vec<(Tensor, Tensor)>,
    /// Positions cached.
    pub len: usize,
    /// Positions the buffers hold.
    pub cap: usize,
}

impl std::fmt::Debug for Slab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slab")
            .field("batch", &self.batch)
            .field("cap", &self.cap)
            .field("decoder", &self.decoder)
            .finish()
    }
}

impl Slab {
    /// A copy of the keys and values (not the decoding step, which is rebuilt on demand).
    fn copy(&self) -> Result<Slab> {
        let kv = self
            .kv
            .iter()
            .map(|(k, v)| Ok((k.copy()?, v.copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Slab {
            kv,
            layers: self.layers,
            batch: self.batch,
            cap: self.cap,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            device: self.device.clone(),
            reserved: self.reserved,
            decoder: None,
        })
    }

    fn bytes(&self) -> usize {
        self.kv
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Room for `need` positions of `batch` sequences, keeping the first `len`: the buffers
    /// double when they grow (and the decoding step is rebuilt over the new ones).
    fn ensure(&mut self, batch: usize, len: usize, need: usize) -> Result<()> {
        if batch != self.batch {
            if len > 0 {
                return Err(Error::Kv(format!(
                    "a cache of {} sequences got a batch of {batch}",
                    self.batch
                )));
            }
            self.kv.clear();
            self.cap = 0;
            self.batch = batch;
        }
        if need <= self.cap && self.kv.len() == self.layers {
            return Ok(());
        }
        let cap = need
            .max(self.cap * 2)
            .max(self.reserved)
            .max(64)
            .next_multiple_of(64);
        let shape = (batch, self.kv_heads, cap, self.head_dim);
        let mut kv = Vec::with_capacity(self.layers);
        for i in 0..self.layers {
            let k = Tensor::zeros(shape, self.dtype, &self.device)?;
            let v = Tensor::zeros(shape, self.dtype, &self.device)?;
            if let (true, Some((ok, ov))) = (len > 0, self.kv.get(i)) {
                k.slice_set(&ok.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                v.slice_set(&ov.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            kv.push((k, v));
        }
        self.kv = kv;
        self.cap = cap;
        self.decoder = None;
        Ok(())
    }
}

/// The KV cache: full (unbounded) unless an eviction policy is set
/// ([`KvCache::set_policy`], native caches).
#[derive(Debug)]
pub struct KvCache {
    inner: Inner,
    len: usize,
    policy: Option<Arc<dyn KvPolicy>>,
    /// A tensor cache's entries under a policy (positions, scores).
    tracked: Option<Box<Tracked>>,
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new(0)
    }
}

impl KvCache {
    /// A reference-path cache of candle tensors for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            inner: Inner::Tensors(vec![None; num_layers]),
            len: 0,
            policy: None,
            tracked: None,
        }
    }

    /// A fused-decoding cache (see [`Slab`]); buffers are allocated by the first call.
    pub(crate) fn new_slab(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            inner: Inner::Slab(Box::new(Slab {
                kv: Vec::new(),
                layers,
                batch: 0,
                cap: 0,
                kv_heads,
                head_dim,
                dtype,
                device: device.clone(),
                reserved: 0,
                decoder: None,
            })),
            len: 0,
            policy: None,
            tracked: None,
        }
    }

    /// Whether this cache runs fused decoding (see [`crate::Llama::new_fused_cache`]).
    pub fn is_slab(&self) -> bool {
        matches!(self.inner, Inner::Slab(_))
    }

    /// Room for `t` new positions of `b` sequences in a slab cache, for the fused prompt pass
    /// to write in place; [`KvCache::advance`] counts them once written.
    pub(crate) fn slab_for(&mut self, b: usize, t: usize) -> Result<SlabView> {
        let len = self.len;
        let Inner::Slab(s) = &mut self.inner else {
            return Err(Error::Kv("the fused prompt pass needs a slab cache".into()));
        };
        s.ensure(b, len, len + t)?;
        Ok(SlabView {
            kv: s.kv.clone(),
            len,
            cap: s.cap,
        })
    }

    /// Counts `t` positions written into a slab cache by the fused prompt pass.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// A single-token step of fused decoding for `b` sequences (`ids` `(b, 1)`): logits
    /// `(b, v)`.
    pub(crate) fn fused_step(
        &mut self,
        model: &crate::Llama,
        b: usize,
        ids: &Tensor,
    ) -> Result<Tensor> {
        let len = self.len;
        let Inner::Slab(s) = &mut self.inner else {
            return Err(Error::Kv("fused decoding needs a slab cache".into()));
        };
        s.ensure(b, len, len + 1)?;
        let decoder = match s.decoder.take() {
            Some(d) if d.fits(model, b, s.cap) => d,
            _ => Box::new(FusedDecoder::new(model, &s.kv, b, s.cap)?),
        };
        let decoder = s.decoder.insert(decoder);
        let logits = decoder.step(model, ids, len, len)?;
        self.len += 1;
        Ok(logits)
    }

    pub(crate) fn native(cache: NativeCache) -> Self {
        Self {
            inner: Inner::Native(Box::new(cache)),
            len: 0,
            policy: None,
            tracked: None,
        }
    }

    /// A copy of the cached keys and values (without a native cache's scratch buffers), to
    /// continue from later: a prefix cache shared by requests that start alike. `None` under an
    /// eviction policy (its entries no longer stand for a plain prefix).
    pub fn snapshot(&self) -> Option<Self> {
        if self.policy.is_some() {
            return None;
        }
        Some(Self {
            inner: match &self.inner {
                Inner::Native(c) => Inner::Native(Box::new(c.snapshot())),
                Inner::Tensors(t) => Inner::Tensors(t.clone()),
                Inner::Slab(sl) => Inner::Slab(Box::new(sl.copy().ok()?)),
            },
            len: self.len,
            policy: None,
            tracked: None,
        })
    }

    /// Whether this cache drives the native CPU path.
    pub fn is_native(&self) -> bool {
        matches!(self.inner, Inner::Native(_))
    }

    pub(crate) fn native_mut(&mut self) -> Option<&mut NativeCache> {
        match &mut self.inner {
            Inner::Native(c) => Some(c),
            _ => None,
        }
    }

    /// Sets the eviction policy (see [`crate::kv_policy`]), from the first token on; a full-cache
    /// policy is accepted anywhere. A tensor cache under a policy holds one sequence.
    pub fn set_policy(&mut self, policy: Arc<dyn KvPolicy>) -> Result<()> {
        if policy.capacity(usize::MAX / 2, 0) == usize::MAX {
            self.policy = None;
            return Ok(());
        }
        if !self.is_empty() {
            return Err(Error::Kv(format!(
                "set the policy `{}` before the first token",
                policy.name()
            )));
        }
        match &mut self.inner {
            Inner::Native(c) => c.track(policy.needs_scores()),
            Inner::Tensors(layers) => {
                self.tracked = Some(Box::new(Tracked::new(layers.len(), policy.needs_scores())))
            }
            // Eviction runs on the tensor cache: an empty slab becomes one.
            Inner::Slab(s) => {
                let layers = s.layers;
                self.inner = Inner::Tensors(vec![None; layers]);
                self.tracked = Some(Box::new(Tracked::new(layers, policy.needs_scores())));
            }
        }
        self.policy = Some(policy);
        Ok(())
    }

    /// Makes an empty native cache start at position `pos`: its first token is rotated as the
    /// token at `pos` of a longer sequence whose earlier entries were dropped.
    pub fn start_at(&mut self, pos: usize) -> Result<()> {
        let ok = match &mut self.inner {
            Inner::Native(c) => c.start_at(pos),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Kv(
                "only an empty native cache can start at a later position".into(),
            ))
        }
    }

    /// Positions and accumulated attention of each entry of (`layer`, `kv_head`) under a
    /// policy that keeps scores (H2O).
    pub fn head_scores(&self, layer: usize, kv_head: usize) -> Option<(Vec<u32>, Vec<f32>)> {
        match &self.inner {
            Inner::Native(c) => c.head_scores(layer, kv_head),
            Inner::Tensors(_) => self.tracked.as_ref()?.head(layer, kv_head),
            Inner::Slab(_) => None,
        }
    }

    /// Whether a forward call should add its attention rows to this tensor cache's scores.
    pub(crate) fn wants_scores(&self) -> bool {
        self.tracked.as_ref().is_some_and(|t| t.want_scores)
    }

    /// Adds `layer`'s attention rows `(1, k, rows, T)` to a tensor cache's scores.
    pub(crate) fn add_scores(&mut self, layer: usize, att: &Tensor) -> Result<()> {
        match &mut self.tracked {
            Some(t) => t.add_scores(layer, att),
            None => Ok(()),
        }
    }

    /// The sequence length this cache is planned for (prompt plus new tokens, or a perplexity
    /// window), which a budget given as a share resolves against; 0: unknown (then the share is
    /// of the tokens seen so far).
    pub fn plan(&mut self, len: usize) {
        if let Inner::Native(c) = &mut self.inner {
            c.plan(len);
        }
        if let Some(t) = &mut self.tracked {
            t.planned = len;
        }
    }

    /// The eviction policy, if one is set.
    pub fn policy(&self) -> Option<&Arc<dyn KvPolicy>> {
        self.policy.as_ref()
    }

    /// Applies the policy after a forward call.
    pub(crate) fn evict(&mut self) -> Result<()> {
        match (&self.policy, &mut self.inner, &mut self.tracked) {
            (Some(p), Inner::Native(c), _) => c.evict(p.as_ref()),
            (Some(p), Inner::Tensors(layers), Some(t)) => t.evict(p.as_ref(), layers, self.len)?,
            _ => {}
        }
        Ok(())
    }

    /// Entries each layer's heads hold now: [`KvCache::len`] unless a policy evicted some.
    pub fn entries(&self) -> usize {
        match &self.inner {
            Inner::Native(c) => c.entries(),
            Inner::Tensors(_) => self.tracked.as_ref().map_or(self.len, |t| t.entries()),
            Inner::Slab(_) => self.len,
        }
    }

    /// Bytes of keys and values held now, and the most held at once (native caches; the
    /// tensor cache reports its current size for both).
    pub fn kv_bytes(&self) -> (usize, usize) {
        match &self.inner {
            Inner::Native(c) => (c.bytes_used(), c.peak_bytes()),
            Inner::Tensors(layers) => {
                let b = layers
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
                    .sum();
                (b, b)
            }
            Inner::Slab(sl) => (sl.bytes(), sl.bytes()),
        }
    }

    /// Tokens seen so far: the position the next token takes.
    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Native(c) => c.len(),
            Inner::Tensors(_) | Inner::Slab(_) => self.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        match &mut self.inner {
            Inner::Tensors(layers) => layers.iter_mut().for_each(|l| *l = None),
            Inner::Native(c) => c.clear(),
            Inner::Slab(_) => {}
        }
        if let Some(t) = &mut self.tracked {
            **t = t.cleared();
        }
        self.len = 0;
    }

    /// Reserves room for `positions` in total (native and fused-decoding caches; a no-op for
    /// tensors).
    pub fn reserve(&mut self, positions: usize) {
        match &mut self.inner {
            Inner::Native(c) => c.reserve(positions),
            Inner::Slab(s) => s.reserved = s.reserved.max(positions),
            Inner::Tensors(_) => {}
        }
    }

    /// Appends `(b, k, t, d)` keys and values to `layer` of a tensor cache; returns the whole
    /// `(b, k, T, d)` cache.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if let Inner::Slab(s) = &mut self.inner {
            let (b, t) = (k.dims()[0], k.dims()[2]);
            if layer == 0 {
                s.ensure(b, self.len, self.len + t)?;
            }
            let (kc, vc) =
                s.kv.get(layer)
                    .ok_or_else(|| Error::Kv(format!("no layer {layer} in the cache")))?;
            if kc.dims()[0] != b {
                return Err(Error::Kv(format!(
                    "a cache of {} sequences got a batch of {b}",
                    kc.dims()[0]
                )));
            }
            kc.slice_set(&k.contiguous()?, 2, self.len)?;
            vc.slice_set(&v.contiguous()?, 2, self.len)?;
            let total = self.len + t;
            let out = (
                kc.narrow(2, 0, total)?.contiguous()?,
                vc.narrow(2, 0, total)?.contiguous()?,
            );
            if layer + 1 == s.layers {
                self.len += t;
            }
            return Ok(out);
        }
        let Inner::Tensors(layers) = &mut self.inner else {
            return Err(Error::Unsupported(
                "a native KV cache cannot take tensors; make one with KvCache::new".into(),
            ));
        };
        let (b, heads, t) = (k.dims()[0], k.dims()[1], k.dims()[2]);
        if let Some(tr) = &mut self.tracked {
            if b != 1 {
                return Err(Error::Kv(format!(
                    "a cache under an eviction policy holds one sequence, got a batch of {b}"
                )));
            }
            tr.appended(layer, heads, self.len, t);
        }
        let (k, v) = match layers.get(layer).cloned().flatten() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        let n = layers.len();
        if let Some(slot) = layers.get_mut(layer) {
            *slot = Some((k.clone(), v.clone()));
        }
        if layer + 1 == n {
            self.len += t;
        }
        Ok((k, v))
    }

    /// Drops cached positions past `len` (to rewind generation).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        match &mut self.inner {
            Inner::Native(c) => c.truncate(len),
            Inner::Slab(_) => self.len = self.len.min(len),
            Inner::Tensors(layers) => {
                if len >= self.len {
                    return Ok(());
                }
                if len == 0 {
                    self.clear();
                    return Ok(());
                }
                if let Some(t) = &mut self.tracked {
                    t.truncate(layers, len)?;
                    self.len = len;
                    return Ok(());
                }
                for (k, v) in layers.iter_mut().flatten() {
                    *k = k.narrow(2, 0, len)?;
                    *v = v.narrow(2, 0, len)?;
                }
                self.len = len;
            }
        }
        Ok(())
    }
}
