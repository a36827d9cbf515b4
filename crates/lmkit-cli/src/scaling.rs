//! `lmkit scaling predict|optimal|fit`: the data-constrained scaling law (Muennighoff et al.,
//! NeurIPS 2023): predicted loss under repetition, the compute-optimal size and epochs for a
//! compute budget and a unique-data budget, and refitting the constants to one's own runs.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lmkit::data::scaling::{fit, FitWhat, Law, Run};

use crate::plot::{escape, render, write_svg, Chart, Series};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Predicted loss of N parameters trained on D tokens, U of them unique.
    Predict(PredictArgs),
    /// The lowest-loss model size and epochs for a compute budget and a unique-data budget.
    Optimal(OptimalArgs),
    /// Refit the constants to runs in a JSONL file ({"N", "D", "U", "loss"} per line).
    Fit(FitArgs),
}

/// A count: a number (`7e9`, `25000000000`) or one with a suffix K, M, B (or G), T.
fn count(s: &str) -> std::result::Result<f64, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('B') | Some('G') => (&t[..t.len() - 1], 1e9),
        Some('T') => (&t[..t.len() - 1], 1e12),
        _ => (t, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v * mul),
        _ => Err(format!(
            "`{s}` is not a positive count (e.g. 7e9, 25B, 1.5T)"
        )),
    }
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit scaling predict --params 8.67B --tokens 178B --unique 25B\n  lmkit scaling predict --params 1B --epochs 4 --unique 20B --json"
)]
pub struct PredictArgs {
    /// Model parameters N.
    #[arg(long, value_parser = count)]
    pub params: f64,
    /// Tokens trained on D (or give --epochs).
    #[arg(long, value_parser = count, required_unless_present = "epochs", conflicts_with = "epochs")]
    pub tokens: Option<f64>,
    /// Passes over the unique data (D = epochs · U).
    #[arg(long, value_parser = count)]
    pub epochs: Option<f64>,
    /// Unique tokens U.
    #[arg(long, value_parser = count)]
    pub unique: f64,
    /// Constants from a `lmkit scaling fit --json` output instead of the published ones.
    #[arg(long)]
    pub law: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  lmkit scaling optimal --flops 1e22 --unique 25B     # the paper's Figure 1 budget"
)]
pub struct OptimalArgs {
    /// Compute budget in FLOPs (C = 6 N D).
    #[arg(long, value_parser = count)]
    pub flops: f64,
    /// Unique tokens available.
    #[arg(long, value_parser = count)]
    pub unique: f64,
    #[arg(long)]
    pub law: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  lmkit scaling fit runs.jsonl --plot fit.svg\n\nEach line: {\"N\": params, \"D\": tokens, \"U\": unique tokens, \"loss\": final loss}.\nBy default only R_D* and R_N* are fitted (the paper's procedure); --all fits all seven."
)]
pub struct FitArgs {
    /// Runs, one JSON object per line.
    pub runs: PathBuf,
    /// Fit A, B, E, alpha, beta too (needs at least 7 runs).
    #[arg(long)]
    pub all: bool,
    /// Skip malformed lines (counted) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Write an SVG of predicted against observed loss.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn main(c: Command) -> Result<()> {
    match c {
        Command::Predict(a) => predict(a),
        Command::Optimal(a) => optimal(a),
        Command::Fit(a) => run_fit(a),
    }
}

/// The published constants, or those of a `fit --json` output (its `law` field).
fn law(path: &Option<PathBuf>) -> Result<Law> {
    let Some(p) = path else {
        return Ok(Law::published());
    };
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))?;
    let l = v.get("law").unwrap_or(&v);
    serde_json::from_value(l.clone()).with_context(|| {
        format!(
            "{}: no law constants (a, b, e, alpha, beta, rd_star, rn_star)",
            p.display()
        )
    })
}

fn predict(a: PredictArgs) -> Result<()> {
    let law = law(&a.law)?;
    let tokens = match (a.tokens, a.epochs) {
        (Some(t), _) => t,
        (None, Some(e)) => e * a.unique,
        (None, None) => bail!("give --tokens or --epochs"),
    };
    let loss = law.loss(a.params, tokens, a.unique);
    let eff_d = law.effective_data(tokens, a.unique.min(tokens));
    let eff_n = law.effective_params(a.params, a.unique.min(tokens));
    let out = serde_json::json!({
        "params": a.params,
        "tokens": tokens,
        "unique": a.unique,
        "epochs": tokens / a.unique,
        "effective_tokens": eff_d,
        "effective_params": eff_n,
        "loss": loss,
        "loss_if_all_unique": law.loss(a.params, tokens, tokens),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "N = {:.3e}, D = {:.3e} ({:.2} epochs of U = {:.3e})",
            a.params,
            tokens,
            tokens / a.unique,
            a.unique
        );
        println!(
            "effective data D' = {:.3e} ({:.2} epochs' worth), effective parameters N' = {:.3e}",
            eff_d,
            eff_d / a.unique,
            eff_n
        );
        println!(
            "predicted loss {loss:.4} (with D unique tokens: {:.4})",
            law.loss(a.params, tokens, tokens)
        );
    }
    Ok(())
}

