//! Eviction on the reference path's tensor cache (any device, the GPU included): the absolute
//! position of every entry of each (layer, KV head), the attention each entry accumulated (a
//! `(1, k, T)` f32 tensor per layer, on the device), and the gather that drops entries. The
//! native CPU cache does the same on its own buffers (`native.rs`); both ask the same
//! [`KvPolicy`] which entries to drop, so both keep the same ones.
//!
//! Entries stay in insertion order (kept ones first, a call's new ones appended), so the causal
//! mask of a multi-token call still sees its new tokens as the cache's last ones.

use lmkit_core::{DType, Tensor};

use crate::kv_policy::HeadView;
use crate::{Error, KvPolicy, Result};

#[derive(Debug, Clone)]
pub(crate) struct Tracked {
    /// Per layer, per KV head: each entry's absolute position.
    positions: Vec<Vec<Vec<u32>>>,
    /// Per layer: the accumulated attention `(1, k, T)`, when the policy reads scores.
    scores: Vec<Option<Tensor>>,
    pub(crate) want_scores: bool,
    pub(crate) planned: usize,
}

impl Tracked {
    pub(crate) fn new(layers: usize, want_scores: bool) -> Self {
        Self {
            positions: vec![Vec::new(); layers],
            scores: vec![None; layers],
            want_scores,
            planned: 0,
        }
    }

    /// Entries each head holds now.
    pub(crate) fn entries(&self) -> usize {
        self.positions
            .first()
            .and_then(|l| l.first())
            .map_or(0, Vec::len)
    }

    /// The same tracking, emptied (a cleared cache).
    pub(crate) fn cleared(&self) -> Self {
        Self {
            planned: self.planned,
            ..Self::new(self.positions.len(), self.want_scores)
        }
    }

    /// Records `t` new entries of `layer`'s `kv_heads` heads at positions `from..from + t`.
    pub(crate) fn appended(&mut self, layer: usize, kv_heads: usize, from: usize, t: usize) {
        if let Some(heads) = self.positions.get_mut(layer) {
            if heads.len() != kv_heads {
                heads.resize(kv_heads, Vec::new());
            }
            for p in heads.iter_mut() {
                p.extend((from..from + t).map(|i| i as u32));
            }
        }
    }

    /// Adds the attention rows `att (1, k, rows, T)` of `layer`, summed over the rows (every
    /// query head of a KV head's group and every new token), to its entries' scores.
    pub(crate) fn add_scores(&mut self, layer: usize, att: &Tensor) -> Result<()> {
        if !self.want_scores {
            return Ok(());
        }
        let s = att.to_dtype(DType::F32)?.sum(2)?; // (1, k, T)
        let total = s.dims()[2];
        let sum = match self.scores.get_mut(layer).and_then(Option::take) {
            None => s,
            Some(prev) => {
                let pad = total.saturating_sub(prev.dims()[2]);
                (prev.pad_with_zeros(2, 0, pad)? + s)?
            }
        };
        if let Some(slot) = self.scores.get_mut(layer) {
            *slot = Some(sum);
        }
        Ok(())
    }

    /// Positions and scores of (`layer`, `kv_head`).
    pub(crate) fn head(&self, layer: usize, kv_head: usize) -> Option<(Vec<u32>, Vec<f32>)> {
        let pos = self.positions.get(layer)?.get(kv_head)?.clone();
        let scores = self.scores.get(layer)?.as_ref()?;
        let s = scores.narrow(1, kv_head, 1).ok()?.flatten_all().ok()?;
        Some((pos, s.to_vec1::<f32>().ok()?))
    }

