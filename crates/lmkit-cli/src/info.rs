//! `lmkit info`: what a model is and what it holds.

use anyhow::{bail, Result};
use lmkit::models::check::{non_finite_weights, BadTensor};

use crate::common::ModelArgs;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit info\n  lmkit info --model model.gguf --json\n  lmkit info --model ./hf-folder\n  lmkit info --model model.gguf --check"
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// List every weight with its type and shape.
    #[arg(long)]
    pub tensors: bool,
    /// Read every weight (dequantized) and fail if any holds NaN or infinite values, naming
    /// them (as llama.cpp's --check-tensors).
    #[arg(long)]
    pub check: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The scan of `--check`, with a progress bar on stderr.
fn check(m: &lmkit::LoadedModel) -> Result<Vec<BadTensor>> {
    let pb = crate::common::bar(0, "checking weights");
    let bad = non_finite_weights(&m.model, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    Ok(bad)
}

/// The error `--check` ends with when some weight is not finite.
fn fail(path: &std::path::Path, bad: &[BadTensor]) -> Result<()> {
    if bad.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = bad
        .iter()
        .map(|b| format!("`{}` ({} of {} values)", b.name, b.non_finite, b.values))
        .collect();
    bail!(
        "{}: {} weight{} hold NaN or infinite values: {}",
        path.display(),
        bad.len(),
        if bad.len() == 1 { "" } else { "s" },
        list.join(", ")
    )
}

pub fn main(a: Args) -> Result<()> {
    let m = a.model.load_as_stored()?;
    let cfg = m.model.config();
    let weights = m.model.named_weights();
    let mem: usize = weights.iter().map(|(_, w)| w.size_in_bytes()).sum();
    let params = m.model.num_parameters();
    let bad = if a.check { Some(check(&m)?) } else { None };
    if a.json {
        let tensors: Vec<_> = weights
            .iter()
            .map(|(n, w)| {
                serde_json::json!({"name": n, "type": w.type_name(), "shape": w.dims2().ok(), "bytes": w.size_in_bytes()})
            })
            .collect();
        let v = serde_json::json!({
            "path": m.path.display().to_string(),
            "name": m.file.name,
            "format": m.file.format,
            "file_bytes": m.file.file_bytes,
            "architecture": cfg.arch,
            "parameters": params,
            "config": cfg,
            "context_length": cfg.max_position_embeddings,
            "tensor_types": m.file.tensor_types.iter().map(|(t, n, b)| serde_json::json!({"type": t, "tensors": n, "bytes": b})).collect::<Vec<_>>(),
            "weight_bytes_in_memory": mem,
            "vocab_size": m.tokenizer.vocab_size(),
            "bos": m.tokenizer.special.bos,
            "eos": m.tokenizer.special.eos,
            "add_bos": m.tokenizer.special.add_bos,
            "chat_template": m.tokenizer.chat_template.is_some(),
            "tensors": if a.tensors { serde_json::json!(tensors) } else { serde_json::Value::Null },
            "non_finite_weights": bad,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return fail(&m.path, bad.as_deref().unwrap_or_default());
    }
    println!("path:          {}", m.path.display());
    if let Some(n) = &m.file.name {
        println!("name:          {n}");
    }
    println!(
        "format:        {} ({:.1} MB)",
        m.file.format,
        m.file.file_bytes as f64 / 1e6
    );
    println!("architecture:  {}", cfg.arch);
    println!("parameters:    {} ({:.1} M)", params, params as f64 / 1e6);
    println!(
        "layers:        {}  hidden {}  ffn {}  heads {} (kv {})  head dim {}",
        cfg.num_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim
    );
    println!("vocab:         {}", cfg.vocab_size);
    println!("context:       {}", cfg.max_position_embeddings);
    println!(
        "rope theta:    {}{}",
        cfg.rope_theta,
        cfg.rope_scaling
            .as_ref()
            .map(|s| format!(" scaling {s:?}"))
            .unwrap_or_default()
    );
    println!("rms norm eps:  {:e}", cfg.rms_norm_eps);
    println!("tied embed:    {}", cfg.tie_word_embeddings);
    for (t, n, b) in &m.file.tensor_types {
        println!("tensors {t:<6} {n:>4} tensors  {:>8.2} MB", *b as f64 / 1e6);
    }
    println!("weights in memory: {:.2} MB", mem as f64 / 1e6);
    println!(
        "tokenizer:     {} tokens, bos {:?}, eos {:?}, add bos {}, chat template {}",
        m.tokenizer.vocab_size(),
        m.tokenizer.special.bos,
        m.tokenizer.special.eos,
        m.tokenizer.special.add_bos,
        if m.tokenizer.chat_template.is_some() {
            "yes"
        } else {
            "ChatML (default)"
        }
    );
    if a.tensors {
        for (n, w) in &weights {
            println!("  {n:<48} {:<5} {:?}", w.type_name(), w.dims2().ok());
        }
    }
    if let Some(bad) = &bad {
        if bad.is_empty() {
            println!("check:         every weight is finite");
        }
        fail(&m.path, bad)?;
    }
    Ok(())
}
