//! `lmkit ppl`: perplexity of a text file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lmkit::PplOptions;

use crate::common::{bar, ModelArgs};

#[derive(clap::Args)]
#[command(
    after_help = "Scoring follows llama.cpp's llama-perplexity: the file is tokenized once, cut into\nwindows of --ctx tokens, and the second half of each window is scored (each scored token sees\nat least ctx/2 tokens of context). BOS replaces each window's first token only if the model adds BOS.\n\nExamples:\n  lmkit ppl wikitext-2/test.txt\n  lmkit ppl book.txt --ctx 1024 --max-windows 20 --json"
)]
pub struct Args {
    /// Text file to score.
    pub file: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Tokens between window starts (default: --ctx, non-overlapping).
    #[arg(long)]
    pub stride: Option<usize>,
    /// First scored position of each window (default: ctx/2, as llama.cpp).
    #[arg(long)]
    pub score_from: Option<usize>,
    /// Score at most this many windows (at least 1).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_windows: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    /// With --kv: score token by token under each listed KV-cache policy and budget (a fresh
    /// cache per window that evicts as it goes), next to the full cache.
    #[command(flatten)]
    pub kv: crate::kv::KvArgs,
    /// With --kv: an SVG of perplexity against the cache budget.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn main(a: Args) -> Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    // As llama.cpp reads `-f FILE`: exactly one trailing newline is dropped.
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let m = a.model.load()?;
    let ids = m.tokenizer.encode_with_bos(text)?;
    let bos = if m.tokenizer.special.add_bos {
        m.tokenizer.special.bos
    } else {
        None
    };
    if !a.kv.kv.is_empty() {
        return streaming(&a, &m, &ids, bos);
    }
    if a.plot.is_some() {
        anyhow::bail!(
            "--plot draws perplexity against the KV budget: add --kv (e.g. --kv window,h2o)"
        );
    }
    let opts = PplOptions {
        ctx: a.ctx,
        stride: a.stride,
        score_from: a.score_from,
        max_windows: a.max_windows,
        bos,
        batch: a.batch,
    };
    let pb = bar(0, "perplexity");
    let r = lmkit::perplexity(&m.model, &ids, &opts, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    });
    pb.finish_and_clear();
    let r = r?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["file"] = serde_json::json!(a.file.display().to_string());
        v["model"] = serde_json::json!(m.path.display().to_string());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "perplexity: {:.4} ± {:.4}  ({} windows of {}, {} tokens scored of {}, {:.1} tokens/s)",
            r.ppl,
            r.ppl_stderr,
            r.windows,
            r.ctx,
            r.scored_tokens,
            r.total_tokens,
            r.tokens_per_sec
        );
    }
    Ok(())
}

