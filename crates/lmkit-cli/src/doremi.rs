//! `lmkit data doremi`: DoReMi's two small runs in one command (Xie et al., "DoReMi: Optimizing
//! Data Mixtures Speeds Up Language Model Pretraining", arXiv 2305.10429). The reference model
//! trains on the config's mixture (uniform unless `[data.weights]` says otherwise); the proxy, the
//! same shape, trains against it by Group DRO and learns the domain weights. Written to OUT:
//! `reference/`, `proxy/` (the two runs), `domain_weights.json` (the average weights ᾱ, which
//! `lmkit train` reads through `data.weights_from`, and every step's weights and excess losses)
//! and `domain_weights.svg` (their curves).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::plot::{Chart, Series};
use crate::train;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit data doremi --proxy-config proxy.toml --out runs/doremi\n  lmkit data doremi --proxy-config proxy.toml --domains wiki=wiki.jsonl code=code/ --out runs/doremi\n  lmkit train --config main.toml --out runs/main   # with [data] weights_from = \"../doremi/domain_weights.json\"\n\nThe config is `lmkit train`'s ([model], [data] with [data.domains], [train]); both runs use it.\nA finished reference (OUT/reference/final) is reused when the command runs again."
)]
pub struct Args {
    /// The proxy's (and the reference's) training config: `lmkit train`'s TOML or JSON.
    #[arg(long)]
    pub proxy_config: PathBuf,
    /// Domains as NAME=PATH (files or folders; repeat a name for several paths), replacing the
    /// config's `[data.domains]`.
    #[arg(long, num_args = 1.., value_parser = domain)]
    pub domains: Vec<(String, PathBuf)>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Use this trained reference model (an HF folder) instead of training one.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// DoReMi's step size η.
    #[arg(long, default_value_t = 1.0)]
    pub eta: f64,
    /// DoReMi's smoothing c toward uniform weights.
    #[arg(long, default_value_t = 1e-3)]
    pub smoothing: f64,
    /// Pool the proxy's excess losses over this many batches per weight update (1: every
    /// batch, as the paper; more: a larger effective batch for the update).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub update_every: u32,
    /// CPU worker threads (default: all cores).
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Where to train: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the learned weights as JSON.
    #[arg(long)]
    pub json: bool,
}

fn domain(s: &str) -> std::result::Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
        _ => Err(format!("`{s}`: expected NAME=PATH")),
    }
}

fn train_args(a: &Args, out: PathBuf, reference: Option<PathBuf>) -> train::Args {
    train::Args {
        config: a.proxy_config.clone(),
        out,
        resume: false,
        threads: a.threads,
        device: a.device.clone(),
        dtype: None,
        model: None,
        gguf: None,
        json: false,
        doremi_reference: reference,
        doremi_eta: a.eta,
        doremi_smoothing: a.smoothing,
        doremi_update_every: a.update_every,
        domains: a.domains.clone(),
    }
}

pub fn main(a: Args) -> Result<()> {
    if !(a.eta > 0.0 && a.eta.is_finite()) {
        bail!("--eta must be a positive number, not {}", a.eta);
    }
    if !(0.0..=1.0).contains(&a.smoothing) {
        bail!("--smoothing must be in [0, 1], not {}", a.smoothing);
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let reference = match &a.reference {
        Some(r) => r.clone(),
        None => {
            let dir = a.out.join("reference");
            let done = dir.join("final");
            if done.join("config.json").is_file() {
                eprintln!(
                    "reusing the reference model {} (delete it to train a new one)",
                    done.display()
                );
            } else {
                eprintln!("1/2: the reference model, on the config's mixture");
                train::run(&train_args(&a, dir, None))?;
            }
            done
        }
    };
    eprintln!("2/2: the proxy model, by Group DRO against the reference");
    let proxy = a.out.join("proxy");
    if proxy.exists() {
        // This command's own output from an earlier call: start the proxy's log over.
        std::fs::remove_dir_all(&proxy)
            .with_context(|| format!("cannot remove the earlier proxy run {}", proxy.display()))?;
    }
    train::run(&train_args(&a, proxy.clone(), Some(reference)))?;

    let src = proxy.join("domain_weights.json");
    let text =
        std::fs::read_to_string(&src).with_context(|| format!("cannot read {}", src.display()))?;
    let report: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", src.display()))?;
    let json_out = a.out.join("domain_weights.json");
    lmkit::formats::write::atomic_write(&json_out, |w| w.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", json_out.display()))?;
    let svg_out = a.out.join("domain_weights.svg");
    let charts = charts(&report);
    let title = format!(
        "DoReMi domain weights (η = {}, c = {})",
        report["eta"], report["smoothing"]
    );
    crate::plot::write_svg(&svg_out, &crate::plot::render(&charts, &title))?;

    let names = domain_names(&report);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "average": report["average"],
                "final": report["final"],
                "updates": report["updates"],
                "weights": json_out.display().to_string(),
                "plot": svg_out.display().to_string(),
            }))?
        );
    } else {
        println!("{:<16} {:>8} {:>8}", "domain", "average", "final");
        for n in &names {
            println!(
                "{n:<16} {:>8.4} {:>8.4}",
                report["average"][n].as_f64().unwrap_or(f64::NAN),
                report["final"][n].as_f64().unwrap_or(f64::NAN)
            );
        }
        println!("→ {} and {}", json_out.display(), svg_out.display());
    }
    Ok(())
}

