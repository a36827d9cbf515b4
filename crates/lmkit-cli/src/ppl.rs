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
    /// Score at most this many windows.
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub model: ModelArgs,
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
