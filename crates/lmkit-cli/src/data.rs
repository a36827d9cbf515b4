//! `lmkit data select` (DSIR importance resampling) and `lmkit data kl` (the KL reduction of a
//! selection): streaming over text/JSONL files (plain or gzip) and folders, multi-threaded,
//! memory bounded by the feature buckets and the selection size.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use lmkit::data::corpus::{self, Layout};
use lmkit::data::dsir::{self, Estimator, Features, Resample};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Select the n documents of a raw pool most like a target (DSIR).
    Select(SelectArgs),
    /// The KL reduction of a selection: KL(target‖raw) − KL(target‖selected), hashed n-grams.
    Kl(KlArgs),
    /// Learn domain weights with DoReMi: a reference model, then a proxy trained by Group DRO.
    Doremi(crate::doremi::Args),
}

#[derive(clap::Args, Clone)]
pub struct Common {
    /// Target data: files or folders (text: a document per line; .jsonl and .parquet: --field;
    /// .gz/.zst).
    #[arg(long, num_args = 1.., required = true)]
    pub target: Vec<PathBuf>,
    /// The raw pool: files or folders.
    #[arg(long, num_args = 1.., required = true)]
    pub raw: Vec<PathBuf>,
    /// The JSONL field with the text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Largest n-gram order of the features.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub ngrams: u32,
    /// Hash buckets of the features.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub buckets: u32,
    /// N-grams of this tokenizer's tokens instead of words: a .gguf, an HF folder, a
    /// tokenizer.json, or `default` (the default model's). --min-length then counts tokens.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Laplace smoothing of the target's distribution.
    #[arg(long, default_value_t = 0.0)]
    pub laplace: f64,
    /// Skip malformed JSONL lines (counted) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// CPU worker threads (default: all cores).
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit data select --target wiki/valid.txt --raw pool/ --n 100000 --out selected.jsonl\n  lmkit data select --target t.jsonl --raw pool.jsonl.gz --n 5000 --top-k --min-length 20 --out s.jsonl --json\n\nEach selected record is written whole (its raw line, every field), in the pool's order;\nan output ending in .gz is gzip-, one in .zst zstd-compressed; a Parquet pool gives a .parquet\noutput with the pool's schema. The output is written atomically."
)]
pub struct SelectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Documents to select.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub n: u64,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
    /// The n highest weights instead of importance resampling.
    #[arg(long, conflicts_with = "random")]
    pub top_k: bool,
    /// A uniform random sample of the eligible documents instead (the baseline to compare a
    /// selection with; the target still sets the reported KL reduction).
    #[arg(long)]
    pub random: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Documents with fewer words are never selected (the reference's default).
    #[arg(long, default_value_t = 100)]
    pub min_length: usize,
}

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  lmkit data kl --target wiki/valid.txt --raw pool/ --selected selected.jsonl"
)]
pub struct KlArgs {
    #[command(flatten)]
    pub common: Common,
    /// The selection to score (files or folders, same layout).
    #[arg(long, num_args = 1.., required = true)]
    pub selected: Vec<PathBuf>,
}

pub fn threads(c: &Command) -> Option<u32> {
    match c {
        Command::Select(a) => a.common.threads,
        Command::Kl(a) => a.common.threads,
        Command::Doremi(a) => a.threads,
    }
}

pub fn main(c: Command) -> Result<()> {
    match c {
        Command::Select(a) => select(a),
        Command::Kl(a) => kl(a),
        Command::Doremi(a) => crate::doremi::main(a),
    }
}

/// The estimator from the target and the pool, and what each pass read.
fn estimator(c: &Common) -> Result<(Estimator, Features, Layout, Vec<PathBuf>, serde_json::Value)> {
    let tokenizer = match &c.tokenizer {
        None => None,
        Some(p) => {
            let tok = if p.as_os_str() == "default" {
                crate::train_data::load_tokenizer(None)?
            } else {
                crate::train_data::load_tokenizer(Some(p))?
            };
            let t: std::sync::Arc<dyn dsir::Tokenize> = std::sync::Arc::new(Units {
                tok,
                name: p.display().to_string(),
            });
            Some(t)
        }
    };
    let f = Features {
        ngrams: c.ngrams as usize,
        buckets: c.buckets,
        tokenizer,
    };
    f.check()?;
    if !(c.laplace >= 0.0 && c.laplace.is_finite()) {
        bail!("--laplace must be a non-negative number");
    }
    let layout = Layout {
        field: c.field.clone(),
        skip_bad: c.skip_bad,
    };
    let (tfiles, rfiles) = (corpus::files(&c.target)?, corpus::files(&c.raw)?);
    let spinner = crate::common::spinner("counting the target's n-grams");
    let (tc, ts) = dsir::count(&tfiles, &layout, &f)?;
    spinner.set_message("counting the raw pool's n-grams");
    let (rc, rs) = dsir::count(&rfiles, &layout, &f)?;
    spinner.finish_and_clear();
    if ts.records == 0 {
        bail!("the target is empty: {}", list(&c.target));
    }
    if rs.records == 0 {
        bail!("the raw pool is empty: {}", list(&c.raw));
    }
    let est = Estimator::new(&tc, &rc, c.laplace)?;
    let overlap = est
        .target
        .iter()
        .zip(&est.raw)
        .any(|(t, r)| *t > 0.0 && *r > 0.0);
    if !overlap {
        bail!("the target and the raw pool share no n-gram bucket: nothing in the pool resembles the target");
    }
    let info = serde_json::json!({"target": ts, "raw": rs});
    Ok((est, f, layout, rfiles, info))
}

