//! `lmkit tokenizer train`: a new byte-level BPE tokenizer from text, for pretraining from
//! scratch (`[data] tokenizer = "DIR"` in a `lmkit train` config); `lmkit tokenizers parity`
//! (see `parity.rs`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lmkit::formats::tokenizer_train::{save_folder, train_bpe};

use crate::train_data::{files, for_each_document, Doc, Fields};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Train a BPE tokenizer (SmolLM2's pre-tokenizer; <|endoftext|>, <|im_start|>, <|im_end|>).
    #[command(
        after_help = "Examples:\n  lmkit tokenizer train corpus/ --vocab-size 8192 --out tok8k\n  lmkit train --config run.toml --out runs/x      # with [data] tokenizer = \"tok8k\""
    )]
    Train(TrainArgs),
    /// Tokenization premium across languages on parallel text (Petrov et al., "Language Model
    /// Tokenizers Introduce Unfairness Between Languages").
    Parity(crate::parity::Args),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Text files, JSONL files (--field) or folders of them.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Tokens in the vocabulary (bytes and special tokens included).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(260..=1_000_000))]
    pub vocab_size: u32,
    /// Merge only pairs seen at least this often.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// The JSONL text field.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Output folder: tokenizer.json and tokenizer_config.json.
    #[arg(short, long)]
    pub out: PathBuf,
}

pub fn main(c: Command) -> Result<()> {
    match c {
        Command::Train(a) => train(a),
        Command::Parity(a) => crate::parity::main(a),
    }
}

fn train(a: TrainArgs) -> Result<()> {
    let fields = Fields {
        text: &a.field,
        pair: ("prompt", "completion"),
    };
    let mut texts: Vec<String> = Vec::new();
    for_each_document(&files(&a.inputs)?, &fields, &mut |d| {
        match d {
            Doc::Text { text, .. } => texts.push(text),
            Doc::Chat(m) => texts.extend(m.into_iter().map(|m| m.content)),
        }
        Ok(())
    })?;
    texts.retain(|t| !t.trim().is_empty());
    if texts.is_empty() {
        bail!("no text in the inputs");
    }
    let bytes: usize = texts.iter().map(String::len).sum();
    let spinner = crate::common::spinner(&format!(
        "training a {}-token BPE on {:.1} MB",
        a.vocab_size,
        bytes as f64 / 1e6
    ));
    let tok = train_bpe(texts.iter(), a.vocab_size as usize, a.min_frequency);
    spinner.finish_and_clear();
    let tok = tok?;
    save_folder(&tok, &a.out).with_context(|| format!("cannot write {}", a.out.display()))?;
    // Compression on the training text: bytes per token.
    let sample: String = texts
        .iter()
        .take(200)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    let n = tok.encode(&sample)?.len().max(1);
    println!(
        "{}: {} tokens, {:.2} bytes/token on the first documents",
        a.out.display(),
        tok.tokenizer.get_vocab_size(true),
        sample.len() as f64 / n as f64
    );
    Ok(())
}
