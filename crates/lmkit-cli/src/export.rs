//! `lmkit export`: any model lmkit loads (GGUF, an HF folder, a training run's `final/`) written
//! as a GGUF file that llama.cpp and lmkit load.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lmkit::models::export::{export_type, save_gguf};

use crate::common::ModelArgs;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit export --model runs/tiny/final --out tiny-f16.gguf --type f16\n  lmkit export --out smollm2-q8_0.gguf --type q8_0     # requantize the default model\n\nTypes: f32, f16, bf16, q8_0, q4_0, q4_1 (matrices; norms stay f32). Quantized sources are\ndequantized first, so requantizing adds rounding error."
)]
pub struct Args {
    /// The GGUF file to write (atomically).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Type of the weight matrices.
    #[arg(long = "type", default_value = "f16")]
    pub wtype: String,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn main(a: Args) -> Result<()> {
    let wtype = export_type(&a.wtype)?;
    let m = a.model.load_as_stored()?;
    let spinner = crate::common::spinner(&format!("writing {}", a.out.display()));
    let r = save_gguf(&a.out, &m.model, &m.tokenizer, wtype)
        .with_context(|| format!("cannot export to {}", a.out.display()));
    spinner.finish_and_clear();
    r?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "{} ({:?}, {:.1} MB, {} parameters)",
        a.out.display(),
        wtype,
        bytes as f64 / 1e6,
        m.model.num_parameters()
    );
    Ok(())
}