/// The selected rows of a Parquet pool, every column, as one Parquet file (atomically); the
/// selection's feature counts.
#[cfg(feature = "parquet")]
fn write_parquet(
    out: &std::path::Path,
    files: &[PathBuf],
    layout: &Layout,
    f: &Features,
    indices: &[u64],
) -> Result<dsir::Counts> {
    let mut counts = dsir::Counts::new(f.buckets);
    let mut v = Vec::new();
    let mut failure = None;
    lmkit::formats::write::atomic_write(out, |w| {
        let r = lmkit::data::parquet::write_selected(files, layout, indices, w, &mut |r| {
            v.clear();
            f.hash_into(&r.text, &mut v);
            counts.add(&v);
        });
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                let msg = e.to_string();
                failure = Some(e);
                Err(std::io::Error::other(msg))
            }
        }
    })
    .map_err(|e| match failure.take() {
        Some(f) => anyhow::Error::from(f),
        None => e.into(),
    })?;
    Ok(counts)
}

#[cfg(not(feature = "parquet"))]
fn write_parquet(
    out: &std::path::Path,
    _: &[PathBuf],
    _: &Layout,
    _: &Features,
    _: &[u64],
) -> Result<dsir::Counts> {
    bail!(
        "{}: Parquet output is not built in (lmkit-cli's `parquet` feature)",
        out.display()
    )
}

/// A tokenizer's ids as DSIR's units.
struct Units {
    tok: lmkit::formats::tokenizer::LoadedTokenizer,
    name: String,
}

impl dsir::Tokenize for Units {
    fn ids(&self, text: &str) -> Vec<u32> {
        // A text the tokenizer rejects has no units (and so no features).
        self.tok
            .tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

fn list(p: &[PathBuf]) -> String {
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn select(a: SelectArgs) -> Result<()> {
    let t0 = Instant::now();
    let (est, f, layout, rfiles, info) = estimator(&a.common)?;
    let raw_records = info["raw"]["records"].as_u64().unwrap_or(0);
    let rs = Resample {
        n: a.n as usize,
        top_k: a.top_k,
        uniform: a.random,
        seed: a.seed,
        min_length: a.min_length,
    };
    if a.n > raw_records {
        bail!(
            "--n {} is larger than the raw pool ({raw_records} documents)",
            a.n
        );
    }
    let bar = crate::common::bar(raw_records, "scoring");
    let sel = dsir::select(&rfiles, &layout, &f, &est, &rs, &mut |done| {
        bar.set_position(done)
    })?;
    bar.finish_and_clear();
    // Pass 3: the selected records, whole, into a temp file renamed at the end.
    let ext = a
        .out
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    let (gz, zst, pq) = (ext == "gz", ext == "zst", ext == "parquet");
    let mut counts = None;
    if pq {
        counts = Some(write_parquet(&a.out, &rfiles, &layout, &f, &sel.indices)?);
    } else {
        if let Some(p) = rfiles.iter().find(|p| corpus::is_parquet(p)) {
            bail!(
                "{}: a Parquet pool is written as Parquet: name the output *.parquet",
                p.display()
            );
        }
        lmkit::formats::write::atomic_write(&a.out, |w| {
            let write_all = |sink: &mut dyn Write| {
                dsir::write_selected(&rfiles, &layout, &f, &sel.indices, &mut |r| {
                    writeln!(sink, "{}", r.line).map_err(|e| lmkit::data::Error::Invalid {
                        what: "output".into(),
                        why: e.to_string(),
                    })
                })
                .map_err(|e| std::io::Error::other(e.to_string()))
            };
            counts = Some(if gz {
                let mut enc = flate2::write::GzEncoder::new(w, flate2::Compression::default());
                let c = write_all(&mut enc)?;
                enc.finish()?;
                c
            } else if zst {
                let mut enc = lmkit::data::zst::Writer::new(w);
                let c = write_all(&mut enc)?;
                enc.finish()?;
                c
            } else {
                write_all(w)?
            });
            Ok(())
        })?;
    }
    let Some(counts) = counts else {
        bail!("no selection written");
    };
    let secs = t0.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "target_records": info["target"]["records"],
        "raw_records": raw_records,
        "skipped_lines": info["raw"]["skipped"].as_u64().unwrap_or(0) + info["target"]["skipped"].as_u64().unwrap_or(0),
        "eligible": sel.eligible,
        "selected": sel.indices.len(),
        "kl_reduction": est.kl_reduction(&counts),
        "kl_target_raw": dsir::kl(&est.target, &est.raw),
        "features": f,
        "resample": rs,
        "seconds": secs,
        "raw_docs_per_sec": raw_records as f64 / secs,
        "out": a.out.display().to_string(),
    });
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "selected {} of {} documents ({} eligible) into {}; KL reduction {:.4} (KL target‖raw {:.4}); {:.1} s, {:.0} docs/s",
            sel.indices.len(),
            raw_records,
            sel.eligible,
            a.out.display(),
            report["kl_reduction"].as_f64().unwrap_or(f64::NAN),
            report["kl_target_raw"].as_f64().unwrap_or(f64::NAN),
            secs,
            raw_records as f64 / secs
        );
    }
    Ok(())
}

fn kl(a: KlArgs) -> Result<()> {
    let (est, f, layout, _, _) = estimator(&a.common)?;
    let (sc, ss) = dsir::count(&corpus::files(&a.selected)?, &layout, &f)?;
    if ss.records == 0 {
        bail!("the selection is empty: {}", list(&a.selected));
    }
    let red = est.kl_reduction(&sc);
    if a.common.json {
        let out = serde_json::json!({
            "kl_reduction": red,
            "kl_target_raw": dsir::kl(&est.target, &est.raw),
            "selected_records": ss.records,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "KL reduction {red:.4} over {} selected documents",
            ss.records
        );
    }
    Ok(())
}
