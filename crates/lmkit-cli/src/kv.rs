//! `--kv`, `--kv-budget`, `--kv-recent`: the KV-cache policy of a generating command.

use std::sync::Arc;

use anyhow::{bail, Result};
use lmkit::generate_mod::kv::{policy, Budget, KvPolicy};

#[derive(clap::Args, Clone, Debug)]
pub struct KvArgs {
    /// KV-cache policy: full (default), window (recent tokens only) or h2o (heavy hitters +
    /// recent; NeurIPS 2023, arXiv 2306.14048). `ppl` and `bench` take a comma-separated list.
    #[arg(long, value_delimiter = ',')]
    pub kv: Vec<String>,
    /// Cache budget per head: a share of the sequence (0.2 or 20%; default 0.2: of prompt +
    /// new tokens, or of a perplexity window) or a token count (256: memory bounded for any
    /// length). `ppl` and `bench` take a list.
    #[arg(long, value_delimiter = ',')]
    pub kv_budget: Vec<String>,
    /// H2O: share of the budget kept for the most recent tokens (the rest are heavy hitters).
    #[arg(long, default_value_t = 0.5)]
    pub kv_recent: f64,
}

/// A policy and its budget (`None` for the full cache).
pub type Choice = (Arc<dyn KvPolicy>, Option<Budget>);

impl KvArgs {
    /// Every (policy, budget) pair asked for, the full cache once.
    pub fn policies(&self) -> Result<Vec<Choice>> {
        let budgets: Vec<Budget> = if self.kv_budget.is_empty() {
            vec![Budget::Ratio(0.2)]
        } else {
            self.kv_budget
                .iter()
                .map(|b| Budget::parse(b))
                .collect::<Result<_, _>>()?
        };
        if self.kv.is_empty() && !self.kv_budget.is_empty() {
            bail!("--kv-budget applies to a policy: add --kv window or --kv h2o");
        }
        let names = if self.kv.is_empty() {
            vec!["full".to_string()]
        } else {
            self.kv.clone()
        };
        let mut out: Vec<Choice> = Vec::new();
        for name in &names {
            for &b in &budgets {
                let p = policy(name.trim(), b, self.kv_recent)?;
                let budget = (p.capacity(usize::MAX / 2, 0) != usize::MAX).then_some(b);
                if !out.iter().any(|(q, _)| q.name() == p.name()) {
                    out.push((p, budget));
                }
            }
        }
        Ok(out)
    }

    /// The one policy of a generating command (`None`: the full cache).
    pub fn single(&self) -> Result<Option<Arc<dyn KvPolicy>>> {
        let all = self.policies()?;
        if all.len() != 1 {
            bail!(
                "--kv/--kv-budget: give one policy and one budget here ({} given)",
                all.len()
            );
        }
        Ok(all
            .into_iter()
            .next()
            .and_then(|(p, b)| b.is_some().then_some(p)))
    }
}
