//! The key/value cache: per layer, keys and values of every position seen so far.
//!
//! Two layouts, chosen when the cache is made: [`Llama::new_cache`](crate::Llama::new_cache)
//! gives the native CPU path's preallocated per-head buffers when the model runs on lmkit's
//! kernels, and [`KvCache::new`] gives the candle tensors of the reference path (any device,
//! batches). The cache kind decides which forward path a call takes.

use lmkit_core::Tensor;

use crate::native::NativeCache;
use crate::{Error, Result};

#[derive(Debug, Clone)]
enum Inner {
    /// Per layer: keys and values `(b, k, T, d)`.
    Tensors(Vec<Option<(Tensor, Tensor)>>),
    Native(Box<NativeCache>),
}

/// Full (unbounded) KV cache.
#[derive(Debug, Clone)]
pub struct KvCache {
    inner: Inner,
    len: usize,
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
        }
    }

    pub(crate) fn native(cache: NativeCache) -> Self {
        Self {
            inner: Inner::Native(Box::new(cache)),
            len: 0,
        }
    }

    /// Whether this cache drives the native CPU path.
    pub fn is_native(&self) -> bool {
        matches!(self.inner, Inner::Native(_))
    }

    pub(crate) fn native_mut(&mut self) -> Option<&mut NativeCache> {
        match &mut self.inner {
            Inner::Native(c) => Some(c),
            Inner::Tensors(_) => None,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Native(c) => c.len(),
            Inner::Tensors(_) => self.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        match &mut self.inner {
            Inner::Tensors(layers) => layers.iter_mut().for_each(|l| *l = None),
            Inner::Native(c) => c.clear(),
        }
        self.len = 0;
    }

    /// Reserves room for `positions` in total (native caches; a no-op for tensors).
    pub fn reserve(&mut self, positions: usize) {
        if let Inner::Native(c) = &mut self.inner {
            c.reserve(positions);
        }
    }

    /// Appends `(b, k, t, d)` keys and values to `layer` of a tensor cache; returns the whole
    /// `(b, k, T, d)` cache.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let Inner::Tensors(layers) = &mut self.inner else {
            return Err(Error::Unsupported(
                "a native KV cache cannot take tensors; make one with KvCache::new".into(),
            ));
        };
        let t = k.dims()[2];
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
            Inner::Tensors(layers) => {
                if len >= self.len {
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
