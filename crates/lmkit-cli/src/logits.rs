//! `lmkit logits`: the model's logits at every position of a text, saved as safetensors, and
//! compared with another run's (CPU vs GPU, f32 vs bf16, lmkit vs a reference dump).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lmkit::core::candle::safetensors;
use lmkit::{Device, Tensor};
use serde::Serialize;

use crate::common::ModelArgs;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit logits --file wiki.txt --dequantize --out cpu.safetensors\n  lmkit logits --file wiki.txt --dequantize --device cuda --out gpu.safetensors \\\n      --compare cpu.safetensors --max-diff 1e-3\n\nThe file holds `logits` (positions, vocab) f32 and `ids` (positions) u32."
)]
pub struct Args {
    /// The text (or use --file).
    pub text: Option<String>,
    /// Read the text from this file.
    #[arg(short, long)]
    pub file: Option<PathBuf>,
    /// Keep the first N tokens.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,
    /// Write the logits here (safetensors).
    #[arg(short, long)]
    pub out: Option<PathBuf>,
    /// Compare with logits saved by another run (same text and tokenizer).
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// With --compare: fail if the largest absolute difference exceeds this (a number ≥ 0).
    #[arg(long, value_parser = non_negative)]
    pub max_diff: Option<f64>,
    /// With --compare: fail if fewer positions than this fraction have the same argmax (in
    /// [0, 1]).
    #[arg(long, value_parser = fraction)]
    pub min_agree: Option<f64>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Comparison {
    positions: usize,
    max_abs_diff: f64,
    mean_abs_diff: f64,
    /// Max |Δ| over the largest |logit| of the reference.
    max_rel_diff: f64,
    argmax_agreement: f64,
}

fn non_negative(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{s}`: expected a number ≥ 0")),
    }
}

fn fraction(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}`: expected a fraction in [0, 1]")),
    }
}

pub fn main(a: Args) -> Result<()> {
    let text = match (&a.text, &a.file) {
        (Some(t), None) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        _ => bail!("give the text or --file (one of them)"),
    };
    if a.out.is_none() && a.compare.is_none() {
        bail!("nothing to do: give --out and/or --compare");
    }
    let m = a.model.load()?;
    let mut ids = m.tokenizer.encode(&text)?;
    ids.truncate(a.max_tokens as usize);
    if ids.is_empty() {
        bail!("the text has no tokens");
    }
    let n = ids.len();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = m
        .model
        .forward(&x, &mut m.model.new_cache())?
        .squeeze(0)?
        .to_device(&Device::Cpu)?; // (n, v)
    let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu)?;
    if let Some(out) = &a.out {
        let tensors = HashMap::from([
            ("logits".to_string(), logits.clone()),
            ("ids".into(), ids_t),
        ]);
        let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
        safetensors::save(&tensors, &tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    }
    let Some(reference) = &a.compare else {
        if !a.json {
            eprintln!("{n} positions written");
        }
        return Ok(());
    };
    let r = safetensors::load(reference, &Device::Cpu)
        .with_context(|| format!("cannot read logits from {}", reference.display()))?;
    let (Some(r_logits), Some(r_ids)) = (r.get("logits"), r.get("ids")) else {
        bail!(
            "{}: expected tensors `logits` and `ids`",
            reference.display()
        );
    };
    if r_ids.to_vec1::<u32>()? != ids {
        bail!(
            "{}: its token ids differ from this run's (another text or tokenizer?)",
            reference.display()
        );
    }
    if r_logits.dims() != logits.dims() {
        bail!(
            "{}: logits {:?}, this run {:?}",
            reference.display(),
            r_logits.dims(),
            logits.dims()
        );
    }
    let c = compare(&logits.to_vec2::<f32>()?, &r_logits.to_vec2::<f32>()?);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        println!(
            "{} positions: max |Δ| {:.3e} (relative {:.3e}), mean |Δ| {:.3e}, same argmax {:.2}%",
            c.positions,
            c.max_abs_diff,
            c.max_rel_diff,
            c.mean_abs_diff,
            100.0 * c.argmax_agreement
        );
    }
    if let Some(t) = a.max_diff {
        if c.max_abs_diff.is_nan() || c.max_abs_diff > t {
            bail!("max |Δ| {:.3e} exceeds --max-diff {t:e}", c.max_abs_diff);
        }
    }
    if let Some(t) = a.min_agree {
        if c.argmax_agreement < t {
            bail!(
                "argmax agreement {:.4} is below --min-agree {t}",
                c.argmax_agreement
            );
        }
    }
    Ok(())
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> Comparison {
    let (mut max, mut sum, mut count, mut peak, mut same) = (0f64, 0f64, 0usize, 0f64, 0usize);
    for (ra, rb) in a.iter().zip(b) {
        for (&x, &y) in ra.iter().zip(rb) {
            let d = (x as f64 - y as f64).abs();
            // NaN anywhere must show: f64::max would drop it.
            if d.is_nan() || d > max {
                max = d;
            }
            sum += d;
            count += 1;
            peak = peak.max((y as f64).abs());
        }
        same += usize::from(argmax(ra) == argmax(rb));
    }
    Comparison {
        positions: a.len(),
        max_abs_diff: max,
        mean_abs_diff: sum / count.max(1) as f64,
        max_rel_diff: max / peak.max(f64::MIN_POSITIVE),
        argmax_agreement: same as f64 / a.len().max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_counts_differences_and_argmax() {
        let a = vec![vec![1.0, 3.0, 2.0], vec![0.0, 0.0, 5.0]];
        let b = vec![vec![1.0, 2.5, 2.9], vec![0.0, 0.0, 5.0]];
        let c = compare(&a, &b);
        assert!((c.max_abs_diff - 0.9).abs() < 1e-6);
        assert_eq!(c.argmax_agreement, 0.5);
        let nan = compare(&[vec![f32::NAN]], &[vec![1.0]]);
        assert!(nan.max_abs_diff.is_nan());
    }
}
