//! DSIR: Xie et al., "Data Selection for Language Models via Importance Resampling" (NeurIPS
//! 2023, arXiv 2302.03169; reference code p-lambda/dsir, PyPI `data-selection`, class
//! `HashedNgramDSIR`).
//!
//! Each document becomes a bag of hashed n-grams: lowercased, split into words by the
//! word-punctuation rule `\w+|[^\w\s]+`, then every unigram and every contiguous n-gram up to
//! order `n` (joined by one space) goes to bucket `int(sha256(gram), big-endian) mod buckets`.
//! With `c_x` the bucket counts of document `x`:
//!
//! ```text
//! p̂_raw  = Σ_x∈raw c_x / Σ counts                     (no smoothing)
//! p̂_tgt  = (Σ_x∈tgt c_x + λ) / Σ (counts + λ)           (λ: Laplace smoothing, default 0)
//! log w(x) = Σ_b c_x[b] · (log(p̂_tgt[b] + 1e-8) − log(p̂_raw[b] + 1e-8))
//! select the k largest  log w(x) + G_x,  G_x ~ Gumbel(0, 1)   (sampling ∝ w without replacement)
//! ```
//!
//! With a tokenizer (`Features::tokenizer`, an lmkit extension) the units are its tokens instead
//! of lowercased words: an n-gram is its token ids in decimal joined by one space, hashed the
//! same way, and `min_length` counts tokens. The selection then sees what a model trained on it
//! sees (case, code indentation, sub-word pieces).
//!
//! Otherwise the k largest `log w(x)` (`top_k`). Documents shorter than `min_length` words are never
//! selected. The KL reduction of a selection `S` (the paper's data metric, §5) is
//! `KL(p̂_tgt ‖ p̂_raw) − KL(p̂_tgt ‖ p̂_S)` over the same hashed features.
//!
//! Deviations: the Gumbel noise comes from a counter-based generator keyed by (seed, document
//! index), so a selection is reproducible and independent of threads (the reference draws from
//! numpy's unseeded global generator); `\w` is Rust's alphanumeric-or-underscore, which differs
//! from Python's `str.isalnum` only on combining marks of some scripts; the KL reduction uses
//! the same `1e-8` inside the logarithms as the weights (the reference has no KL code); the
//! raw distribution is counted over the whole pool (the reference's default fits it on the
//! first `100,000 × buckets` features, which for pools of its size is most of them). Buckets
//! are memoized per thread under a 64-bit hash of the n-gram's words: two distinct n-grams
//! with the same 64-bit key would share a bucket, a chance of about n²/2⁶⁵ for n distinct
//! n-grams (3·10⁻⁶ for ten million).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use std::path::PathBuf;

use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::corpus::{self, Layout, ReadStats, Record};
use crate::{Error, Result};
use lmkit_rand::mix;

/// The epsilon inside the logarithms, as the reference.
const EPS: f64 = 1e-8;

/// Splits a text into token ids: n-grams of tokens instead of words (`Features::tokenizer`).
pub trait Tokenize: Send + Sync {
    /// The token ids of `text`, without special tokens.
    fn ids(&self, text: &str) -> Vec<u32>;
    /// A short name for reports (the tokenizer's path).
    fn name(&self) -> String;
}

/// How documents become hashed n-gram features.
#[derive(Clone, Serialize)]
pub struct Features {
    /// Largest n-gram order (unigrams are always in).
    pub ngrams: usize,
    pub buckets: u32,
    /// N-grams of this tokenizer's tokens (case kept; an n-gram is its ids in decimal, joined
    /// by spaces) instead of lowercased words. `min_length` then counts tokens.
    #[serde(rename = "tokenizer", serialize_with = "tokenizer_name")]
    pub tokenizer: Option<std::sync::Arc<dyn Tokenize>>,
}