/// `--kv`: each window streamed token by token under every policy, the full cache first (its
/// predictions are the reference for top-1 agreement).
fn streaming(a: &Args, m: &lmkit::LoadedModel, ids: &[u32], bos: Option<u32>) -> Result<()> {
    use lmkit::eval::{kv_perplexity, KvPplOptions};
    use lmkit::generate_mod::kv::FullCache;

    if a.stride.is_some() || a.batch != 1 {
        anyhow::bail!("--kv streams one window at a time: --stride and --batch do not apply");
    }
    let mut runs = a.kv.policies()?;
    runs.retain(|(_, b)| b.is_some());
    let opts = KvPplOptions {
        ctx: a.ctx,
        score_from: a.score_from.unwrap_or(0),
        max_windows: a.max_windows,
        bos,
    };
    let total = runs.len() + 1;
    let pb = bar(0, "streaming perplexity");
    let step = |k: usize, name: String| {
        pb.set_message(format!("{name} ({}/{total})", k + 1));
        let pb = pb.clone();
        move |done: usize, all: usize| {
            pb.set_length((all * total) as u64);
            pb.set_position((k * all + done) as u64);
        }
    };
    let mut progress = step(0, "full".into());
    let (full, reference) = kv_perplexity(
        &m.model,
        ids,
        &opts,
        std::sync::Arc::new(FullCache),
        None,
        &mut progress,
    )?;
    let mut reports = vec![(None, full)];
    for (k, (p, budget)) in runs.iter().enumerate() {
        let mut progress = step(k + 1, p.name());
        let (r, _) = kv_perplexity(
            &m.model,
            ids,
            &opts,
            p.clone(),
            Some(&reference),
            &mut progress,
        )?;
        reports.push((*budget, r));
    }
    pb.finish_and_clear();
    let full_ppl = reports[0].1.ppl;
    if a.json {
        let rows: Vec<serde_json::Value> = reports
            .iter()
            .map(|(b, r)| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["budget"] = serde_json::json!(b.map(|b| b.to_string()));
                v["ppl_ratio_to_full"] = serde_json::json!(r.ppl / full_ppl);
                v
            })
            .collect();
        let v = serde_json::json!({
            "file": a.file.display().to_string(),
            "model": m.path.display().to_string(),
            "runs": rows,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} windows of {} tokens, streamed token by token; {} predictions each",
            reports[0].1.windows,
            reports[0].1.ctx,
            reports[0].1.scored_tokens / reports[0].1.windows.max(1)
        );
        println!(
            "{:<22} {:>18} {:>9} {:>8} {:>9} {:>12} {:>9}",
            "policy", "perplexity", "vs full", "top-1", "entries", "peak KV MB", "tok/s"
        );
        for (_, r) in &reports {
            println!(
                "{:<22} {:>9.3} ± {:<6.3} {:>8.3}x {:>8} {:>9.0} {:>12.2} {:>9.1}",
                r.policy,
                r.ppl,
                r.ppl_stderr,
                r.ppl / full_ppl,
                r.top1_agreement
                    .map_or("-".to_string(), |x| format!("{:.1}%", 100.0 * x)),
                r.final_entries,
                r.peak_kv_bytes as f64 / 1e6,
                r.tokens_per_sec
            );
        }
    }
    if let Some(out) = &a.plot {
        let svg = budget_plot(&reports, &a.file.display().to_string());
        crate::plot::write_svg(out, &svg)?;
        eprintln!("plot: {}", out.display());
    }
    Ok(())
}

/// Perplexity against the budget, one line per policy, the full cache as a flat line.
fn budget_plot(
    reports: &[(
        Option<lmkit::generate_mod::kv::Budget>,
        lmkit::eval::KvPplReport,
    )],
    file: &str,
) -> String {
    use crate::plot::{render, Chart, Series};
    use lmkit::generate_mod::kv::Budget;

    let x_of = |b: &Budget, r: &lmkit::eval::KvPplReport| match *b {
        Budget::Ratio(x) => 100.0 * x,
        Budget::Tokens(n) => 100.0 * n as f64 / r.ctx as f64,
    };
    let mut series: Vec<Series> = Vec::new();
    for (b, r) in reports.iter().skip(1) {
        let Some(b) = b else { continue };
        let family = r.policy.split(' ').next().unwrap_or("").to_string();
        let point = (x_of(b, r), r.ppl);
        match series.iter_mut().find(|s| s.name == family) {
            Some(s) => s.points.push(point),
            None => series.push(Series {
                name: family,
                points: vec![point],
                dots: false,
            }),
        }
    }
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let full = reports[0].1.ppl;
    let lo = xs.iter().copied().fold(100.0, f64::min);
    for s in &mut series {
        s.points.push((100.0, full));
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    series.push(Series {
        name: "full cache".into(),
        points: vec![(lo, full), (100.0, full)],
        dots: false,
    });
    let chart = Chart {
        title: "perplexity vs KV-cache budget".into(),
        x_label: "budget (% of the tokens seen)".into(),
        series,
    };
    render(&[chart], &format!("{file}: streamed, token by token"))
}
