//! The key/value cache: per layer, keys and values of every position seen so far.

use lmkit_core::Tensor;

use crate::Result;

/// Full (unbounded) KV cache.
///
/// # Shapes
/// Per layer: keys and values `(b, k, T, d)`, `T` the positions cached so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Appends `(b, k, t, d)` keys and values to `layer`; returns the whole `(b, k, T, d)` cache.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dims()[2];
        let (k, v) = match self.layers.get(layer).cloned().flatten() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        if let Some(slot) = self.layers.get_mut(layer) {
            *slot = Some((k.clone(), v.clone()));
        }
        if layer + 1 == self.layers.len() {
            self.len += t;
        }
        Ok((k, v))
    }

    /// Drops cached positions past `len` (to rewind generation).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(2, 0, len)?;
            *v = v.narrow(2, 0, len)?;
        }
        self.len = len;
        Ok(())
    }
}
