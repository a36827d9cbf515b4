//! H2O: heavy-hitter KV-cache eviction.
//!
//! "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
//! (Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen; NeurIPS 2023,
//! arXiv 2306.14048; reference code FMInference/H2O).
//!
//! At decoding step `i` a head's cache holds the set `S_{i−1}` of past positions. The new query
//! attends over `S_{i−1} ∪ {i}`:
//!
//! ```text
//! a_i = softmax(q_i K_{S_{i−1}∪{i}}ᵀ / √d)               (attention row of step i)
//! F(s) = Σ_{j ≤ i, s ∈ S_{j−1}∪{j}} a_j[s]              (accumulated attention of position s)
//! ```
//!
//! and when the cache is over its budget `k` the policy keeps the `r` most recent positions and
//! the `k − r` others with the largest `F` ("heavy hitters"): the greedy step of the paper's
//! Algorithm 1, `S_i = (S_{i−1} ∪ {i}) \ {u}`, `u = argmin_{v not recent} F(v)`, which drops one
//! position per step once the cache is full. `F` lives in lmkit-models' native cache, whose
//! attention kernel adds each attention row to it as the kernel computes it; on the reference
//! path (candle tensors, any device) the tensor cache adds each layer's attention rows, summed
//! on the device.
//!
//! Deviations:
//! - Grouped-query attention: a KV head is shared by `g` query heads, so the score of an entry is
//!   `F` summed over those `g` heads and the group evicts together (the paper's models have one
//!   query head per KV head, where this is the paper's per-head rule).
//! - Positions keep their true rotary angle (no positional rolling), as in the paper's accuracy
//!   experiments (the reference's "real drop" Llama code re-numbers positions within the cache;
//!   lmkit does not, so the model sees true distances).
//! - The budget is a share of the planned sequence length (the paper's "20% KV cache": a
//!   perplexity window, or prompt + new tokens), fixed while the sequence stays within its plan,
//!   or a token count (memory bounded for any length).
//! - A prompt run in one forward call attends with its whole cache; eviction happens after each
//!   call, so the prompt's scores pick the first heavy hitters (as the reference does after
//!   prefill).

use crate::kv::{oldest, Budget, HeadView, KvPolicy};

/// Heavy hitters plus a recent window, `budget` entries per head in all.
#[derive(Debug, Clone, Copy)]
pub struct H2o {
    pub budget: Budget,
    /// Share of the budget kept for the most recent positions, in `[0, 1]` (paper: 0.5).
    pub recent: f64,
}

impl H2o {
    /// Recent positions kept out of a capacity of `cap`.
    pub fn recent_len(&self, cap: usize) -> usize {
        ((cap as f64 * self.recent).round() as usize).min(cap)
    }
}

impl KvPolicy for H2o {
    fn name(&self) -> String {
        format!("h2o {}", self.budget)
    }

    fn capacity(&self, seen: usize, planned: usize) -> usize {
        self.budget.capacity(seen, planned)
    }

    fn needs_scores(&self) -> bool {
        true
    }

    fn evict(&self, head: &HeadView, n: usize, out: &mut Vec<usize>) {
        let Some(scores) = head.scores else {
            // Without scores H2O has nothing to rank by: fall back to the window.
            return oldest(head.positions, n, out);
        };
        let cap = head.positions.len().saturating_sub(n);
        let recent = self.recent_len(cap);
        let cutoff = head.seen.saturating_sub(recent);
        let mut old: Vec<usize> = (0..head.positions.len())
            .filter(|&e| (head.positions[e] as usize) < cutoff)
            .collect();
        let take = n.min(old.len());
        if take > 0 && take < old.len() {
            old.select_nth_unstable_by(take - 1, |&a, &b| scores[a].total_cmp(&scores[b]));
        }
        out.extend_from_slice(&old[..take]);
        if take < n {
            // The recent window alone exceeds the capacity: drop its oldest.
            let rest: Vec<usize> = (0..head.positions.len())
                .filter(|e| !out.contains(e))
                .collect();
            let pos: Vec<u32> = rest.iter().map(|&e| head.positions[e]).collect();
            let mut pick = Vec::new();
            oldest(&pos, n - take, &mut pick);
            out.extend(pick.into_iter().map(|i| rest[i]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_heavy_hitters_and_the_recent_window() {
        // Positions 0..10; budget 4 after evicting 6: recent 2 (positions 8, 9), and the two
        // highest scores among 0..8 (positions 0 and 5).
        let positions: Vec<u32> = (0..10).collect();
        let scores = [5.0, 0.1, 0.2, 0.3, 0.1, 2.0, 0.4, 0.2, 0.0, 0.0];
        let p = H2o {
            budget: Budget::Tokens(4),
            recent: 0.5,
        };
        let mut out = vec![];
        p.evict(
            &HeadView {
                positions: &positions,
                scores: Some(&scores),
                seen: 10,
            },
            6,
            &mut out,
        );
        out.sort();
        assert_eq!(out, vec![1, 2, 3, 4, 6, 7]);
    }

    #[test]
    fn an_all_recent_budget_is_a_window() {
        let positions: Vec<u32> = vec![4, 0, 3, 1, 2];
        let scores = [0.0, 9.0, 0.0, 9.0, 0.0];
        let p = H2o {
            budget: Budget::Tokens(3),
            recent: 1.0,
        };
        let mut out = vec![];
        p.evict(
            &HeadView {
                positions: &positions,
                scores: Some(&scores),
                seen: 5,
            },
            2,
            &mut out,
        );
        out.sort();
        assert_eq!(out, vec![1, 3]);
    }
}