fn tokenizer_name<S: serde::Serializer>(
    t: &Option<std::sync::Arc<dyn Tokenize>>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&t.name()),
        None => s.serialize_none(),
    }
}

impl std::fmt::Debug for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Features")
            .field("ngrams", &self.ngrams)
            .field("buckets", &self.buckets)
            .field("tokenizer", &self.tokenizer.as_ref().map(|t| t.name()))
            .finish()
    }
}

impl Default for Features {
    /// The reference's defaults: unigrams and bigrams of words, 10,000 buckets.
    fn default() -> Self {
        Self {
            ngrams: 2,
            buckets: 10_000,
            tokenizer: None,
        }
    }
}

fn is_word(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

fn is_space(c: char) -> bool {
    // Python's `\s` also has the four separators U+001C..U+001F.
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `re.findall(r"\w+|[^\w\s]+", text.lower())`.
pub fn words(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut spans = Vec::new();
    word_spans(&lower, &mut spans);
    spans
        .iter()
        .map(|&(a, b)| lower[a..b].to_string())
        .collect()
}

/// The byte ranges of [`words`] in an already lowercased text, appended to `out`.
fn word_spans(lower: &str, out: &mut Vec<(usize, usize)>) {
    let mut start: Option<(usize, bool)> = None;
    for (i, c) in lower.char_indices() {
        if is_space(c) {
            if let Some((a, _)) = start.take() {
                out.push((a, i));
            }
            continue;
        }
        let w = is_word(c);
        match start {
            Some((a, kind)) if kind != w => {
                out.push((a, i));
                start = Some((i, w));
            }
            Some(_) => {}
            None => start = Some((i, w)),
        }
    }
    if let Some((a, _)) = start {
        out.push((a, lower.len()));
    }
}

/// `int.from_bytes(d, "big") % m` of a SHA-256 digest, eight bytes at a time.
fn digest_mod(d: &[u8], m: u64) -> u32 {
    let m = u128::from(m);
    let r = d.chunks(8).fold(0u128, |r, c| {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        ((r << (8 * c.len())) | u128::from(u64::from_be_bytes(b) >> (8 * (8 - c.len())))) % m
    });
    r as u32
}

/// A per-thread, direct-mapped memo of n-gram buckets: text repeats (Zipf), SHA-256 need not.
/// Slots are keyed by a 64-bit hash of the n-gram's words; see the module's deviations.
struct Memo {
    /// The bucket count in the low bits, and bit 32 set for token (not word) keys.
    mode: u64,
    keys: Vec<u64>,
    vals: Vec<u32>,
}

/// Slots of a thread's memo (12 bytes each).
const MEMO_SLOTS: usize = 1 << 20;
const EMPTY: u32 = u32::MAX;

thread_local! {
    static MEMO: std::cell::RefCell<Memo> = const { std::cell::RefCell::new(Memo {
        mode: 0,
        keys: Vec::new(),
        vals: Vec::new(),
    }) };
}

/// A 64-bit hash of a word (fixed seed: the same in every thread and run).
fn word_key(w: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x5d51_72a9).hash_one(w)
}

/// The key of an n-gram from its words' keys (order matters).
fn gram_key(keys: &[u64]) -> u64 {
    let mut z = (keys.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &k in keys {
        z = (z.rotate_left(23) ^ k).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z ^= z >> 29;
    }
    z
}

impl Features {
    /// Checks the options.
    pub fn check(&self) -> Result<()> {
        if self.ngrams == 0 {
            return Err(invalid("ngrams", "must be at least 1"));
        }
        if self.buckets == 0 {
            return Err(invalid("buckets", "must be at least 1"));
        }
        Ok(())
    }

    /// The bucket of one n-gram.
    pub fn bucket(&self, gram: &str) -> u32 {
        digest_mod(&Sha256::digest(gram.as_bytes()), u64::from(self.buckets))
    }

    /// The buckets of every feature of `text` appended to `out`; returns the unit count (words,
    /// or tokens with a tokenizer).
    pub fn hash_into(&self, text: &str, out: &mut Vec<u32>) -> usize {
        match &self.tokenizer {
            None => {
                let lower = text.to_lowercase();
                let mut spans = Vec::new();
                word_spans(&lower, &mut spans);
                let keys: Vec<u64> = spans.iter().map(|&(a, b)| word_key(&lower[a..b])).collect();
                self.hash_grams(&keys, false, out, |i, gram| {
                    gram.push_str(&lower[spans[i].0..spans[i].1])
                });
                spans.len()
            }
            Some(t) => {
                let ids = t.ids(text);
                let keys: Vec<u64> = ids.iter().map(|&id| mix(u64::from(id))).collect();
                self.hash_grams(&keys, true, out, |i, gram| {
                    use std::fmt::Write as _;
                    let _ = write!(gram, "{}", ids[i]);
                });
                ids.len()
            }
        }
    }

    /// Every n-gram of the units with these keys, through the memo; `unit(i, gram)` appends
    /// unit `i`'s text to the n-gram's string when its bucket must be computed.
    fn hash_grams(
        &self,
        keys: &[u64],
        tokens: bool,
        out: &mut Vec<u32>,
        unit: impl Fn(usize, &mut String),
    ) {
        let mode = u64::from(self.buckets) | (u64::from(tokens) << 32);
        MEMO.with(|memo| {
            let mut memo = memo.borrow_mut();
            if memo.mode != mode || memo.keys.len() != MEMO_SLOTS {
                memo.mode = mode;
                memo.keys = vec![0; MEMO_SLOTS];
                memo.vals = vec![EMPTY; MEMO_SLOTS];
            }
            let mut gram = String::new();
            for n in 1..=self.ngrams {
                for (start, ks) in keys.windows(n).enumerate() {
                    let key = gram_key(ks);
                    let slot = (key >> 44) as usize & (MEMO_SLOTS - 1);
                    if memo.keys[slot] == key && memo.vals[slot] != EMPTY {
                        out.push(memo.vals[slot]);
                        continue;
                    }
                    gram.clear();
                    for i in start..start + n {
                        if i > start {
                            gram.push(' ');
                        }
                        unit(i, &mut gram);
                    }
                    let b = self.bucket(&gram);
                    memo.keys[slot] = key;
                    memo.vals[slot] = b;
                    out.push(b);
                }
            }
        });
    }
}

fn invalid(what: &str, why: &str) -> Error {
    Error::Invalid {
        what: what.into(),
        why: why.into(),
    }
}

/// Summed bucket counts of a set of documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Counts {
    pub counts: Vec<u64>,
    pub docs: u64,
}

impl Counts {
    pub fn new(buckets: u32) -> Self {
        Self {
            counts: vec![0; buckets as usize],
            docs: 0,
        }
    }

    /// Adds one document's features.
    pub fn add(&mut self, feats: &[u32]) {
        for &b in feats {
            self.counts[b as usize] += 1;
        }
        self.docs += 1;
    }

    /// Adds another set's counts (same bucket count).
    pub fn merge(&mut self, other: &Counts) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.docs += other.docs;
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(counts + λ) / Σ (counts + λ)`.
    pub fn probs(&self, laplace: f64) -> Vec<f64> {
        let total = self.total() as f64 + laplace * self.counts.len() as f64;
        self.counts
            .iter()
            .map(|&c| (c as f64 + laplace) / total.max(f64::MIN_POSITIVE))
            .collect()
    }
}

/// The importance-weight estimator: `log p̂_tgt − log p̂_raw` per bucket.
#[derive(Debug, Clone)]
pub struct Estimator {
    pub log_diff: Vec<f64>,
    pub target: Vec<f64>,
    pub raw: Vec<f64>,
}

impl Estimator {
    /// From the target's and the raw pool's counts.
    pub fn new(target: &Counts, raw: &Counts, laplace: f64) -> Result<Self> {
        if target.counts.len() != raw.counts.len() {
            return Err(invalid("buckets", "target and raw counts differ in size"));
        }
        if target.total() == 0 {
            return Err(invalid(
                "target",
                "has no features (empty, or no words in its documents)",
            ));
        }
        if raw.total() == 0 {
            return Err(invalid("raw", "has no features (empty, or no words)"));
        }
        let (t, r) = (target.probs(laplace), raw.probs(0.0));
        let log_diff = t
            .iter()
            .zip(&r)
            .map(|(t, r)| (t + EPS).ln() - (r + EPS).ln())
            .collect();
        Ok(Self {
            log_diff,
            target: t,
            raw: r,
        })
    }

    /// `log w(x) = Σ_b c_x[b] · log_diff[b]`.
    pub fn log_weight(&self, feats: &[u32]) -> f64 {
        feats.iter().map(|&b| self.log_diff[b as usize]).sum()
    }

    /// `KL(p̂_tgt ‖ p̂_raw) − KL(p̂_tgt ‖ p̂_S)` for a selection's counts.
    pub fn kl_reduction(&self, selected: &Counts) -> f64 {
        kl(&self.target, &self.raw) - kl(&self.target, &selected.probs(0.0))
    }
}

/// `KL(p ‖ q) = Σ p log((p + ε) / (q + ε))`.
pub fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(p, _)| **p > 0.0)
        .map(|(p, q)| p * ((p + EPS).ln() - (q + EPS).ln()))
        .sum()
}

/// A standard Gumbel sample for document `index`: `−ln(−ln u)`, `u ∈ (0, 1)` from
/// (seed, index).
pub fn gumbel(seed: u64, index: u64) -> f64 {
    let u = ((mix(seed ^ mix(index)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(-u.ln()).ln()
}

/// A key that orders like an f64 (total order; NaN never comes from finite weights).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Key(f64);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The `k` documents with the largest keys, kept while streaming (memory O(k)).
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<(Key, Reverse<u64>)>>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Offers document `index` with `key` (ties: the earlier document wins).
    pub fn offer(&mut self, index: u64, key: f64) {
        if self.k == 0 {
            return;
        }
        let item = Reverse((Key(key), Reverse(index)));
        if self.heap.len() < self.k {
            self.heap.push(item);
        } else if let Some(min) = self.heap.peek() {
            if item < *min {
                self.heap.pop();
                self.heap.push(item);
            }
        }
    }

    /// Merges another partial top-k.
    pub fn merge(&mut self, other: TopK) {
        for Reverse((Key(k), Reverse(i))) in other.heap {
            self.offer(i, k);
        }
    }

    /// The selected indices, ascending (the pool's order).
    pub fn indices(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .heap
            .iter()
            .map(|Reverse((_, Reverse(i)))| *i)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// How documents are chosen from their log weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Resample {
    /// Documents to select.
    pub n: usize,
    /// The n largest weights instead of sampling.
    pub top_k: bool,
    /// A uniform random sample instead (the weights ignored): the baseline a selection is
    /// compared with, under the same length filter.
    pub uniform: bool,
    pub seed: u64,
    /// Documents with fewer words are never selected (the reference's default: 100).
    pub min_length: usize,
}

impl Resample {
    /// The key a document competes with, or None when it is too short.
    pub fn key(&self, index: u64, log_weight: f64, words: usize) -> Option<f64> {
        if words < self.min_length {
            return None;
        }
        Some(match (self.uniform, self.top_k) {
            (true, _) => gumbel(self.seed, index),
            (false, true) => log_weight,
            (false, false) => log_weight + gumbel(self.seed, index),
        })
    }
}

/// Records per batch handed to the worker threads.
const BATCH: usize = 8192;

/// The counts of every record of `files` (one parallel pass).
pub fn count(files: &[PathBuf], layout: &Layout, f: &Features) -> Result<(Counts, ReadStats)> {
    let mut total = Counts::new(f.buckets);
    let stats = corpus::for_each_batch(files, layout, BATCH, &mut |batch| {
        let part = batch
            .par_iter()
            .fold(
                || (Counts::new(f.buckets), Vec::new()),
                |(mut c, mut v), r| {
                    v.clear();
                    f.hash_into(&r.text, &mut v);
                    c.add(&v);
                    (c, v)
                },
            )
            .map(|(c, _)| c)
            .reduce(
                || Counts::new(f.buckets),
                |mut a, b| {
                    a.merge(&b);
                    a
                },
            );
        total.merge(&part);
        Ok(())
    })?;
    Ok((total, stats))
}

/// What a selection pass found.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Selected record indices in the pool, ascending.
    pub indices: Vec<u64>,
    /// Records long enough to be selected.
    pub eligible: u64,
    pub stats: ReadStats,
}

/// Scores every record of the raw pool and keeps the `rs.n` best keys (one parallel pass;
/// memory O(n)). `progress` sees the records read so far.
pub fn select(
    files: &[PathBuf],
    layout: &Layout,
    f: &Features,
    est: &Estimator,
    rs: &Resample,
    progress: &mut dyn FnMut(u64),
) -> Result<Selection> {
    let mut top = TopK::new(rs.n);
    let (mut next, mut eligible) = (0u64, 0u64);
    let stats = corpus::for_each_batch(files, layout, BATCH, &mut |batch| {
        let base = next;
        let keys: Vec<Option<f64>> = batch
            .par_iter()
            .enumerate()
            .map_init(Vec::new, |v, (i, r)| {
                v.clear();
                let words = f.hash_into(&r.text, v);
                rs.key(base + i as u64, est.log_weight(v), words)
            })
            .collect();
        for (i, k) in keys.into_iter().enumerate() {
            if let Some(k) = k {
                eligible += 1;
                top.offer(base + i as u64, k);
            }
        }
        next += batch.len() as u64;
        progress(next);
        Ok(())
    })?;
    if (eligible as usize) < rs.n {
        return Err(Error::Invalid {
            what: "n".into(),
            why: format!(
                "{} documents asked for, but only {eligible} of the pool's {} have at least {} {}",
                rs.n,
                stats.records,
                rs.min_length,
                if f.tokenizer.is_some() {
                    "tokens"
                } else {
                    "words"
                }
            ),
        });
    }
    Ok(Selection {
        indices: top.indices(),
        eligible,
        stats,
    })
}

/// Streams the selected records (`indices` ascending) to `write`, and returns their counts.
pub fn write_selected(
    files: &[PathBuf],
    layout: &Layout,
    f: &Features,
    indices: &[u64],
    write: &mut dyn FnMut(&Record) -> Result<()>,
) -> Result<Counts> {
    let mut counts = Counts::new(f.buckets);
    let (mut next, mut at) = (0u64, 0usize);
    let mut v = Vec::new();
    corpus::for_each_batch(files, layout, BATCH, &mut |batch| {
        for r in &batch {
            if at < indices.len() && indices[at] == next {
                write(r)?;
                v.clear();
                f.hash_into(&r.text, &mut v);
                counts.add(&v);
                at += 1;
            }
            next += 1;
        }
        Ok(())
    })?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's tokenization and hashing test vectors (p-lambda/dsir
    /// tests/test_hashed_ngram.py).
    #[test]
    fn features_match_the_reference() {
        assert_eq!(
            words("Alice went to the store!"),
            ["alice", "went", "to", "the", "store", "!"]
        );
        assert_eq!(
            words("it's 3.5% -- ok"),
            ["it", "'", "s", "3", ".", "5", "%", "--", "ok"]
        );
        let f = Features::default();
        assert_eq!(f.bucket("alice"), 6720);
        assert_eq!(f.bucket("alice went"), 114);
        assert_eq!(f.bucket("to"), 2441);
        assert_eq!(f.bucket("store"), 9879);
        let mut v = Vec::new();
        assert_eq!(f.hash_into("Alice went to the store", &mut v), 5);
        assert_eq!(v.len(), 9); // 5 unigrams + 4 bigrams
        assert_eq!(v[0], 6720);
        assert_eq!(v[5], 114);
        // Again, from the memo.
        let mut again = Vec::new();
        f.hash_into("alice WENT to the store", &mut again);
        assert_eq!(v, again);
    }

    /// The eight-bytes-at-a-time remainder is the big-endian number's remainder.
    #[test]
    fn digest_remainder_matches_bytewise() {
        for k in 0..200u32 {
            let d = Sha256::digest(k.to_le_bytes());
            for m in [1u64, 7, 10_000, 65_537, 4_294_967_291] {
                let slow = d.iter().fold(0u64, |r, &b| (r * 256 + u64::from(b)) % m) as u32;
                assert_eq!(digest_mod(&d, m), slow);
            }
        }
    }

    /// Documents like the target get the largest weights; top-k keeps the k largest, and the
    /// KL reduction of a target-like selection is positive.
    #[test]
    fn weights_select_target_like_documents() -> Result<()> {
        let f = Features::default();
        let target_docs = ["the cat sat on the mat", "a cat and a dog on a mat"];
        let raw_docs = [
            "stock prices fell sharply today",
            "the cat sat on a warm mat",
            "interest rates rose again",
            "my dog and cat share a mat",
        ];
        let counts = |docs: &[&str]| {
            let mut c = Counts::new(f.buckets);
            for d in docs {
                let mut v = Vec::new();
                f.hash_into(d, &mut v);
                c.add(&v);
            }
            c
        };
        let (t, r) = (counts(&target_docs), counts(&raw_docs));
        let est = Estimator::new(&t, &r, 0.0)?;
        let rs = Resample {
            n: 2,
            top_k: true,
            uniform: false,
            seed: 0,
            min_length: 1,
        };
        let mut top = TopK::new(rs.n);
        for (i, d) in raw_docs.iter().enumerate() {
            let mut v = Vec::new();
            let n = f.hash_into(d, &mut v);
            if let Some(k) = rs.key(i as u64, est.log_weight(&v), n) {
                top.offer(i as u64, k);
            }
        }
        assert_eq!(top.indices(), [1, 3]);
        let chosen = counts(&[raw_docs[1], raw_docs[3]]);
        assert!(est.kl_reduction(&chosen) > 0.0);
        assert!(Estimator::new(&Counts::new(f.buckets), &r, 0.0).is_err());
        Ok(())
    }

    /// Gumbel-top-k samples in proportion to the weights: with weights 1:3, the heavier of two
    /// documents is chosen about 3/4 of the time over many seeds; `uniform` ignores them.
    #[test]
    fn gumbel_top_1_samples_in_proportion() {
        let trials = 20_000;
        let share_of_heavy = |uniform: bool| {
            let mut heavy = 0;
            for seed in 0..trials {
                let rs = Resample {
                    n: 1,
                    top_k: false,
                    uniform,
                    seed,
                    min_length: 0,
                };
                let mut top = TopK::new(1);
                for (i, w) in [1f64, 3.0].iter().enumerate() {
                    if let Some(k) = rs.key(i as u64, w.ln(), 1) {
                        top.offer(i as u64, k);
                    }
                }
                heavy += usize::from(top.indices() == [1]);
            }
            heavy as f64 / trials as f64
        };
        let share = share_of_heavy(false);
        assert!((share - 0.75).abs() < 0.015, "{share}");
        let share = share_of_heavy(true);
        assert!((share - 0.5).abs() < 0.015, "{share}");
    }
}
