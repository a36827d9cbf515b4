//! `lmkit quantize`: post-training quantization to 2, 3 or 4 bits with RTN, GPTQ or QuIP,
//! calibrated on a text file, written as a GGUF file lmkit runs directly (docs/formats.md).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lmkit::formats::gguf::Value;
use lmkit::models::export::{export_type, save_gguf_with};
use lmkit::quant::calibrate::{self, Event, LayerReport};
use lmkit::quant::{check_bits, gptq::Gptq, quip::Quip, rtn::Rtn, Quantizer};
use lmkit::LoadOptions;
use serde::Serialize;

use crate::common::ModelArgs;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit quantize --method quip --bits 2 --calib ../shared/data/wikitext-2/valid.txt --out smollm2-quip2.gguf\n  lmkit quantize --method gptq --bits 3 --calib notes.jsonl --field text --out gptq3.gguf\n  lmkit quantize --method rtn --bits 4 --group 64 --out rtn4.gguf      # no calibration needed\n\nThe model is dequantized to f32 first. Every linear layer of every block is quantized (q, k,\nv, o, gate, up, down); the embeddings and the tied output layer keep --embed-type (default: the\nsource file's type). Blocks are calibrated in order, each on the outputs of the blocks already\nquantized. The output is written atomically: an interrupted run leaves no file."
)]
pub struct Args {
    /// rtn, gptq or quip.
    #[arg(long, default_value = "quip")]
    pub method: String,
    /// Bits per weight of the codes: 2, 3 or 4.
    #[arg(long, default_value_t = 2)]
    pub bits: u8,
    /// Calibration text: a .txt file, or JSONL with --field (never the evaluation text).
    /// Default: WikiText-2 valid.txt from $LMKIT_DATA or ../shared/data.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Calibration windows (sequences) to use.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub calib_windows: u32,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    pub calib_ctx: u32,
    /// The GGUF file to write.
    #[arg(short, long)]
    pub out: PathBuf,
    /// RTN: weights per scale along a row (a multiple of 32; default the whole row).
    #[arg(long)]
    pub group: Option<usize>,
    /// QuIP: one grid per `tensor` (the paper) or per `row`.
    #[arg(long, default_value = "tensor")]
    pub scale: String,
    /// QuIP: seed of the random Hadamard signs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GPTQ/QuIP: damping, as a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// Type of the embedding table (tied output layer): keep, q8_0, q4_1, q4_0, f16, f32.
    #[arg(long, default_value = "keep")]
    pub embed_type: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Serialize)]
struct Report {
    method: String,
    bits: u8,
    out: String,
    file_bytes: u64,
    /// Whole file, bits per parameter.
    bits_per_weight_file: f64,
    /// Quantized layers only (codes, scales, rotation vectors).
    bits_per_weight_layers: f64,
    parameters: usize,
    calib_tokens: usize,
    mean_rel_error: Option<f64>,
    max_rel_error: Option<f64>,
    seconds: f64,
    layers: Vec<LayerJson>,
}

#[derive(Serialize)]
struct LayerJson {
    name: String,
    rows: usize,
    cols: usize,
    rel_error: Option<f64>,
}

fn quantizer(a: &Args) -> Result<Box<dyn Quantizer>> {
    let bits = check_bits(a.bits)?;
    if !(0.0..=1.0).contains(&a.damp) {
        bail!("--damp {} must be in [0, 1]", a.damp);
    }
    Ok(match a.method.as_str() {
        "rtn" => {
            if let Some(g) = a.group {
                if g == 0 || g % 32 != 0 {
                    bail!("--group {g} must be a positive multiple of 32");
                }
            }
            Box::new(Rtn {
                bits,
                group: a.group,
            })
        }
        "gptq" => Box::new(Gptq { bits, damp: a.damp }),
        "quip" => {
            let per_row = match a.scale.as_str() {
                "tensor" => false,
                "row" => true,
                s => bail!("--scale {s}: expected tensor or row"),
            };
            Box::new(Quip {
                seed: a.seed,
                per_row,
                damp: a.damp,
                ..Quip::new(bits)
            })
        }
        m => bail!("--method {m}: expected rtn, gptq or quip"),
    })
}

/// The default calibration text, if present.
fn default_calib() -> Option<PathBuf> {
    let mut roots: Vec<PathBuf> = std::env::var_os("LMKIT_DATA")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    roots.push(PathBuf::from("../shared/data"));
    roots
        .into_iter()
        .map(|r| r.join("wikitext-2").join("valid.txt"))
        .find(|p| p.is_file())
}

/// The calibration text: a plain file, or the `field` of each JSONL line.
fn read_calib(path: &Path, field: &str) -> Result<String> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read calibration file {}", path.display()))?;
    let jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    if !jsonl {
        return Ok(raw);
    }
    let mut parts = Vec::new();
    for (i, line) in raw
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        let text = v.get(field).and_then(|t| t.as_str()).with_context(|| {
            format!(
                "{}:{}: no string field `{field}` (choose one with --field)",
                path.display(),
                i + 1
            )
        })?;
        parts.push(text.to_string());
    }
    Ok(parts.join("\n\n"))
}

