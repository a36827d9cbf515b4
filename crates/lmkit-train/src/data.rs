//! Training sequences packed from a token stream: sequence `i` is tokens
//! `[i·len, i·len + len + 1)` (inputs are its first `len`, targets its last `len`), so every
//! token is predicted once per epoch. The order of sequences is shuffled per epoch by a seeded
//! permutation, so a run is reproducible. The tokens are in memory or in a memory-mapped token
//! file ([`Tokens`]).

use lmkit_core::{Device, Tensor};

use crate::tokens::Tokens;
use crate::{Error, Result};

/// Where a stream of training batches stands, for checkpoints: a single stream's
/// `(epoch, taken)`, or a mixture's rows drawn and each domain's position.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum DataPosition {
    Single {
        epoch: usize,
        next: usize,
    },
    Mixture {
        drawn: u64,
        domains: Vec<(usize, usize)>,
    },
}

/// A source of training batches: [`Sequences`], or a [`crate::mixture::Mixture`] of them.
pub trait Batches {
    /// The next `b` rows `(b, len + 1)` and, for masked data, the targets' mask `(b, len)`.
    fn next_batch(&mut self, b: usize) -> Result<(Tensor, Option<Tensor>)>;
    fn data_position(&self) -> DataPosition;
    /// Moves to a saved position (the same data, lengths and seeds).
    fn seek_to(&mut self, p: &DataPosition) -> Result<()>;
    /// Sequences in one pass over the data (over every domain of a mixture).
    fn sequences(&self) -> usize;
    /// What the source learned while it ran, if anything (DoReMi's domain weights).
    fn report(&self) -> Option<serde_json::Value> {
        None
    }
}

impl Batches for Sequences {
    fn sequences(&self) -> usize {
        self.len()
    }

    fn next_batch(&mut self, b: usize) -> Result<(Tensor, Option<Tensor>)> {
        self.batch_masked(b)
    }

    fn data_position(&self) -> DataPosition {
        let (epoch, next) = self.position();
        DataPosition::Single { epoch, next }
    }

    fn seek_to(&mut self, p: &DataPosition) -> Result<()> {
        match p {
            DataPosition::Single { epoch, next } => self.seek((*epoch, *next)),
            DataPosition::Mixture { .. } => Err(Error::Data(
                "the checkpoint was written for a mixture of domains, this run has one data stream"
                    .into(),
            )),
        }
    }
}

pub struct Sequences {
    /// The stream; chat/SFT data marks the tokens that are only context (see [`Tokens`]).
    tokens: Tokens,
    len: usize,
    order: Vec<usize>,
    next: usize,
    epoch: usize,
    seed: u64,
}

impl Sequences {
    /// Sequences of `len` predictions from `tokens`; `seed` drives the shuffle.
    pub fn new(tokens: Vec<u32>, len: usize, seed: u64) -> Result<Self> {
        Self::from_tokens(Tokens::from_vec(tokens, None)?, len, seed)
    }

    /// [`Sequences::new`] with a target mask, one entry per token (see [`Sequences::batch_masked`]).
    pub fn with_mask(tokens: Vec<u32>, mask: Vec<u8>, len: usize, seed: u64) -> Result<Self> {
        Self::from_tokens(Tokens::from_vec(tokens, Some(&mask))?, len, seed)
    }

