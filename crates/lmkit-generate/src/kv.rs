//! KV-cache policies: the full cache, a sliding window of recent positions, and H2O
//! ([`crate::h2o`]: heavy hitters by accumulated attention plus a recent window), behind
//! `lmkit_models::kv_policy::KvPolicy`, which the cache applies after every forward call. Set one
//! with [`crate::generate::Session::with_policy`] or `KvCache::set_policy`.

use std::sync::Arc;

pub use lmkit_models::kv_policy::{oldest, HeadView, KvPolicy};

use crate::{Error, Result};

/// How many entries a bounded policy keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// A share of the sequence, in `(0, 1]`: `ceil(r · L)` entries (at least 1), `L` the planned
    /// sequence length (a perplexity window; prompt + new tokens), or the tokens seen so far
    /// when that is unknown or exceeded. The paper's setting ("20% KV cache": its budget is the
    /// share of the whole sequence, so nothing is evicted until the cache holds that many).
    Ratio(f64),
    /// A fixed number of entries: memory bounded for generations of any length.
    Tokens(usize),
}

impl Budget {
    /// Parses `0.2` (a ratio, `0 < r ≤ 1`), `20%`, or `256` (a token count ≥ 1).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Kv(format!("budget `{s}`: {why}"));
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad("not a percentage"))?;
            return Budget::ratio(v / 100.0).map_err(|_| bad("must be in (0%, 100%]"));
        }
        if s.contains('.') {
            let v: f64 = s.parse().map_err(|_| bad("not a number"))?;
            return Budget::ratio(v).map_err(|_| bad("a ratio must be in (0, 1]"));
        }
        match s.parse::<usize>() {
            Ok(0) => Err(bad("a token count must be at least 1")),
            Ok(1) => Ok(Budget::Ratio(1.0)),
            Ok(n) => Ok(Budget::Tokens(n)),
            Err(_) => Err(bad(
                "expected a ratio like 0.2, a percentage like 20%, or a count",
            )),
        }
    }

    pub fn ratio(r: f64) -> Result<Self> {
        if r.is_finite() && r > 0.0 && r <= 1.0 {
            Ok(Budget::Ratio(r))
        } else {
            Err(Error::Kv(format!("budget ratio {r} must be in (0, 1]")))
        }
    }

    /// Entries kept after `seen` tokens of a sequence planned to be `planned` long (0: unknown).
    pub fn capacity(&self, seen: usize, planned: usize) -> usize {
        match *self {
            Budget::Ratio(r) => {
                let len = planned.max(seen).max(1);
                ((r * len as f64).ceil() as usize).max(1)
            }
            Budget::Tokens(n) => n,
        }
    }

    /// Whether this budget keeps everything.
    pub fn is_full(&self) -> bool {
        matches!(self, Budget::Ratio(r) if *r >= 1.0)
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Ratio(r) => write!(f, "{}%", r * 100.0),
            Budget::Tokens(n) => write!(f, "{n} tokens"),
        }
    }
}

/// Keeps every entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct FullCache;

impl KvPolicy for FullCache {
    fn name(&self) -> String {
        "full".into()
    }
    fn capacity(&self, _seen: usize, _planned: usize) -> usize {
        usize::MAX
    }
    fn evict(&self, _head: &HeadView, _n: usize, _out: &mut Vec<usize>) {}
}

/// Keeps the most recent entries only (a sliding window over the sequence).
#[derive(Debug, Clone, Copy)]
pub struct SlidingWindow {
    pub budget: Budget,
}

impl KvPolicy for SlidingWindow {
    fn name(&self) -> String {
        format!("window {}", self.budget)
    }
    fn capacity(&self, seen: usize, planned: usize) -> usize {
        self.budget.capacity(seen, planned)
    }
    fn evict(&self, head: &HeadView, n: usize, out: &mut Vec<usize>) {
        oldest(head.positions, n, out);
    }
}

/// The policy named `name` (`full`, `window`, `h2o`) with `budget`; `recent` is H2O's share of
/// the budget kept for the most recent tokens (the paper's 0.5: 10% heavy hitters + 10% recent
/// for a 20% cache).
pub fn policy(name: &str, budget: Budget, recent: f64) -> Result<Arc<dyn KvPolicy>> {
    if !(0.0..=1.0).contains(&recent) {
        return Err(Error::Kv(format!(
            "recent share {recent} must be in [0, 1]"
        )));
    }
    Ok(match name {
        "full" => Arc::new(FullCache),
        _ if budget.is_full() => Arc::new(FullCache),
        "window" => Arc::new(SlidingWindow { budget }),
        "h2o" => Arc::new(crate::h2o::H2o { budget, recent }),
        n => {
            return Err(Error::Kv(format!(
                "policy `{n}`: expected full, window or h2o"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_and_bound() {
        assert_eq!(Budget::parse("0.2").unwrap(), Budget::Ratio(0.2));
        assert_eq!(Budget::parse("20%").unwrap(), Budget::Ratio(0.2));
        assert_eq!(Budget::parse("256").unwrap(), Budget::Tokens(256));
        assert!(Budget::parse("1").unwrap().is_full());
        for bad in ["0", "0.0", "1.5", "-3", "abc", "120%"] {
            assert!(Budget::parse(bad).is_err(), "{bad}");
        }
        let b = Budget::Ratio(0.2);
        assert_eq!(b.capacity(0, 0), 1);
        assert_eq!(b.capacity(1, 0), 1);
        assert_eq!(b.capacity(10, 0), 2);
        assert_eq!(b.capacity(11, 0), 3);
        // Against the planned length: fixed until the sequence outgrows its plan.
        assert_eq!(b.capacity(3, 100), 20);
        assert_eq!(b.capacity(100, 100), 20);
        assert_eq!(b.capacity(200, 100), 40);
        assert_eq!(Budget::Tokens(7).capacity(1000, 10), 7);
    }

    #[test]
    fn the_window_evicts_the_oldest() {
        let positions = [9, 3, 7, 1, 5];
        let mut out = vec![];
        SlidingWindow {
            budget: Budget::Tokens(3),
        }
        .evict(
            &HeadView {
                positions: &positions,
                scores: None,
                seen: 10,
            },
            2,
            &mut out,
        );
        out.sort();
        assert_eq!(out, vec![1, 3]);
        assert!(policy("lru", Budget::Ratio(0.2), 0.5).is_err());
        assert!(policy("h2o", Budget::Ratio(0.2), 1.5).is_err());
        assert_eq!(
            policy("h2o", Budget::Ratio(1.0), 0.5).unwrap().name(),
            "full"
        );
    }
}
