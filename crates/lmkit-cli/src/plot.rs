//! `lmkit plot RUN_DIR`: the curves of a run's `metrics.jsonl` as one SVG file. A `train` run
//! gives train/eval loss and the learning rate; a `dpo` run gives loss, reward accuracy, reward
//! margin and the chosen/rejected log-probs, train and held-out; a DoReMi folder (or its
//! `domain_weights.json`) gives the domain weights, their running average and the excess losses.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::Value;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit plot runs/tiny             # writes runs/tiny/metrics.svg\n  lmkit plot runs/dpo --out dpo.svg\n  lmkit plot runs/doremi            # DoReMi: writes runs/doremi/domain_weights.svg"
)]
pub struct Args {
    /// A run folder (with metrics.jsonl) or a metrics .jsonl file.
    pub run: PathBuf,
    /// Output SVG (default: metrics.svg next to metrics.jsonl).
    #[arg(short, long)]
    pub out: Option<PathBuf>,
}

/// One line (or, with `dots`, one scatter) of a chart: a name and its (x, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dots: bool,
}

/// One panel: a title, the x axis' label and its lines.
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub series: Vec<Series>,
}

/// `(step, value)` for every record where `pick` finds a finite number.
fn series(records: &[Value], name: &str, pick: impl Fn(&Value) -> Option<f64>) -> Series {
    let points = records
        .iter()
        .filter_map(|r| Some((r["step"].as_f64()?, pick(r)?)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    Series {
        name: name.into(),
        points,
        dots: false,
    }
}

/// The panels for a run's records (trainer or DPO logs).
fn charts(records: &[Value]) -> Vec<Chart> {
    let dpo = records
        .iter()
        .any(|r| r.get("train").is_some_and(Value::is_object));
    let mut out = Vec::new();
    if dpo {
        for (title, key) in [
            ("DPO loss", "loss"),
            ("reward accuracy", "rewards_accuracies"),
            ("reward margin", "rewards_margins"),
        ] {
            out.push(Chart {
                x_label: "step".into(),
                title: title.into(),
                series: vec![
                    series(records, "train", |r| r["train"][key].as_f64()),
                    series(records, "held-out", |r| r["eval"][key].as_f64()),
                ],
            });
        }
        out.push(Chart {
            x_label: "step".into(),
            title: "sequence log-probs (train)".into(),
            series: vec![
                series(records, "chosen", |r| r["train"]["logps_chosen"].as_f64()),
                series(records, "rejected", |r| {
                    r["train"]["logps_rejected"].as_f64()
                }),
            ],
        });
    } else {
        out.push(Chart {
            x_label: "step".into(),
            title: "loss".into(),
            series: vec![
                series(records, "train", |r| r["loss"].as_f64()),
                series(records, "eval", |r| r["eval_loss"].as_f64()),
            ],
        });
        out.push(Chart {
            x_label: "step".into(),
            title: "learning rate".into(),
            series: vec![series(records, "lr", |r| r["lr"].as_f64())],
        });
    }
    for c in &mut out {
        c.series.retain(|s| !s.points.is_empty());
    }
    out.retain(|c| !c.series.is_empty());
    out
}

/// "Nice" tick positions covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(f64::EPSILON);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..)
        .map(|i| first + i as f64 * step)
        .take_while(|t| *t <= hi + step * 1e-9)
        .collect()
}

/// Tick labels with the decimals their spacing needs (scientific for tiny or huge values).
fn labels(ts: &[f64]) -> Vec<String> {
    let step = match ts {
        [a, b, ..] => (b - a).abs(),
        _ => 1.0,
    };
    let top = ts.iter().fold(0f64, |m, t| m.max(t.abs()));
    if step < 1e-3 || top >= 1e6 {
        return ts.iter().map(|t| format!("{t:.1e}")).collect();
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    ts.iter().map(|t| format!("{t:.decimals$}")).collect()
}

const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
const W: f64 = 560.0;
const H: f64 = 300.0;

/// One panel at vertical offset `y0`.
fn panel(svg: &mut String, c: &Chart, y0: f64) {
    let (l, r, t, b) = (70.0, W - 20.0, y0 + 36.0, y0 + H - 40.0);
    let all = c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut v0, mut v1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, v) in all {
        (x0, x1, v0, v1) = (x0.min(x), x1.max(x), v0.min(v), v1.max(v));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if v1 <= v0 {
        (v0, v1) = (v0 - 0.5, v1 + 0.5);
    }
    let pad = (v1 - v0) * 0.05;
    let (v0, v1) = (v0 - pad, v1 + pad);
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (r - l);
    let py = |v: f64| b - (v - v0) / (v1 - v0) * (b - t);
    let _ = writeln!(
        svg,
        r#"<text x="{l}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        y0 + 20.0,
        c.title
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#888"/>"##,
        r - l,
        b - t
    );
    let vt = ticks(v0, v1);
    for (v, text) in vt.iter().zip(labels(&vt)) {
        let y = py(*v);
        let _ = writeln!(
            svg,
            r##"<line x1="{l}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{text}</text>"##,
            l - 5.0,
            y + 4.0,
        );
    }
    let xt = ticks(x0, x1);
    for (x, text) in xt.iter().zip(labels(&xt)) {
        let xp = px(*x);
        let _ = writeln!(
            svg,
            r#"<text x="{xp:.1}" y="{}" font-size="11" text-anchor="middle">{text}</text>"#,
            b + 15.0,
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
        (l + r) / 2.0,
        b + 30.0,
        escape(&c.x_label)
    );
    for (i, s) in c.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, v)| format!("{:.1},{:.1}", px(x), py(v)))
            .collect();
        if pts.len() == 1 || s.dots {
            for &(x, v) in &s.points {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    px(x),
                    py(v)
                );
            }
        } else {
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                pts.join(" ")
            );
        }
    }
    legend(svg, c, (l, r, t));
}