fn domain_names(report: &Value) -> Vec<String> {
    report["domains"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Three panels from a `domain_weights.json`: each domain's weight α after every update, its
/// running average ᾱ (what the main run uses: the last point), and its excess loss λ.
pub fn charts(report: &Value) -> Vec<Chart> {
    let names = domain_names(report);
    let steps = report["steps"].as_array().cloned().unwrap_or_default();
    let pick = |key: &str, n: &str| -> Series {
        let points = steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some(((i + 1) as f64, s[key][n].as_f64()?)))
            .filter(|(_, v)| v.is_finite())
            .collect();
        Series {
            name: n.to_string(),
            points,
            dots: false,
        }
    };
    let weights: Vec<Series> = names.iter().map(|n| pick("weights", n)).collect();
    let running: Vec<Series> = weights
        .iter()
        .map(|s| {
            let mut sum = 0.0;
            let points = s
                .points
                .iter()
                .enumerate()
                .map(|(i, &(x, v))| {
                    sum += v;
                    (x, sum / (i + 1) as f64)
                })
                .collect();
            let last = report["average"][&s.name].as_f64().unwrap_or(f64::NAN);
            Series {
                name: format!("{} {last:.3}", s.name),
                points,
                dots: false,
            }
        })
        .collect();
    vec![
        Chart {
            title: "domain weight α after each update".into(),
            x_label: "update".into(),
            series: weights,
        },
        Chart {
            title: "running average ᾱ (the learned weights)".into(),
            x_label: "update".into(),
            series: running,
        },
        Chart {
            title: "excess loss λ (proxy − reference, clipped at 0)".into(),
            x_label: "update".into(),
            series: names.iter().map(|n| pick("excess", n)).collect(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_parse_and_charts_follow_the_report() {
        assert_eq!(
            domain("wiki=a/b.jsonl").unwrap(),
            ("wiki".to_string(), PathBuf::from("a/b.jsonl"))
        );
        assert!(domain("wiki").is_err() && domain("=x").is_err() && domain("x=").is_err());
        let report = serde_json::json!({
            "domains": ["a", "b"], "average": {"a": 0.7, "b": 0.3}, "final": {"a": 0.8, "b": 0.2},
            "eta": 1.0, "smoothing": 0.001, "updates": 2,
            "steps": [
                {"weights": {"a": 0.6, "b": 0.4}, "excess": {"a": 0.2, "b": 0.0}},
                {"weights": {"a": 0.8, "b": 0.2}, "excess": {"a": 0.3, "b": 0.1}}
            ]
        });
        let c = charts(&report);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].series[0].points, vec![(1.0, 0.6), (2.0, 0.8)]);
        assert_eq!(c[1].series[0].points, vec![(1.0, 0.6), (2.0, 0.7)]);
        assert_eq!(c[1].series[1].name, "b 0.300");
        assert_eq!(c[2].series[1].points, vec![(1.0, 0.0), (2.0, 0.1)]);
    }
}