    /// Drops entries down to the policy's capacity after `seen` tokens: per layer and KV head
    /// the policy picks `n` entries (topped up with the oldest, as the native cache does, so
    /// every head keeps one length), and the keys, values and scores are gathered.
    pub(crate) fn evict(
        &mut self,
        policy: &dyn KvPolicy,
        layers: &mut [Option<(Tensor, Tensor)>],
        seen: usize,
    ) -> Result<()> {
        let len = self.entries();
        let cap = policy.capacity(seen, self.planned);
        if len <= cap {
            return Ok(());
        }
        let n = len - cap;
        let mut out = Vec::new();
        let mut keep_all = Vec::with_capacity(layers.len());
        for (l, slot) in layers.iter().enumerate() {
            if slot.is_none() {
                keep_all.push(Vec::new());
                continue;
            }
            let host: Option<Vec<Vec<f32>>> = match &self.scores[l] {
                Some(s) => Some(s.squeeze(0)?.to_vec2::<f32>()?),
                None => None,
            };
            let mut keep_heads = Vec::with_capacity(self.positions[l].len());
            for (h, positions) in self.positions[l].iter().enumerate() {
                out.clear();
                let view = HeadView {
                    positions,
                    scores: host.as_ref().map(|s| s[h].as_slice()),
                    seen,
                };
                policy.evict(&view, n, &mut out);
                out.sort_unstable();
                out.dedup();
                out.retain(|&e| e < len);
                if out.len() < n {
                    let mut rest: Vec<usize> =
                        (0..len).filter(|e| out.binary_search(e).is_err()).collect();
                    rest.sort_by_key(|&e| positions[e]);
                    out.extend(rest.into_iter().take(n - out.len()));
                    out.sort_unstable();
                }
                out.truncate(n);
                keep_heads.push(
                    (0..len as u32)
                        .filter(|e| out.binary_search(&(*e as usize)).is_err())
                        .collect(),
                );
            }
            keep_all.push(keep_heads);
        }
        self.gather(layers, &keep_all)
    }

    /// Drops the entries at positions `len` and later (a rewind); every head must keep the
    /// same number (they do unless a policy evicted some of those positions in one head only).
    pub(crate) fn truncate(
        &mut self,
        layers: &mut [Option<(Tensor, Tensor)>],
        len: usize,
    ) -> Result<()> {
        let keep_all: Vec<Vec<Vec<u32>>> = self
            .positions
            .iter()
            .map(|heads| {
                heads
                    .iter()
                    .map(|p| {
                        (0..p.len() as u32)
                            .filter(|&e| (p[e as usize] as usize) < len)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let counts: Vec<usize> = keep_all.iter().flatten().map(Vec::len).collect();
        if counts.windows(2).any(|w| w[0] != w[1]) {
            return Err(Error::Kv(format!(
                "cannot rewind to {len} tokens: the heads evicted different positions after it"
            )));
        }
        self.gather(layers, &keep_all)
    }

    /// Keeps entries `keep[layer][head]` (ascending indices) of every layer's keys, values,
    /// scores and positions.
    fn gather(
        &mut self,
        layers: &mut [Option<(Tensor, Tensor)>],
        keep: &[Vec<Vec<u32>>],
    ) -> Result<()> {
        for (l, slot) in layers.iter_mut().enumerate() {
            let (Some((k, v)), Some(heads)) = (slot.as_ref(), keep.get(l)) else {
                continue;
            };
            let mut ks = Vec::with_capacity(heads.len());
            let mut vs = Vec::with_capacity(heads.len());
            let mut ss = Vec::with_capacity(heads.len());
            for (h, kept) in heads.iter().enumerate() {
                let idx = Tensor::new(kept.as_slice(), k.device())?;
                ks.push(k.narrow(1, h, 1)?.index_select(&idx, 2)?);
                vs.push(v.narrow(1, h, 1)?.index_select(&idx, 2)?);
                if let Some(s) = &self.scores[l] {
                    ss.push(s.narrow(1, h, 1)?.index_select(&idx, 2)?);
                }
                let pos = &mut self.positions[l][h];
                *pos = kept.iter().map(|&e| pos[e as usize]).collect();
            }
            if ks.is_empty() {
                continue;
            }
            *slot = Some((Tensor::cat(&ks, 1)?, Tensor::cat(&vs, 1)?));
            if !ss.is_empty() {
                self.scores[l] = Some(Tensor::cat(&ss, 1)?);
            }
        }
        Ok(())
    }
}