/// The legend: one row above the plot, right-aligned, when it fits; else a column inside the
/// plot's top-left corner on a white box.
fn legend(svg: &mut String, c: &Chart, (l, r, t): (f64, f64, f64)) {
    let width = |s: &Series| 30.0 + 6.5 * s.name.chars().count() as f64;
    let total: f64 = c.series.iter().map(width).sum();
    let row = total <= r - l;
    if !row {
        let w = c.series.iter().map(width).fold(0.0, f64::max);
        let _ = writeln!(
            svg,
            r##"<rect x="{}" y="{}" width="{w:.1}" height="{}" fill="white" fill-opacity="0.85" stroke="#ccc"/>"##,
            l + 4.0,
            t + 4.0,
            16.0 * c.series.len() as f64 + 6.0
        );
    }
    let mut x = r - total;
    for (i, s) in c.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let (lx, ly) = if row {
            (x, t - 8.0)
        } else {
            (l + 10.0, t + 16.0 + 16.0 * i as f64)
        };
        x += width(s);
        let _ = writeln!(
            svg,
            r#"<line x1="{lx:.1}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{}" font-size="11">{}</text>"#,
            lx + 18.0,
            lx + 22.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
}

/// The SVG document for `charts`, stacked vertically.
pub fn render(charts: &[Chart], title: &str) -> String {
    let height = H * charts.len() as f64 + 30.0;
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="18" font-size="12" fill="#555">{title}</text>
"##
    );
    for (i, c) in charts.iter().enumerate() {
        panel(&mut svg, c, 30.0 + H * i as f64);
    }
    svg.push_str("</svg>\n");
    svg
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn main(a: Args) -> Result<()> {
    // A DoReMi folder (`lmkit data doremi`'s output) or its weights file.
    let weights = if a.run.is_dir() {
        a.run.join("domain_weights.json")
    } else {
        a.run.clone()
    };
    if weights
        .file_name()
        .is_some_and(|n| n == "domain_weights.json")
        && weights.is_file()
        && !a.run.join("metrics.jsonl").is_file()
    {
        let text = std::fs::read_to_string(&weights)
            .with_context(|| format!("cannot read {}", weights.display()))?;
        let report: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not JSON", weights.display()))?;
        let charts = crate::doremi::charts(&report);
        if charts
            .iter()
            .all(|c| c.series.iter().all(|s| s.points.is_empty()))
        {
            bail!("{}: no DoReMi updates to plot", weights.display());
        }
        let out = a
            .out
            .unwrap_or_else(|| weights.with_file_name("domain_weights.svg"));
        let svg = render(&charts, &escape(&weights.display().to_string()));
        write_svg(&out, &svg)?;
        println!("{}", out.display());
        return Ok(());
    }
    let metrics = if a.run.is_dir() {
        a.run.join("metrics.jsonl")
    } else {
        a.run.clone()
    };
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}: not JSON", metrics.display(), i + 1))?;
        records.push(v);
    }
    let charts = charts(&records);
    if charts.is_empty() {
        bail!("{}: no steps with metrics to plot", metrics.display());
    }
    let out = a
        .out
        .unwrap_or_else(|| metrics.with_file_name("metrics.svg"));
    let svg = render(&charts, &escape(&metrics.display().to_string()));
    write_svg(&out, &svg)?;
    println!("{}", out.display());
    Ok(())
}

/// Writes an SVG file atomically (temp file, rename).
pub fn write_svg(out: &std::path::Path, svg: &str) -> Result<()> {
    let tmp = out.with_extension(format!("svg.tmp-{}", std::process::id()));
    let r = std::fs::write(&tmp, svg).and_then(|()| std::fs::rename(&tmp, out));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.with_context(|| format!("cannot write {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_range() {
        let t = ticks(0.13, 9.7);
        assert!(t.len() >= 3 && t.len() <= 7, "{t:?}");
        assert!(t[0] >= 0.13 && *t.last().unwrap() <= 9.7);
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(labels(&[0.0, 2.0, 4.0]), ["0", "2", "4"]);
        assert_eq!(labels(&[0.0, 0.5, 1.0]), ["0.0", "0.5", "1.0"]);
        assert_eq!(labels(&[0.0, 0.0005]), ["0.0e0", "5.0e-4"]);
    }

    #[test]
    fn trainer_and_dpo_logs_make_their_panels() {
        let train: Vec<Value> = (1..=3)
            .map(|s| {
                serde_json::json!({"step": s, "lr": 1e-3, "loss": 5.0 / s as f64,
                    "eval_loss": if s == 3 { Value::from(2.0) } else { Value::Null }})
            })
            .collect();
        let c = charts(&train);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].series.len(), 2);
        assert_eq!(c[0].series[1].points, vec![(3.0, 2.0)]);
        let svg = render(&c, "t");
        assert!(svg.contains("<polyline") && svg.contains("<circle") && svg.ends_with("</svg>\n"));

        let m = serde_json::json!({"loss": 0.69, "rewards_accuracies": 0.5, "rewards_margins": 0.0,
            "logps_chosen": -20.0, "logps_rejected": -21.0});
        let dpo = vec![serde_json::json!({"step": 1, "lr": 1e-4, "train": m, "eval": null})];
        let c = charts(&dpo);
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].series.len(), 1, "no held-out points: no held-out line");
    }
}