fn optimal(a: OptimalArgs) -> Result<()> {
    let law = law(&a.law)?;
    let best = law.optimal_allocation(a.flops, a.unique)?;
    let (n0, d0) = law.chinchilla_optimum(a.flops);
    let plain = law.loss(n0, d0, a.unique.min(d0));
    if a.json {
        let out = serde_json::json!({
            "flops": a.flops,
            "unique": a.unique,
            "optimal": best,
            "unconstrained": {"params": n0, "tokens": d0, "epochs": d0 / a.unique, "loss": plain},
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "compute-optimal with U = {:.3e} unique tokens: N = {:.3e}, D = {:.3e} ({:.2} epochs), loss {:.4}",
            a.unique, best.params, best.tokens, best.epochs, best.loss
        );
        println!(
            "unconstrained optimum (Chinchilla):        N = {n0:.3e}, D = {d0:.3e} ({:.2} epochs), loss {plain:.4}",
            d0 / a.unique
        );
    }
    Ok(())
}

fn read_runs(a: &FitArgs) -> Result<(Vec<Run>, usize)> {
    let text = std::fs::read_to_string(&a.runs)
        .with_context(|| format!("cannot read {}", a.runs.display()))?;
    let (mut runs, mut bad) = (Vec::new(), 0);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Run>(line)
            .map_err(|e| anyhow::anyhow!(e))
            .and_then(|r| r.check().map(|()| r).map_err(|e| anyhow::anyhow!(e)));
        match parsed {
            Ok(r) => runs.push(r),
            Err(_) if a.skip_bad => bad += 1,
            Err(e) => bail!(
                "{}:{}: {e} (each line needs numbers N, D, U, loss; --skip-bad skips such lines)",
                a.runs.display(),
                i + 1
            ),
        }
    }
    if runs.is_empty() {
        bail!("{}: no runs", a.runs.display());
    }
    Ok((runs, bad))
}

fn run_fit(a: FitArgs) -> Result<()> {
    let (runs, bad) = read_runs(&a)?;
    let what = if a.all { FitWhat::All } else { FitWhat::Decay };
    let f = fit(&runs, &Law::published(), what)?;
    if let Some(p) = &a.plot {
        let pts: Vec<(f64, f64)> = runs
            .iter()
            .map(|r| (r.loss, f.law.loss(r.params, r.tokens, r.unique)))
            .collect();
        let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(l, h), &(x, y)| {
            (l.min(x.min(y)), h.max(x.max(y)))
        });
        let chart = Chart {
            title: format!("fitted law: predicted vs observed loss (R² {:.4})", f.r2),
            x_label: "observed loss".into(),
            series: vec![
                Series {
                    name: "runs".into(),
                    points: pts,
                    dots: true,
                },
                Series {
                    name: "y = x".into(),
                    points: vec![(lo, lo), (hi, hi)],
                    dots: false,
                },
            ],
        };
        write_svg(p, &render(&[chart], &escape(&a.runs.display().to_string())))?;
    }
    if a.json {
        let out = serde_json::json!({
            "runs": runs.len(),
            "skipped": bad,
            "fitted": if a.all { "all" } else { "rd_star, rn_star" },
            "law": f.law,
            "objective": f.objective,
            "r2": f.r2,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let l = f.law;
        println!(
            "{} runs{}: R_D* = {:.4}, R_N* = {:.4}, E = {:.4}, A = {:.4}, B = {:.4}, alpha = {:.4}, beta = {:.4}; R² = {:.4}",
            runs.len(),
            if bad > 0 { format!(" ({bad} malformed lines skipped)") } else { String::new() },
            l.rd_star, l.rn_star, l.e, l.a, l.b, l.alpha, l.beta, f.r2
        );
        if let Some(p) = &a.plot {
            println!("plot: {}", p.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_take_suffixes() {
        assert_eq!(count("25B"), Ok(25e9));
        assert_eq!(count("1.5t"), Ok(1.5e12));
        assert_eq!(count("7e9"), Ok(7e9));
        assert!(count("-3").is_err() && count("many").is_err() && count("0").is_err());
    }
}
