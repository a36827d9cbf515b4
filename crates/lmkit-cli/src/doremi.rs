//! `lmkit data doremi`: DoReMi's two small runs in one command (Xie et al., "DoReMi: Optimizing
//! Data Mixtures Speeds Up Language Model Pretraining", arXiv 2305.10429). The reference model
//! trains on the config's mixture (uniform unless `[data.weights]` says otherwise); the proxy, the
//! same shape, samples the domains uniformly (the paper's §2) and trains against it by Group DRO,
//! learning the domain weights. Written to OUT:
//! `reference/`, `proxy/` (the two runs), `domain_weights.json` (the average weights ᾱ, which
//! `lmkit train` reads through `data.weights_from`, and every step's weights and excess losses)
//! and `domain_weights.svg` (their curves). With `--rounds R > 1`, iterated DoReMi: each round
//! in OUT/round-N/, round N's reference trained on round N − 1's weights, until they stop
//! moving; OUT/domain_weights.json is the last round's, with every round's average.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::plot::{Chart, Series};
use crate::train;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit data doremi --proxy-config proxy.toml --out runs/doremi\n  lmkit data doremi --proxy-config proxy.toml --domains wiki=wiki.jsonl code=code/ --out runs/doremi\n  lmkit train --config main.toml --out runs/main   # with [data] weights_from = \"../doremi/domain_weights.json\"\n\nThe config is `lmkit train`'s ([model], [data] with [data.domains], [train]); both runs use it.\nThe reference trains on the config's mixture ([data.weights], uniform by default); the proxy\nsamples uniformly, as the paper's. A finished reference (OUT/reference/final) is reused when\nthe command runs again.\nIterated DoReMi (--rounds 3): round N's reference trains on round\nN-1's weights. Finished rounds are reused."
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
    /// Iterated DoReMi: up to this many rounds, each round's reference trained on the weights
    /// the round before learned (1: one round, as the paper's main experiments).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Stop iterating once no domain's weight moved more than this from one round to the next
    /// (the paper's ‖ᾱ − α_ref‖∞ < 10⁻³).
    #[arg(long, default_value_t = 1e-3)]
    pub converged: f64,
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

fn train_args(
    a: &Args,
    out: PathBuf,
    reference: Option<PathBuf>,
    weights_from: Option<PathBuf>,
) -> train::Args {
    train::Args {
        config: a.proxy_config.clone(),
        out,
        resume: false,
        threads: a.threads,
        device: a.device.clone(),
        dtype: None,
        loss_scale: Default::default(),
        model: None,
        gguf: None,
        json: false,
        doremi_eta: a.eta,
        doremi_smoothing: a.smoothing,
        doremi_update_every: a.update_every,
        domains: a.domains.clone(),
        // The proxy samples uniformly; the reference, the config's mixture or `weights_from`.
        uniform: reference.is_some(),
        doremi_reference: reference,
        weights_from,
    }
}

