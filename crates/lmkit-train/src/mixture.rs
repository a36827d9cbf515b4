//! A weighted mixture of data domains: each row of a batch comes from domain `i` with
//! probability `wᵢ` (drawn by a counter-based generator keyed by (seed, row), so a run is
//! reproducible and resumable), and from that domain's own shuffled [`Sequences`], which cycle
//! through their epochs independently. This is how a model trains on DoReMi's reweighted
//! mixture, or on any hand-set one.

use lmkit_core::Tensor;

use crate::data::{Batches, DataPosition, Sequences};
use crate::{Error, Result};

pub struct Mixture {
    names: Vec<String>,
    domains: Vec<Sequences>,
    /// Cumulative weights, the last one 1.
    cumulative: Vec<f64>,
    seed: u64,
    /// Rows drawn so far.
    drawn: u64,
}

/// Where a mixture stands: rows drawn, and each domain's [`Sequences::position`].
pub type MixturePosition = (u64, Vec<(usize, usize)>);

impl Mixture {
    /// `domains` with their (positive, any scale) weights.
    pub fn new(domains: Vec<(String, Sequences, f64)>, seed: u64) -> Result<Self> {
        if domains.is_empty() {
            return Err(Error::Data("a mixture needs at least one domain".into()));
        }
        if let Some((name, _, w)) = domains.iter().find(|(_, _, w)| !w.is_finite() || *w < 0.0) {
            return Err(Error::Option {
                option: format!("weight of domain `{name}`"),
                why: format!("must be a finite number ≥ 0, got {w}"),
            });
        }
        let total: f64 = domains.iter().map(|(_, _, w)| w).sum();
        if total <= 0.0 {
            return Err(Error::Option {
                option: "domain weights".into(),
                why: "at least one must be positive".into(),
            });
        }
        let mut acc = 0.0;
        let mut cumulative = Vec::with_capacity(domains.len());
        let (mut names, mut seqs) = (Vec::new(), Vec::new());
        for (name, s, w) in domains {
            acc += w / total;
            cumulative.push(acc);
            names.push(name);
            seqs.push(s);
        }
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        Ok(Self {
            names,
            domains: seqs,
            cumulative,
            seed,
            drawn: 0,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The normalized weights.
    pub fn weights(&self) -> Vec<f64> {
        let mut prev = 0.0;
        self.cumulative
            .iter()
            .map(|&c| {
                let w = c - prev;
                prev = c;
                w
            })
            .collect()
    }

    /// The domain of row number `row` of the run.
    fn domain_of(&self, row: u64) -> usize {
        let u = unit(self.seed, row);
        self.cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.cumulative.len() - 1)
    }

    /// The next `b` rows `(b, len + 1)`, the mask for masked data, and each row's domain.
    pub fn batch_masked(&mut self, b: usize) -> Result<(Tensor, Option<Tensor>, Vec<usize>)> {
        let mut ids = Vec::with_capacity(b);
        let mut masks = Vec::with_capacity(b);
        let mut which = Vec::with_capacity(b);
        for _ in 0..b {
            let d = self.domain_of(self.drawn);
            self.drawn += 1;
            let (row, mask) = self.domains[d].batch_masked(1)?;
            ids.push(row);
            masks.push(mask);
            which.push(d);
        }
        let ids = Tensor::cat(&ids, 0)?;
        let mask = match masks.iter().all(|m| m.is_some()) {
            true => {
                let m: Vec<Tensor> = masks.into_iter().flatten().collect();
                Some(Tensor::cat(&m, 0)?)
            }
            // Unmasked domains train on every token: a mask of ones for them.
            false if masks.iter().any(|m| m.is_some()) => {
                let m = masks
                    .into_iter()
                    .zip(&which)
                    .map(|(m, &d)| match m {
                        Some(m) => Ok(m),
                        None => {
                            let len = self.domains[d].seq_len();
                            Ok(Tensor::ones(
                                (1, len),
                                lmkit_core::DType::F32,
                                ids.device(),
                            )?)
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&m, 0)?)
            }
            false => None,
        };
        Ok((ids, mask, which))
    }

    pub fn position(&self) -> MixturePosition {
        (
            self.drawn,
            self.domains.iter().map(|s| s.position()).collect(),
        )
    }

    /// Moves to a saved [`Mixture::position`] (same domains, weights and seed).
    pub fn seek(&mut self, (drawn, each): MixturePosition) -> Result<()> {
        if each.len() != self.domains.len() {
            return Err(Error::Data(format!(
                "a saved position of {} domains for a mixture of {}",
                each.len(),
                self.domains.len()
            )));
        }
        for (s, p) in self.domains.iter_mut().zip(each) {
            s.seek(p)?;
        }
        self.drawn = drawn;
        Ok(())
    }
}

impl Batches for Mixture {
    fn sequences(&self) -> usize {
        self.domains.iter().map(|s| s.len()).sum()
    }

    fn next_batch(&mut self, b: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (ids, mask, _) = self.batch_masked(b)?;
        Ok((ids, mask))
    }

    fn data_position(&self) -> DataPosition {
        let (drawn, domains) = self.position();
        DataPosition::Mixture { drawn, domains }
    }

    fn seek_to(&mut self, p: &DataPosition) -> Result<()> {
        match p {
            DataPosition::Mixture { drawn, domains } => self.seek((*drawn, domains.clone())),
            DataPosition::Single { .. } => Err(Error::Data(
                "the checkpoint was written for one data stream, this run has a mixture of domains"
                    .into(),
            )),
        }
    }
}

/// A uniform number in [0, 1) from (seed, index): splitmix64 of the pair, top 53 bits.
fn unit(seed: u64, index: u64) -> f64 {
    let z = seed
        .wrapping_mul(lmkit_rand::GAMMA)
        .wrapping_add(index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    lmkit_rand::unit_f64(lmkit_rand::finalize(z))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(base: u32, n: usize) -> Result<Sequences> {
        Sequences::new((0..n as u32).map(|i| base + i).collect(), 4, 7)
    }

    /// Rows follow the weights; each comes from its domain's own tokens; a saved position
    /// resumes the same stream.
    #[test]
    fn draws_in_proportion_and_resumes() -> Result<()> {
        let mut m = Mixture::new(
            vec![
                ("a".into(), domain(0, 401)?, 3.0),
                ("b".into(), domain(10_000, 401)?, 1.0),
            ],
            5,
        )?;
        assert_eq!(m.weights(), vec![0.75, 0.25]);
        let mut count = [0usize; 2];
        for _ in 0..200 {
            let (ids, mask, which) = m.batch_masked(10)?;
            assert!(mask.is_none());
            let rows = ids.to_vec2::<u32>()?;
            for (r, &d) in rows.iter().zip(&which) {
                assert_eq!(r[0] >= 10_000, d == 1, "row {r:?} from domain {d}");
                count[d] += 1;
            }
        }
        let share = count[0] as f64 / 2000.0;
        assert!((share - 0.75).abs() < 0.03, "{share}");
        let at = m.position();
        let (want, _, _) = m.batch_masked(6)?;
        m.seek(at)?;
        let (got, _, _) = m.batch_masked(6)?;
        assert_eq!(want.to_vec2::<u32>()?, got.to_vec2::<u32>()?);
        Ok(())
    }

    #[test]
    fn bad_weights() -> Result<()> {
        assert!(Mixture::new(vec![], 0).is_err());
        assert!(Mixture::new(vec![("a".into(), domain(0, 20)?, -1.0)], 0).is_err());
        assert!(Mixture::new(vec![("a".into(), domain(0, 20)?, 0.0)], 0).is_err());
        let m = Mixture::new(
            vec![
                ("a".into(), domain(0, 20)?, 0.0),
                ("b".into(), domain(0, 20)?, 2.0),
            ],
            0,
        )?;
        assert_eq!(m.weights(), vec![0.0, 1.0]);
        Ok(())
    }
}