pub fn main(a: Args) -> Result<()> {
    let q = quantizer(&a)?;
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!(
                "cannot write {}: folder {} does not exist",
                a.out.display(),
                parent.display()
            );
        }
    }
    let embed_type = match a.embed_type.as_str() {
        "keep" => None,
        t => Some(export_type(t)?),
    };
    a.model.setup_threads()?;
    let path = a.model.path()?;
    // The source's embedding type, kept by default.
    let src = lmkit::models::open_source(&path)
        .with_context(|| format!("cannot open model {}", path.display()))?;
    let embed_type = match (embed_type, &src) {
        (Some(t), _) => t,
        (None, lmkit::models::WeightSource::Gguf(g)) => g
            .tensor_info("token_embd.weight")
            .and_then(|i| i.dtype.ggml())
            .filter(|t| export_type(lmkit::core::linear::ggml_type_name(*t)).is_ok())
            .unwrap_or(lmkit::core::GgmlDType::Q8_0),
        (None, _) => lmkit::core::GgmlDType::F16,
    };
    drop(src);
    let spinner = crate::common::spinner(&format!("loading {}", path.display()));
    let loaded = lmkit::load(
        &path,
        LoadOptions {
            dequantize: true,
            dtype: None,
        },
    )
    .with_context(|| format!("cannot load model {}", path.display()));
    spinner.finish_and_clear();
    let mut m = loaded?;

    // Calibration windows.
    let mut windows: Vec<Vec<u32>> = Vec::new();
    if q.needs_hessian() {
        let calib = match a.calib.clone().or_else(default_calib) {
            Some(p) => p,
            None => bail!(
                "{} needs calibration text: give --calib FILE (WikiText-2 valid.txt was not found \
                 under $LMKIT_DATA or ../shared/data)",
                q.name()
            ),
        };
        let text = read_calib(&calib, &a.field)?;
        let ids = m.tokenizer.encode_with_bos(&text)?;
        let ctx = a.calib_ctx as usize;
        let max_ctx = m.model.config().max_position_embeddings;
        if ctx > max_ctx {
            bail!("--calib-ctx {ctx} is longer than the model's context ({max_ctx})");
        }
        if ids.len() < ctx {
            bail!(
                "calibration file {} has {} tokens, less than one window of --calib-ctx {ctx}",
                calib.display(),
                ids.len()
            );
        }
        windows = ids
            .chunks_exact(ctx)
            .take(a.calib_windows as usize)
            .map(|w| w.to_vec())
            .collect();
        if windows.len() < a.calib_windows as usize {
            tracing::warn!(
                "{} holds {} windows of {ctx} tokens; calibrating on those",
                calib.display(),
                windows.len()
            );
        }
    } else if a.calib.is_some() {
        tracing::warn!("{} needs no calibration; --calib is ignored", q.name());
    }
    let calib_tokens: usize = windows.iter().map(|w| w.len()).sum();

    let blocks = m.model.num_blocks();
    let per_block = if q.needs_hessian() {
        2 * windows.len() as u64
    } else {
        0
    } + 7;
    let pb = crate::common::bar(
        blocks as u64 * per_block,
        &format!("{} {}-bit", q.name(), q.bits()),
    );
    let t0 = Instant::now();
    let reports = calibrate::quantize_model(&mut m.model, q.as_ref(), &windows, &mut |e| match e {
        Event::Window { .. } | Event::Layer(_) => pb.inc(1),
        Event::Block { block, n } => pb.set_message(format!(
            "{} {}-bit, block {}/{n}",
            q.name(),
            q.bits(),
            block + 1
        )),
    })
    .context("quantization failed")?;
    pb.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();

    let meta = vec![
        (
            "lmkit.quant.method".to_string(),
            Value::String(q.name().to_string()),
        ),
        ("lmkit.quant.bits".into(), Value::U32(u32::from(q.bits()))),
        (
            "lmkit.quant.calib_tokens".into(),
            Value::U64(calib_tokens as u64),
        ),
        ("lmkit.quant.seed".into(), Value::U64(a.seed)),
    ];
    let spinner = crate::common::spinner(&format!("writing {}", a.out.display()));
    let r = save_gguf_with(&a.out, &m.model, &m.tokenizer, &|_| embed_type, meta)
        .with_context(|| format!("cannot write {}", a.out.display()));
    spinner.finish_and_clear();
    r?;

    let file_bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    let params = m.model.num_parameters();
    let summary = calibrate::error_summary(&reports);
    let report = Report {
        method: q.name().into(),
        bits: q.bits(),
        out: a.out.display().to_string(),
        file_bytes,
        bits_per_weight_file: 8.0 * file_bytes as f64 / params.max(1) as f64,
        bits_per_weight_layers: calibrate::layer_bits_per_weight(&reports),
        parameters: params,
        calib_tokens,
        mean_rel_error: summary.map(|s| s.0),
        max_rel_error: summary.map(|s| s.1),
        seconds,
        layers: reports.iter().map(layer_json).collect(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} {}-bit, {:.2} MB ({:.3} bits/weight in the file, {:.3} in the {} quantized layers), {:.0} s",
        report.out,
        report.method,
        report.bits,
        file_bytes as f64 / 1e6,
        report.bits_per_weight_file,
        report.bits_per_weight_layers,
        reports.len(),
        seconds
    );
    if let Some((mean, max)) = summary {
        println!(
            "relative output error ‖(W−Ŵ)X‖²/‖WX‖² on {calib_tokens} calibration tokens: mean {mean:.4}, max {max:.4} ({})",
            reports
                .iter()
                .max_by(|x, y| x.rel_error.partial_cmp(&y.rel_error).unwrap_or(std::cmp::Ordering::Equal))
                .map(|r| r.name.as_str())
                .unwrap_or("")
        );
    }
    Ok(())
}

fn layer_json(r: &LayerReport) -> LayerJson {
    LayerJson {
        name: r.name.clone(),
        rows: r.rows,
        cols: r.cols,
        rel_error: r.rel_error,
    }
}
