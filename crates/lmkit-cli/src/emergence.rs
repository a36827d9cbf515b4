//! `lmkit eval emergence`: the experiment of "Are Emergent Abilities of Large Language Models a
//! Mirage?" (Schaeffer, Miranda, Koyejo; NeurIPS 2023, arXiv 2304.15004) on models trained
//! here. A family of Llama models of growing width and depth is trained from scratch, with the
//! same data and steps, on solved arithmetic problems ("Question: What is 417 plus 38?\nAnswer:
//! 455"); each is then scored on the built-in `arithmetic_<op>_<k>` tasks (held-out items,
//! 0-shot, greedy) with exact match and with the continuous metrics (per-token accuracy, token
//! edit distance, target log-likelihood, Brier score). `emergence.json` holds every number and
//! `emergence.svg` plots each metric against the parameter count, one line per digit count.
//!
//! The paper's claim, which the plot tests: exact match over an L-token answer behaves like
//! `p^L` in the per-token accuracy p, so it stays near 0 and then jumps as p rises smoothly.
//!
//! Deviations: the paper re-scores existing model families (GPT-3, InstructGPT); these are
//! small models trained for a fixed number of steps, so "scale" is width and depth at equal
//! data. The training problems come from a different seed than the evaluation items, but with
//! few digits the two sets overlap (there are only 100 one-digit sums).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lmkit::eval::arithmetic::{solved, Op};
use lmkit::eval::harness;
use lmkit::eval::task::Renderer;
use serde_json::{json, Value};

