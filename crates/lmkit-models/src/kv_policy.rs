//! The KV-cache eviction policy interface: which cached positions a layer's head keeps once
//! the cache is over its budget. The policies themselves (full, sliding window, H2O) live in
//! `lmkit-generate` (`lmkit_generate::kv`, `lmkit_generate::h2o`); the cache that applies them
//! lives here because the forward pass fills in what they read (positions, attention scores).
//!
//! A policy is set on a [`KvCache`](crate::KvCache) with
//! [`KvCache::set_policy`](crate::KvCache::set_policy). After every forward call the cache asks the
//! policy for its capacity after `seen` tokens and, for each (layer, KV head) over it, which
//! entries to evict. Both caches evict: the native CPU path's buffers and the reference path's
//! tensors (any device, one sequence). Every head keeps the same number of entries (its own choice of which), so the
//! cache has one length; positions keep their true RoPE rotation (no positional rolling).

use std::fmt::Debug;

/// One (layer, KV head) of the cache as a policy sees it.
pub struct HeadView<'a> {
    /// Absolute position of each entry (entries are in no particular order).
    pub positions: &'a [u32],
    /// Accumulated attention each entry received (summed over the query heads that read this
    /// KV head), when the policy asked for scores.
    pub scores: Option<&'a [f32]>,
    /// Tokens seen so far (the next position).
    pub seen: usize,
}

/// A KV-cache eviction policy.
pub trait KvPolicy: Debug + Send + Sync {
    /// A short name for reports (`full`, `window 20%`, `h2o 20%`).
    fn name(&self) -> String;
    /// Entries a head keeps after `seen` tokens of a sequence planned to be `planned` long (0
    /// when unknown; see [`KvCache::plan`](crate::KvCache::plan)); `usize::MAX`: unbounded.
    fn capacity(&self, seen: usize, planned: usize) -> usize;
    /// Whether [`KvPolicy::evict`] reads accumulated attention scores (they cost a pass over
    /// each attention row).
    fn needs_scores(&self) -> bool {
        false
    }
    /// Pushes onto `out` the indices of `n` entries of `head` to evict.
    fn evict(&self, head: &HeadView, n: usize, out: &mut Vec<usize>);
}

/// Pushes the indices of the `n` entries with the smallest positions (the oldest).
pub fn oldest(positions: &[u32], n: usize, out: &mut Vec<usize>) {
    let mut idx: Vec<usize> = (0..positions.len()).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return;
    }
    if n < idx.len() {
        idx.select_nth_unstable_by_key(n - 1, |&i| positions[i]);
    }
    out.extend_from_slice(&idx[..n]);
}