pub fn main(a: Args) -> Result<()> {
    if !(a.eta > 0.0 && a.eta.is_finite()) {
        bail!("--eta must be a positive number, not {}", a.eta);
    }
    if !(0.0..=1.0).contains(&a.smoothing) {
        bail!("--smoothing must be in [0, 1], not {}", a.smoothing);
    }
    if !(0.0..=1.0).contains(&a.converged) {
        bail!("--converged must be in [0, 1], not {}", a.converged);
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let (mut report, rounds) = if a.rounds == 1 {
        (
            round(&a, &a.out, a.reference.clone(), None, "")?,
            Vec::new(),
        )
    } else {
        iterate(&a)?
    };
    let json_out = a.out.join("domain_weights.json");
    let svg_out = a.out.join("domain_weights.svg");
    if !rounds.is_empty() {
        // The last round's weights, with every round's average and how far it moved.
        report["rounds"] = Value::Array(rounds);
        write_report(&report, &json_out, &svg_out)?;
    }
    let names = domain_names(&report);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "average": report["average"],
                "final": report["final"],
                "updates": report["updates"],
                "rounds": report.get("rounds"),
                "weights": json_out.display().to_string(),
                "plot": svg_out.display().to_string(),
            }))?
        );
    } else {
        if let Some(rounds) = report["rounds"].as_array() {
            let head: Vec<String> = names.iter().map(|n| format!("{n:>8}")).collect();
            println!("{:<8} {}", "round", head.join(" "));
            for r in rounds {
                let w: Vec<String> = names
                    .iter()
                    .map(|n| format!("{:>8.4}", r["average"][n].as_f64().unwrap_or(f64::NAN)))
                    .collect();
                let moved = match r["moved"].as_f64() {
                    Some(m) => format!("moved {m:.4}"),
                    None => "first round".into(),
                };
                println!(
                    "{:<8} {}   ({moved})",
                    r["round"].as_u64().unwrap_or(0),
                    w.join(" ")
                );
            }
        }
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

/// Iterated DoReMi (the paper's §2, used on GLaM in §3.2; the reference code's advice for a
/// uniform reference mixture): round r's reference trains on round r − 1's average weights
/// α_ref ← ᾱ, its proxy (sampling uniformly whatever α_ref is, as the paper's) learns new
/// ones against it, until ‖ᾱ − α_ref‖∞ ≤ `--converged`
/// or `--rounds` are done. Rounds live in OUT/round-R/; a finished round with the same DoReMi
/// settings is reused when the command runs again.
fn iterate(a: &Args) -> Result<(Value, Vec<Value>)> {
    let mut rounds: Vec<Value> = Vec::new();
    let mut last: Option<(PathBuf, Value)> = None;
    for r in 1..=a.rounds {
        let dir = a.out.join(format!("round-{r}"));
        let label = format!("round {r}/{}: ", a.rounds);
        let report = match finished(a, &dir)? {
            Some(v) => {
                eprintln!("{label}reusing the finished round {}", dir.display());
                v
            }
            None => {
                let (reference, prev) = match &last {
                    None => (a.reference.clone(), None),
                    Some((p, v)) => (None, Some((p.join("domain_weights.json"), &v["average"]))),
                };
                round(a, &dir, reference, prev, &label)?
            }
        };
        let moved = match &last {
            None => f64::NAN,
            Some((_, prev)) => moved(&prev["average"], &report["average"]),
        };
        rounds.push(serde_json::json!({
            "round": r,
            "average": report["average"],
            "moved": if moved.is_finite() { Value::from(moved) } else { Value::Null },
        }));
        last = Some((dir, report));
        if moved <= a.converged {
            eprintln!(
                "the weights moved {moved:.4} ≤ {} in round {r}: done",
                a.converged
            );
            break;
        }
    }
    let last_move = rounds
        .last()
        .and_then(|r| r["moved"].as_f64())
        .unwrap_or(f64::NAN);
    if last_move.is_nan() || last_move > a.converged {
        eprintln!(
            "warning: the weights did not converge in {} rounds (the last round moved them by {last_move:.4} > {})",
            rounds.len(),
            a.converged
        );
    }
    let report = last.map(|(_, v)| v).unwrap_or(Value::Null);
    Ok((report, rounds))
}

/// A round's report if DIR holds a finished one made with these DoReMi settings.
fn finished(a: &Args, dir: &std::path::Path) -> Result<Option<Value>> {
    let path = dir.join("domain_weights.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let same = v["eta"].as_f64() == Some(a.eta)
        && v["smoothing"].as_f64() == Some(a.smoothing)
        && v["update_every"].as_u64() == Some(u64::from(a.update_every));
    Ok(same.then_some(v))
}

/// The largest change of one domain's weight between two `average` objects.
fn moved(before: &Value, after: &Value) -> f64 {
    let Some(after) = after.as_object() else {
        return f64::NAN;
    };
    after
        .iter()
        .map(|(k, w)| {
            (w.as_f64().unwrap_or(f64::NAN) - before[k].as_f64().unwrap_or(f64::NAN)).abs()
        })
        .fold(0.0, f64::max)
}

/// One DoReMi round in DIR: the reference (given, reused from DIR/reference/final, or trained
/// on the config's mixture or on the previous round's weights `prev`: their file and its
/// `average`), then the proxy; writes DIR/domain_weights.json and its plot and returns the
/// report.
fn round(
    a: &Args,
    dir: &std::path::Path,
    reference: Option<PathBuf>,
    prev: Option<(PathBuf, &Value)>,
    label: &str,
) -> Result<Value> {
    let reference = match reference {
        Some(r) => r,
        None => {
            let rdir = dir.join("reference");
            let done = rdir.join("final");
            // Which weights a reference was trained on, when they came from an earlier round.
            let stamp = rdir.join("trained_on.json");
            let same = match &prev {
                None => true,
                Some((_, avg)) => std::fs::read(&stamp)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .is_some_and(|v| &&v == avg),
            };
            if done.join("config.json").is_file() && same {
                eprintln!(
                    "{label}reusing the reference model {} (delete it to train a new one)",
                    done.display()
                );
            } else {
                if rdir.exists() {
                    eprintln!(
                        "{label}{} was trained on other weights: training it again",
                        rdir.display()
                    );
                    std::fs::remove_dir_all(&rdir)
                        .with_context(|| format!("cannot remove {}", rdir.display()))?;
                }
                let on = match &prev {
                    Some((w, _)) => format!("the weights of {}", w.display()),
                    None => "the config's mixture".into(),
                };
                eprintln!("{label}1/2: the reference model, on {on}");
                let weights = prev.as_ref().map(|(w, _)| w.clone());
                train::run(&train_args(a, rdir, None, weights))?;
                if let Some((_, avg)) = &prev {
                    let text = serde_json::to_string_pretty(avg)?;
                    lmkit::formats::write::atomic_write(&stamp, |w| w.write_all(text.as_bytes()))
                        .with_context(|| format!("cannot write {}", stamp.display()))?;
                }
            }
            done
        }
    };
    eprintln!("{label}2/2: the proxy model, by Group DRO against the reference");
    let proxy = dir.join("proxy");
    if proxy.exists() {
        // This command's own output from an earlier call: start the proxy's log over.
        std::fs::remove_dir_all(&proxy)
            .with_context(|| format!("cannot remove the earlier proxy run {}", proxy.display()))?;
    }
    train::run(&train_args(a, proxy.clone(), Some(reference), None))?;

    let src = proxy.join("domain_weights.json");
    let text =
        std::fs::read_to_string(&src).with_context(|| format!("cannot read {}", src.display()))?;
    let report: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", src.display()))?;
    write_report(
        &report,
        &dir.join("domain_weights.json"),
        &dir.join("domain_weights.svg"),
    )?;
    Ok(report)
}

fn write_report(
    report: &Value,
    json_out: &std::path::Path,
    svg_out: &std::path::Path,
) -> Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    lmkit::formats::write::atomic_write(json_out, |w| w.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", json_out.display()))?;
    let title = format!(
        "DoReMi domain weights (η = {}, c = {})",
        report["eta"], report["smoothing"]
    );
    crate::plot::write_svg(svg_out, &crate::plot::render(&charts(report), &title))
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
    let mut out = vec![
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
    ];
    let rounds = report["rounds"].as_array().cloned().unwrap_or_default();
    if rounds.len() > 1 {
        out.push(Chart {
            title: "iterated DoReMi: ᾱ learned in each round".into(),
            x_label: "round".into(),
            series: names
                .iter()
                .map(|n| Series {
                    name: n.clone(),
                    points: rounds
                        .iter()
                        .filter_map(|r| Some((r["round"].as_f64()?, r["average"][n].as_f64()?)))
                        .collect(),
                    dots: false,
                })
                .collect(),
        });
    }
    out
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