use crate::plot::{Chart, Series};
use crate::train;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit eval emergence --out runs/emergence\n  lmkit eval emergence --out runs/emergence --widths 16,32,64,128 --steps 3000 --max-digits 4\n\nEach model is OUT/w<width>/final; finished models are reused when the command runs again."
)]
pub struct Args {
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Model widths (hidden sizes, multiples of 16); depth grows with width (one layer per 32,
    /// at least one), heads are 16 wide, the MLP is 4× the width.
    #[arg(long, value_delimiter = ',', default_value = "16,32,48,64,96,128")]
    pub widths: Vec<usize>,
    /// Training steps per model (batch 32 × 64 tokens).
    #[arg(long, default_value_t = 5000)]
    pub steps: usize,
    /// Operation: add or mul.
    #[arg(long, default_value = "add")]
    pub op: String,
    /// Train and score k-digit problems for k = 1..=max_digits.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=6))]
    pub max_digits: u32,
    /// Scored items per digit count.
    #[arg(long, default_value_t = 300)]
    pub items: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// CPU worker threads (default: all cores).
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

const SEQ_LEN: usize = 64;
const BATCH: usize = 32;
const METRICS: &[(&str, &str)] = &[
    ("exact_match,number", "exact match"),
    ("per_token_acc", "per-token accuracy (teacher forced)"),
    ("token_edit_distance", "token edit distance"),
    ("brier_score", "Brier score per token"),
];

/// The training problems: `steps × batch × seq_len` tokens' worth and some more, k drawn
/// uniformly per problem, 16 problems per document.
fn write_corpus(path: &Path, op: Op, max_digits: u32, problems: usize) -> Result<()> {
    let mut rng = lmkit_rand::SplitMix64::new(0x5eed_0000 + u64::from(max_digits));
    lmkit::formats::write::atomic_write(path, |w| {
        let mut doc = String::new();
        for i in 0..problems {
            let k = 1 + (rng.next_u64() % u64::from(max_digits)) as u32;
            let (lo, hi) = lmkit::eval::arithmetic::operand_range(k);
            let a = lo + rng.next_u64() % (hi - lo + 1);
            let b = lo + rng.next_u64() % (hi - lo + 1);
            doc.push_str(&solved(op, a, b));
            if i % 16 == 15 {
                writeln!(w, "{}", json!({ "text": doc }))?;
                doc.clear();
            }
        }
        Ok(())
    })
    .with_context(|| format!("cannot write {}", path.display()))
}

use std::io::Write as _;

fn config(width: usize, steps: usize, seed: u64) -> String {
    let layers = (width / 32).max(1);
    let heads = (width / 16).max(1);
    format!(
        "[model]\nhidden_size = {width}\nintermediate_size = {}\nnum_layers = {layers}\n\
         num_heads = {heads}\nnum_kv_heads = {heads}\nmax_position_embeddings = {SEQ_LEN}\n\
         [data]\ntrain = [\"corpus.jsonl\"]\ntokenizer = \"tokenizer\"\nseq_len = {SEQ_LEN}\n\
         eval_fraction = 0.0\n\
         [train]\nsteps = {steps}\nbatch = {BATCH}\nlr = 3e-3\nmin_lr = 3e-4\nwarmup = {}\n\
         seed = {seed}\n",
        4 * width,
        (steps / 20).max(1)
    )
}

pub fn main(a: Args) -> Result<()> {
    let op = match a.op.as_str() {
        "add" => Op::Add,
        "mul" => Op::Mul,
        o => bail!("--op must be add or mul, not `{o}`"),
    };
    if a.widths.is_empty() || a.widths.iter().any(|w| *w < 16 || w % 16 != 0) {
        bail!("--widths must be multiples of 16 (at least 16)");
    }
    if a.steps == 0 || a.items == 0 {
        bail!("--steps and --items must be at least 1");
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let out = a.out.canonicalize()?;
    let corpus = out.join("corpus.jsonl");
    if !corpus.is_file() {
        // ~10 tokens per problem at k = 1, ~30 at k = 6.
        let problems = a.steps * BATCH * SEQ_LEN / 10 + 1000;
        write_corpus(&corpus, op, a.max_digits, problems)?;
    }
    let tok_dir = out.join("tokenizer");
    if !tok_dir.join("tokenizer.json").is_file() {
        // Bytes, digits one by one (the trainer's pre-tokenizer splits them) and a few dozen
        // merges for the words.
        let text = std::fs::read_to_string(&corpus)?;
        let docs: Vec<String> = text
            .lines()
            .take(2000)
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["text"].as_str().map(String::from))
            .collect();
        let tok = lmkit::formats::tokenizer_train::train_bpe(docs.iter(), 300, 2)?;
        lmkit::formats::tokenizer_train::save_folder(&tok, &tok_dir)?;
    }
    let mut rows = Vec::new();
    for &w in &a.widths {
        let dir = out.join(format!("w{w}"));
        let cfg = out.join(format!("w{w}.toml"));
        let text = format!(
            "# lmkit eval emergence: {} problems of 1..={} digits\n{}",
            op.name(),
            a.max_digits,
            config(w, a.steps, a.seed)
        );
        if dir.join("final").is_dir() {
            // Reuse a finished model only if it was trained as asked now.
            if std::fs::read_to_string(&cfg).ok().as_deref() != Some(text.as_str()) {
                bail!(
                    "{} was trained with other settings than these (see {}); use another --out",
                    dir.display(),
                    cfg.display()
                );
            }
        } else {
            std::fs::write(&cfg, &text)?;
            eprintln!("training width {w} ({} steps)", a.steps);
            train::run(&train::Args {
                config: cfg,
                out: dir.clone(),
                resume: false,
                threads: a.threads,
                device: "cpu".into(),
                dtype: None,
                loss_scale: Default::default(),
                model: None,
                gguf: None,
                json: true,
                doremi_reference: None,
                doremi_eta: 1.0,
                doremi_smoothing: 1e-3,
                doremi_update_every: 1,
                domains: Vec::new(),
                weights_from: None,
                uniform: false,
            })
            .with_context(|| format!("training width {w}"))?;
        }
        let m = lmkit::load(&dir.join("final"), Default::default())
            .with_context(|| format!("cannot load {}", dir.join("final").display()))?;
        let params = m.model.num_parameters();
        for k in 1..=a.max_digits {
            let spec =
                lmkit::eval::task::expand(&format!("arithmetic_{}_{k}", op.name()))?.remove(0);
            let Some(g) = &spec.generator else {
                bail!("arithmetic task without a generator");
            };
            let renderer = Renderer::new();
            let items = g
                .rows(false)?
                .iter()
                .take(a.items)
                .map(|r| renderer.item(&spec, r, &[]))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let pb = crate::common::bar(items.len() as u64, &format!("w{w} k={k}"));
            let r = harness::evaluate(
                &m.model,
                &m.tokenizer,
                &spec,
                &items,
                SEQ_LEN,
                &mut |d, _| pb.set_position(d as u64),
            );
            pb.finish_and_clear();
            let r = r?;
            let mut row =
                json!({"width": w, "layers": (w / 32).max(1), "params": params, "digits": k});
            for (key, m) in &r.metrics {
                row[key] = json!(m.value);
                row[format!("{key}_stderr")] = json!(m.stderr);
            }
            rows.push(row);
        }
    }
    let report = json!({
        "op": op.name(),
        "steps": a.steps,
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "items_per_digit_count": a.items,
        "rows": rows,
    });
    lmkit::formats::write::atomic_write(&out.join("emergence.json"), |w| {
        writeln!(
            w,
            "{}",
            serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?
        )
    })?;
    let svg = crate::plot::render(&charts(&report), "emergence: metrics against model size");
    crate::plot::write_svg(&out.join("emergence.svg"), &svg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("| params | k | exact match | per-token acc | token edit distance | Brier |");
        println!("|---|---|---|---|---|---|");
        for r in report["rows"].as_array().into_iter().flatten() {
            println!(
                "| {} | {} | {:.3} | {:.3} | {:.2} | {:.3} |",
                r["params"],
                r["digits"],
                r["exact_match,number"].as_f64().unwrap_or(f64::NAN),
                r["per_token_acc"].as_f64().unwrap_or(f64::NAN),
                r["token_edit_distance"].as_f64().unwrap_or(f64::NAN),
                r["brier_score"].as_f64().unwrap_or(f64::NAN),
            );
        }
        println!("{}", out.join("emergence.svg").display());
    }
    Ok(())
}

/// One panel per metric: the metric against log10(parameters), a line per digit count.
pub fn charts(report: &Value) -> Vec<Chart> {
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    let mut ks: Vec<u64> = rows.iter().filter_map(|r| r["digits"].as_u64()).collect();
    ks.sort_unstable();
    ks.dedup();
    METRICS
        .iter()
        .map(|(key, title)| Chart {
            title: (*title).into(),
            x_label: "log10 parameters".into(),
            series: ks
                .iter()
                .map(|k| Series {
                    name: format!("{k} digits"),
                    points: rows
                        .iter()
                        .filter(|r| r["digits"].as_u64() == Some(*k))
                        .filter_map(|r| Some((r["params"].as_f64()?.log10(), r[*key].as_f64()?)))
                        .collect(),
                    dots: false,
                })
                .collect(),
        })
        .collect()
}