    /// Sequences over a token stream in memory or in a token file.
    pub fn from_tokens(tokens: Tokens, len: usize, seed: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::Option {
                option: "seq_len".into(),
                why: "must be at least 1".into(),
            });
        }
        let n = tokens.len().saturating_sub(1) / len;
        if n == 0 {
            return Err(Error::Data(format!(
                "{} tokens make no sequence of {} (+1) tokens",
                tokens.len(),
                len
            )));
        }
        if tokens.masked() && !tokens.packed().iter().any(|&v| Tokens::is_target(v)) {
            return Err(Error::Data(
                "no token is a training target (chat data without assistant turns?)".into(),
            ));
        }
        let mut s = Self {
            tokens,
            len,
            order: (0..n).collect(),
            next: 0,
            epoch: 0,
            seed,
        };
        s.shuffle();
        Ok(s)
    }

    /// Predictions per sequence.
    pub fn seq_len(&self) -> usize {
        self.len
    }

    /// Sequences per epoch.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Completed passes over the data.
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// Where the next batch starts: `(epoch, sequences taken this epoch)`.
    pub fn position(&self) -> (usize, usize) {
        (self.epoch, self.next)
    }

    /// Moves to a saved [`Sequences::position`] (same tokens, length and seed).
    pub fn seek(&mut self, (epoch, next): (usize, usize)) -> Result<()> {
        if next > self.order.len() {
            return Err(Error::Data(format!(
                "position {next} is past the {} sequences of an epoch",
                self.order.len()
            )));
        }
        self.epoch = epoch;
        self.shuffle();
        self.next = next;
        Ok(())
    }

    /// Sets the order of the current epoch: a permutation that depends on (seed, epoch) only.
    fn shuffle(&mut self) {
        self.order = (0..self.order.len()).collect();
        // Fisher–Yates with a splitmix64 stream keyed by (seed, epoch).
        let mut rng = lmkit_rand::SplitMix64::new(
            self.seed ^ (self.epoch as u64).wrapping_mul(lmkit_rand::GAMMA),
        );
        let mut next = || rng.next_u64();
        for i in (1..self.order.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
    }

    /// The next `b` sequences as `(b, len + 1)` token ids, starting a new shuffled epoch when
    /// this one runs out.
    pub fn batch(&mut self, b: usize) -> Result<Tensor> {
        Ok(self.batch_masked(b)?.0)
    }

    /// [`Sequences::batch`] and, for masked data, the targets' mask `(b, len)` f32 (1 where the
    /// token at that position + 1 is trained on).
    pub fn batch_masked(&mut self, b: usize) -> Result<(Tensor, Option<Tensor>)> {
        let mut starts = Vec::with_capacity(b);
        for _ in 0..b {
            if self.next == self.order.len() {
                self.next = 0;
                self.epoch += 1;
                self.shuffle();
            }
            starts.push(self.order[self.next] * self.len);
            self.next += 1;
        }
        self.rows(&starts)
    }

    /// Sequences `0..n` in file order (for evaluation), `(n, len + 1)`, with their mask.
    pub fn first_masked(&self, n: usize) -> Result<(Tensor, Option<Tensor>)> {
        let n = n.min(self.order.len());
        let starts: Vec<usize> = (0..n).map(|i| i * self.len).collect();
        self.rows(&starts)
    }

    /// Sequences `0..n` in file order (for evaluation), `(n, len + 1)`.
    pub fn first(&self, n: usize) -> Result<Tensor> {
        Ok(self.first_masked(n)?.0)
    }

    fn rows(&self, starts: &[usize]) -> Result<(Tensor, Option<Tensor>)> {
        let (b, len) = (starts.len(), self.len);
        let all = self.tokens.packed();
        let mut ids = Vec::with_capacity(b * (len + 1));
        for &s in starts {
            ids.extend(all[s..s + len + 1].iter().map(|&v| Tokens::id(v)));
        }
        let ids = Tensor::from_vec(ids, (b, len + 1), &Device::Cpu)?;
        let mask = match self.tokens.masked() {
            false => None,
            true => {
                let v: Vec<f32> = starts
                    .iter()
                    .flat_map(|&s| all[s + 1..s + len + 1].iter())
                    .map(|&v| f32::from(u8::from(Tokens::is_target(v))))
                    .collect();
                Some(Tensor::from_vec(v, (b, len), &Device::Cpu)?)
            }
        };
        Ok((ids, mask))
    }
}
