//! `lmkit train --config RUN.toml --out DIR`: pretrain a Llama-family model from scratch on text,
//! or fine-tune an existing one (`--model`; full or LoRA, on text or chat data with loss on the
//! assistant's tokens), with checkpoints that survive a kill (`--resume`), a JSONL metrics log,
//! and at the end an HF folder (`DIR/final`), optionally GGUF (`--gguf`) and a PEFT adapter.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lmkit::core::DType;
use lmkit::formats::tokenizer::LoadedTokenizer;
use lmkit::train::data::{Batches, Sequences};
use lmkit::train::dro::DroBatches;
use lmkit::train::loss_scale::{LossScale, LossScaler};
use lmkit::train::mixture::Mixture;
use lmkit::train::tokens::Tokens;
use lmkit::train::{
    checkpoint, export, lora, AdamWConfig, Decay, Schedule, TrainConfig, Trainable, Trainer,
};

use crate::train_data::{load_tokenizer, token_file, Fields};
use lmkit::LlamaConfig;
use serde::Deserialize;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit train --config runs/tiny.toml --out runs/tiny\n  lmkit train --config runs/tiny.toml --out runs/tiny --resume\n  lmkit train --config sft.toml --model default --out runs/sft --gguf q8_0   # fine-tune\n\nConfig (TOML or JSON; paths relative to the config file):\n  [model]  hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,\n           max_position_embeddings = 1024, rope_theta = 10000, rms_norm_eps = 1e-5,\n           tie_word_embeddings = true, init_std = 0.02\n  [data]   train = [\"text, .jsonl or .parquet files (.gz/.zst too) or folders\"], eval = [...] (or eval_fraction = 0.01),\n           seq_len, field = \"text\", prompt_field = \"prompt\", completion_field = \"completion\",\n           tokenizer = \"model.gguf or tokenizer.json\" (default: the\n           default model's)\n  [data.domains]  name = [\"files or folders\"], ... instead of train: a mixture, each batch row\n           from domain d with probability weights[d]; [data.weights] name = w (default uniform),\n           or weights_from = \"DIR/domain_weights.json\" of a --doremi-reference run. Evaluation then\n           uses data.eval only.\n  [train]  steps, batch, accumulate = 1, lr, min_lr = lr/10, warmup = 0,\n           decay = \"cosine\"|\"linear\"|\"constant\", weight_decay = 0.1, beta1 = 0.9, beta2 = 0.95,\n           clip = 1.0 (0: none), eval_every = 0, eval_sequences = 32, checkpoint_every = 0, keep = 3, seed = 0\n  [lora]   r, alpha, dropout = 0, targets = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"] (with --model)\n\nWith --model, leave out [model]. JSONL lines with `messages` ([{role, content}]) are chat:\nrendered with the model's template, loss on the assistant's tokens only."
)]
pub struct Args {
    /// Run configuration, TOML or JSON.
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder: metrics.jsonl, checkpoints/, final/ (an HF folder).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// CPU worker threads (default: all cores).
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Where to train: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision: f32, bf16, f16 or auto (master weights and optimizer state stay f32).
    /// Default and auto: bf16 on a GPU with bf16 tensor cores, else f32 (never f16; f16 trains
    /// with dynamic loss scaling, see --loss-scale).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Loss scaling: auto (dynamic with f16, off otherwise), dynamic (from 65536, halved when a
    /// gradient overflows, doubled after 2000 clean steps), off, or a fixed factor. A step whose
    /// gradients are not all finite is skipped and retried with the next batch.
    #[arg(long, default_value = "auto", value_parser = parse_loss_scale)]
    pub loss_scale: LossScale,
    /// Fine-tune this model (a .gguf file, an HF folder, or `default` for the default model)
    /// instead of building one from the config's [model] section. Its tokenizer and chat
    /// template are used; quantized weights are dequantized to f32.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Also write the final model as GGUF (`DIR/final.gguf`): f32, f16, bf16, q8_0, q4_0, q4_1.
    #[arg(long)]
    pub gguf: Option<String>,
    /// Print the final summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// DoReMi: train this run as the proxy model against this reference model (trained first
    /// on the same `[data.domains]`), learning domain weights by Group DRO. They are written
    /// to OUT/domain_weights.json: the average (what a later run's `data.weights_from` reads)
    /// and every step's weights and excess losses.
    #[arg(long)]
    pub doremi_reference: Option<PathBuf>,
    /// DoReMi's step size η.
    #[arg(long, default_value_t = 1.0, requires = "doremi_reference")]
    pub doremi_eta: f64,
    /// DoReMi's smoothing c toward uniform weights.
    #[arg(long, default_value_t = 1e-3, requires = "doremi_reference")]
    pub doremi_smoothing: f64,
    /// DoReMi: pool the excess losses of this many batches into each weight update.
    #[arg(long, default_value_t = 1, requires = "doremi_reference",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub doremi_update_every: u32,
    /// Domains replacing the config's `[data.domains]` (`lmkit data doremi --domains`), each
    /// `(name, path)`; paths as given (relative to the working folder).
    #[arg(skip)]
    pub domains: Vec<(String, PathBuf)>,
    /// Domain weights replacing the config's `[data.weights]`: the `average` of this
    /// `domain_weights.json` (iterated DoReMi's reference runs).
    #[arg(skip)]
    pub weights_from: Option<PathBuf>,
    /// Sample the domains uniformly whatever weights the config gives (DoReMi's proxy, which
    /// the paper samples uniformly "regardless of the reference domain weights").
    #[arg(skip)]
    pub uniform: bool,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RunConfig {
    model: Option<ModelSection>,
    data: DataSection,
    train: TrainSection,
    /// LoRA adapters on the --model's linear layers (only they train).
    lora: Option<LoraSection>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct LoraSection {
    r: usize,
    alpha: f64,
    #[serde(default)]
    dropout: f64,
    #[serde(default = "d_targets")]
    targets: Vec<String>,
}

fn d_targets() -> Vec<String> {
    ["q_proj", "k_proj", "v_proj", "o_proj"]
        .map(String::from)
        .to_vec()
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    hidden_size: usize,
    intermediate_size: usize,
    num_layers: usize,
    num_heads: usize,
    num_kv_heads: Option<usize>,
    #[serde(default = "d_ctx")]
    max_position_embeddings: usize,
    #[serde(default = "d_theta")]
    rope_theta: f64,
    #[serde(default = "d_eps")]
    rms_norm_eps: f64,
    #[serde(default = "d_true")]
    tie_word_embeddings: bool,
    #[serde(default = "d_std")]
    init_std: f64,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct DataSection {
    #[serde(default)]
    train: Vec<PathBuf>,
    /// Named domains (instead of `train`): each batch row comes from domain `d` with
    /// probability `weights[d]` (uniform when no weights are given).
    #[serde(default)]
    domains: std::collections::BTreeMap<String, Vec<PathBuf>>,
    #[serde(default)]
    weights: std::collections::BTreeMap<String, f64>,
    /// The domain weights of a DoReMi run (its `domain_weights.json`, field `average`).
    weights_from: Option<PathBuf>,
    #[serde(default)]
    eval: Vec<PathBuf>,
    #[serde(default = "d_eval_fraction")]
    eval_fraction: f64,
    seq_len: usize,
    #[serde(default = "d_field")]
    field: String,
    /// JSONL fields of a prompt and its completion (trained as a user turn and the
    /// assistant's reply).
    #[serde(default = "d_prompt_field")]
    prompt_field: String,
    #[serde(default = "d_completion_field")]
    completion_field: String,
    tokenizer: Option<PathBuf>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TrainSection {
    steps: usize,
    batch: usize,
    #[serde(default = "d_one")]
    accumulate: usize,
    lr: f64,
    min_lr: Option<f64>,
    #[serde(default)]
    warmup: usize,
    #[serde(default = "d_decay")]
    decay: Decay,
    #[serde(default = "d_wd")]
    weight_decay: f64,
    #[serde(default = "d_b1")]
    beta1: f64,
    #[serde(default = "d_b2")]
    beta2: f64,
    #[serde(default = "d_clip")]
    clip: Option<f64>,
    #[serde(default)]
    eval_every: usize,
    #[serde(default = "d_eval_seqs")]
    eval_sequences: usize,
    #[serde(default)]
    checkpoint_every: usize,
    #[serde(default = "d_keep")]
    keep: usize,
    #[serde(default)]
    seed: u64,
}

fn d_ctx() -> usize {
    1024
}
fn d_theta() -> f64 {
    10_000.0
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_std() -> f64 {
    0.02
}
fn d_eval_fraction() -> f64 {
    0.01
}
fn d_field() -> String {
    "text".into()
}
fn d_prompt_field() -> String {
    "prompt".into()
}
fn d_completion_field() -> String {
    "completion".into()
}
fn d_one() -> usize {
    1
}
fn d_decay() -> Decay {
    Decay::Cosine
}
fn d_wd() -> f64 {
    0.1
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.95
}
fn d_clip() -> Option<f64> {
    Some(1.0)
}
fn d_eval_seqs() -> usize {
    32
}
fn d_keep() -> usize {
    3
}

/// A run config from JSON (`.json`) or TOML; errors name the field (`train.lr`) as well as
/// the line.
fn parse_config(path: &Path, text: &str) -> Result<RunConfig> {
    fn named<E: std::fmt::Display>(path: &Path, e: serde_path_to_error::Error<E>) -> anyhow::Error {
        match e.path().to_string().as_str() {
            "." => anyhow::anyhow!("{}: bad config: {}", path.display(), e.inner()),
            at => anyhow::anyhow!("{}: bad config: `{at}`: {}", path.display(), e.inner()),
        }
    }
    if path.extension().is_some_and(|e| e == "json") {
        let mut de = serde_json::Deserializer::from_str(text);
        let cfg: RunConfig =
            serde_path_to_error::deserialize(&mut de).map_err(|e| named(path, e))?;
        de.end()
            .with_context(|| format!("{}: bad config", path.display()))?;
        Ok(cfg)
    } else {
        let de = toml::Deserializer::parse(text)
            .with_context(|| format!("{}: bad config", path.display()))?;
        serde_path_to_error::deserialize(de).map_err(|e| named(path, e))
    }
}

fn read_config(
    path: &Path,
    domains: &[(String, PathBuf)],
    weights_from: Option<&Path>,
    uniform: bool,
) -> Result<RunConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut cfg = parse_config(path, &text)?;
    if !domains.is_empty() {
        // Given on the command line: relative to the working folder, not to the config.
        let cwd = std::env::current_dir().context("cannot read the working folder")?;
        cfg.data.train.clear();
        cfg.data.domains.clear();
        for (name, p) in domains {
            cfg.data
                .domains
                .entry(name.clone())
                .or_default()
                .push(cwd.join(p));
        }
    }
    let t = &cfg.train;
    for (name, v) in [
        ("train.steps", t.steps),
        ("train.batch", t.batch),
        ("train.accumulate", t.accumulate),
        ("train.eval_sequences", t.eval_sequences),
        ("data.seq_len", cfg.data.seq_len),
    ] {
        if v == 0 {
            bail!("{}: `{name}` must be at least 1", path.display());
        }
    }
    if !(t.lr > 0.0 && t.lr.is_finite()) {
        bail!("{}: `train.lr` must be a positive number", path.display());
    }
    // The optimizer's settings, in the ranges where AdamW is defined (as PyTorch checks them),
    // min_lr within [0, lr].
    let check = |name: &str, v: f64, ok: bool, range: &str| -> Result<()> {
        if !(v.is_finite() && ok) {
            bail!("{}: `{name}` is {v}; it must be {range}", path.display());
        }
        Ok(())
    };
    check(
        "train.beta1",
        t.beta1,
        (0.0..1.0).contains(&t.beta1),
        "in [0, 1)",
    )?;
    check(
        "train.beta2",
        t.beta2,
        (0.0..1.0).contains(&t.beta2),
        "in [0, 1)",
    )?;
    let wd = t.weight_decay;
    check("train.weight_decay", wd, wd >= 0.0, "a number ≥ 0")?;
    if let Some(m) = t.min_lr {
        let range = format!("in [0, train.lr = {}]", t.lr);
        check("train.min_lr", m, (0.0..=t.lr).contains(&m), &range)?;
    }
    if let Some(c) = t.clip {
        check("train.clip", c, c >= 0.0, "a number ≥ 0 (0: no clipping)")?;
    }
    if let Some(m) = &cfg.model {
        check(
            "model.init_std",
            m.init_std,
            m.init_std > 0.0,
            "a number > 0",
        )?;
    }
    if let Some(m) = &cfg.model {
        if cfg.data.seq_len > m.max_position_embeddings {
            bail!(
                "{}: `data.seq_len` {} exceeds `model.max_position_embeddings` {}",
                path.display(),
                cfg.data.seq_len,
                m.max_position_embeddings
            );
        }
    }
    if uniform {
        cfg.data.weights.clear();
        cfg.data.weights_from = None;
    }
    if let Some(w) = weights_from {
        // Given by the caller: it replaces whatever weights the config names.
        let cwd = std::env::current_dir().context("cannot read the working folder")?;
        cfg.data.weights.clear();
        cfg.data.weights_from = Some(cwd.join(w));
    }
    if let Some(f) = cfg.data.weights_from.clone() {
        if !cfg.data.weights.is_empty() {
            bail!(
                "{}: `data.weights` and `data.weights_from` exclude each other",
                path.display()
            );
        }
        let f = match f.is_absolute() {
            true => f,
            false => path.parent().unwrap_or(Path::new(".")).join(f),
        };
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", f.display()))?;
        let Some(avg) = v.get("average").and_then(|a| a.as_object()) else {
            bail!("{}: no `average` domain weights", f.display());
        };
        for (k, w) in avg {
            let Some(w) = w.as_f64() else {
                bail!("{}: `average.{k}` is not a number", f.display());
            };
            cfg.data.weights.insert(k.clone(), w);
        }
    }
    let d = &cfg.data;
    match (d.train.is_empty(), d.domains.is_empty()) {
        (true, true) => bail!(
            "{}: `data.train` or `data.domains` is required",
            path.display()
        ),
        (false, false) => bail!(
            "{}: `data.train` and `data.domains` exclude each other",
            path.display()
        ),
        _ => {}
    }
    if let Some(n) = d.domains.keys().find(|n| {
        n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    }) {
        bail!(
            "{}: domain name `{n}`: use letters, digits, `-` and `_`",
            path.display()
        );
    }
    if let Some(n) = d.weights.keys().find(|n| !d.domains.contains_key(*n)) {
        bail!("{}: `data.weights.{n}` names no domain", path.display());
    }
    if !d.weights.is_empty() {
        if let Some(n) = d.domains.keys().find(|n| !d.weights.contains_key(*n)) {
            bail!(
                "{}: domain `{n}` has no weight in `data.weights`",
                path.display()
            );
        }
    }
    if let Some((n, w)) = d.weights.iter().find(|(_, w)| !w.is_finite() || **w < 0.0) {
        bail!("{}: `data.weights.{n}` = {w}: must be ≥ 0", path.display());
    }
    if !(0.0..1.0).contains(&cfg.data.eval_fraction) {
        bail!("{}: `data.eval_fraction` must be in [0, 1)", path.display());
    }
    Ok(cfg)
}

/// The architecture of a model trained from scratch, from the [model] section.
fn scratch_config(m: &ModelSection, tok: &LoadedTokenizer, path: &Path) -> Result<LlamaConfig> {
    let head_dim = m.hidden_size / m.num_heads.max(1);
    let cfg = LlamaConfig {
        arch: "llama".into(),
        vocab_size: tok.tokenizer.get_vocab_size(true),
        hidden_size: m.hidden_size,
        intermediate_size: m.intermediate_size,
        num_layers: m.num_layers,
        num_heads: m.num_heads,
        num_kv_heads: m.num_kv_heads.unwrap_or(m.num_heads),
        head_dim,
        rms_norm_eps: m.rms_norm_eps,
        rope_theta: m.rope_theta,
        rope_scaling: None,
        max_position_embeddings: m.max_position_embeddings,
        tie_word_embeddings: m.tie_word_embeddings,
        attention_bias: false,
    };
    cfg.validate(path)?;
    Ok(cfg)
}

pub fn main(a: Args) -> Result<()> {
    let summary = run(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "step {}: train loss {}, eval loss {} → {}",
            summary["steps"],
            summary["train_loss"]
                .as_f64()
                .map_or("-".into(), |l| format!("{l:.4}")),
            summary["eval_loss"]
                .as_f64()
                .map_or("-".into(), |e| format!("{e:.4} (ppl {:.2})", e.exp())),
            summary["model"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// Trains as `a` says; the summary (steps, losses, where the model went) for the caller to print.
pub fn run(a: &Args) -> Result<serde_json::Value> {
    let threads = a
        .threads
        .map(|t| t as usize)
        .unwrap_or_else(lmkit::core::threads::default_threads);
    lmkit::set_threads(threads)?;
    let device = lmkit::core::device::parse_device(&a.device)?;
    let dtype = match &a.dtype {
        Some(d) => lmkit::core::device::train_dtype_for(d, &device)?,
        None => lmkit::core::device::auto_train_dtype(&device),
    };
    let scaled = LossScaler::new(a.loss_scale, dtype == DType::F16).active();
    if let Some(w) = lmkit::core::device::train_dtype_warning(dtype, scaled) {
        tracing::warn!("{w}");
    }
    let rc = read_config(&a.config, &a.domains, a.weights_from.as_deref(), a.uniform)?;
    let base = a.config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let rel = |p: &PathBuf| {
        if p.is_absolute() {
            p.clone()
        } else {
            base.join(p)
        }
    };

    if rc.model.is_some() == a.model.is_some() {
        bail!(
            "{}: give either a [model] section (train from scratch) or --model (fine-tune)",
            a.config.display()
        );
    }
    if rc.lora.is_some() && a.model.is_none() {
        bail!(
            "{}: [lora] needs --model (adapters go on an existing model)",
            a.config.display()
        );
    }
    let gguf_type = match &a.gguf {
        Some(t) => Some(lmkit::models::export::export_type(t)?),
        None => None,
    };

    // The model to fine-tune, if any: loaded dequantized, on the device.
    let base = match &a.model {
        Some(p) => {
            let path = if p.as_os_str() == "default" {
                crate::common::fetch_default(false)?
            } else {
                p.clone()
            };
            // LoRA keeps the frozen base in the compute dtype; full fine-tuning needs f32
            // master weights (cast per product).
            let base_dtype = rc.lora.as_ref().map(|_| dtype);
            let opts = lmkit::LoadOptions {
                dequantize: true,
                dtype: base_dtype,
            };
            let m = lmkit::load_on(&path, opts, &device)
                .with_context(|| format!("cannot load model {}", path.display()))?;
            if rc.data.tokenizer.is_some() {
                bail!("`data.tokenizer` is set, but --model brings its own tokenizer");
            }
            if rc.data.seq_len > m.model.config().max_position_embeddings {
                bail!(
                    "`data.seq_len` {} exceeds the model's context {}",
                    rc.data.seq_len,
                    m.model.config().max_position_embeddings
                );
            }
            Some((path, m))
        }
        None => None,
    };

    // Data: tokenize, hold out the evaluation part.
    let tok = match &base {
        Some((_, m)) => m.tokenizer.clone(),
        None => load_tokenizer(rc.data.tokenizer.as_ref().map(rel).as_deref())?,
    };
    let train_paths: Vec<PathBuf> = rc.data.train.iter().map(rel).collect();
    let fields = Fields {
        text: &rc.data.field,
        pair: (&rc.data.prompt_field, &rc.data.completion_field),
    };
    // Tokenized as a stream into token files under DIR/data (memory-mapped; reused when the
    // sources and the tokenizer are unchanged).
    let data_dir = a.out.join("data");
    // Domains: a token file each, mixed by weight; evaluation only on `data.eval`.
    let mut mixture = None;
    if !rc.data.domains.is_empty() {
        let mut parts = Vec::new();
        for (i, (name, paths)) in rc.data.domains.iter().enumerate() {
            let paths: Vec<PathBuf> = paths.iter().map(rel).collect();
            let toks = token_file(
                &tok,
                &paths,
                &fields,
                &data_dir.join(format!("domain-{name}.tokens")),
            )?;
            let seqs =
                Sequences::from_tokens(toks, rc.data.seq_len, rc.train.seed.wrapping_add(i as u64))
                    .with_context(|| format!("domain `{name}`"))?;
            let w = rc.data.weights.get(name).copied().unwrap_or(1.0);
            parts.push((name.clone(), seqs, w));
        }
        let m = Mixture::new(parts, rc.train.seed)?;
        eprintln!(
            "domains: {}",
            m.names()
                .iter()
                .zip(m.weights())
                .map(|(n, w)| format!("{n} {w:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        mixture = Some(m);
    }
    let eval_tokens = if !rc.data.eval.is_empty() {
        let paths: Vec<PathBuf> = rc.data.eval.iter().map(rel).collect();
        Some(token_file(
            &tok,
            &paths,
            &fields,
            &data_dir.join("eval.tokens"),
        )?)
    } else {
        None
    };
    let t = &rc.train;
    let (source, eval_tokens): (Result<Mixture, Sequences>, Option<Tokens>) = match mixture {
        Some(m) => (Ok(m), eval_tokens),
        None => {
            let all = token_file(&tok, &train_paths, &fields, &data_dir.join("train.tokens"))?;
            let (train_tokens, eval_tokens) = match eval_tokens {
                Some(e) => (all, Some(e)),
                None => {
                    let n = (all.len() as f64 * rc.data.eval_fraction) as usize;
                    let (a, b) = all.split_at(all.len() - n);
                    (a, Some(b))
                }
            };
            if train_tokens.is_empty() {
                bail!(
                    "the training data is empty: {}",
                    train_paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let seqs = Sequences::from_tokens(train_tokens, rc.data.seq_len, t.seed)?;
            (Err(seqs), eval_tokens)
        }
    };
    // No evaluation split (`eval_fraction = 0`): none asked for. One too short for a
    // sequence: said, and the run goes on without it.
    let eval = eval_tokens.filter(|e| !e.is_empty()).and_then(|e| {
        let n = e.len();
        match Sequences::from_tokens(e, rc.data.seq_len, 0) {
            Ok(s) => Some(s),
            Err(_) => {
                tracing::warn!(
                    "no evaluation: the evaluation split has {n} tokens, fewer than one \
                         sequence of {} (+1)",
                    rc.data.seq_len
                );
                None
            }
        }
    });

    // Model and trainer: from scratch, full fine-tuning, or LoRA adapters.
    let mut lora_cfg = None;
    let base_path = base.as_ref().map(|(p, _)| p.clone());
    let model = match (&rc.model, base) {
        (Some(m), _) => {
            let cfg = scratch_config(m, &tok, &a.config)?;
            check_memory(&cfg, t.batch, rc.data.seq_len, &device, &a.config)?;
            let mut model = Trainable::init(cfg, m.init_std, t.seed)?;
            if !device.is_cpu() || dtype != DType::F32 {
                model = model.to_device(&device, dtype)?;
            }
            model
        }
        (None, Some((_, m))) => match &rc.lora {
            None => {
                let cfg = m.model.config();
                check_memory(cfg, t.batch, rc.data.seq_len, &device, &a.config)?;
                let mut model = Trainable::from_model(&m.model)?;
                model.model.set_dtype(dtype)?;
                model
            }
            Some(l) => {
                let cfg = lora::LoraConfig {
                    r: l.r,
                    alpha: l.alpha,
                    dropout: l.dropout,
                    targets: l.targets.clone(),
                };
                let mut model = m.model.clone();
                let params = lora::attach(&mut model, &cfg, t.seed)?;
                lora_cfg = Some(cfg);
                Trainable { model, params }
            }
        },
        (None, None) => bail!("no model"),
    };
    let tc = TrainConfig {
        steps: t.steps,
        batch: t.batch,
        accumulate: t.accumulate,
        schedule: Schedule {
            peak: t.lr,
            min: t.min_lr.unwrap_or(t.lr / 10.0),
            warmup: t.warmup,
            total: t.steps,
            decay: t.decay,
        },
        adamw: AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: 1e-8,
            weight_decay: t.weight_decay,
        },
        clip: t.clip.filter(|c| *c > 0.0),
        eval_every: t.eval_every,
        eval_sequences: t.eval_sequences,
        loss_scale: a.loss_scale,
    };
    let params = model.num_parameters();
    // DoReMi: the proxy is this run's model; batches carry Group-DRO token weights.
    let mut data: Box<dyn Batches> = if let Some(r) = &a.doremi_reference {
        if a.resume {
            bail!("--doremi-reference cannot --resume: the domain weights start over");
        }
        if !rc.data.weights.is_empty() {
            bail!("--doremi-reference learns the domain weights: leave out `data.weights`");
        }
        let reference = lmkit::load_on(r, lmkit::LoadOptions::default(), &device)
            .with_context(|| format!("cannot load the reference model {}", r.display()))?;
        let Ok(mix) = source else {
            bail!("--doremi-reference needs `[data.domains]` in the config");
        };
        let dro = DroBatches::new(
            mix,
            model.model.clone(),
            reference.model,
            a.doremi_eta,
            a.doremi_smoothing,
        )?
        .update_every(a.doremi_update_every as usize)?;
        Box::new(dro)
    } else {
        match source {
            Ok(m) => Box::new(m),
            Err(s) => Box::new(s),
        }
    };
    let mut tr = Trainer::new(model, tc)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let ckpts = a.out.join("checkpoints");
    if a.resume {
        match checkpoint::latest(&ckpts) {
            Some(c) => {
                checkpoint::load(&c, &mut tr, data.as_mut())?;
                eprintln!("resumed from {} (step {})", c.display(), tr.step());
            }
            None => eprintln!("no checkpoint in {}: starting fresh", ckpts.display()),
        }
    }
    eprintln!(
        "{params} parameters, {} training sequences of {} tokens, {} ({dtype:?}), {threads} threads",
        data.sequences(),
        rc.data.seq_len,
        lmkit::core::device::device_name(&device),
    );

    // The loop: progress bar, metrics log, checkpoints.
    let metrics_path = a.out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("cannot open {}", metrics_path.display()))?;
    let pb = ProgressBar::new(t.steps as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(tr.step() as u64);
    // The starting point, to compare the end with (fine-tuning especially).
    let eval_before = match (&eval, tr.step(), t.eval_every) {
        (Some(e), 0, n) if n > 0 => {
            let l = lmkit::train::trainer::evaluate(&tr.t.model, e, t.eval_sequences, t.batch)?;
            eprintln!("eval loss before training: {l:.4} (ppl {:.2})", l.exp());
            Some(l)
        }
        _ => None,
    };
    let mut last_eval = None;
    let mut failure = None;
    let logs = tr.run(
        data.as_mut(),
        eval.as_ref(),
        usize::MAX,
        &mut |tr, data, log| {
            if let Some(e) = log.eval_loss {
                last_eval = Some(e);
            }
            pb.set_position(log.step as u64);
            pb.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s{}",
                log.loss,
                log.lr,
                log.tokens_per_sec,
                last_eval.map_or(String::new(), |e| format!("  eval {e:.4}"))
            ));
            let line = serde_json::to_string(log).unwrap_or_default();
            if let Err(e) = writeln!(metrics, "{line}") {
                failure = Some(anyhow::anyhow!("{}: {e}", metrics_path.display()));
                return false;
            }
            if t.checkpoint_every > 0
                && (log.step.is_multiple_of(t.checkpoint_every) || log.step == t.steps)
            {
                if let Err(e) = checkpoint::save(&ckpts, tr, data, t.keep) {
                    failure = Some(e.into());
                    return false;
                }
            }
            true
        },
    )?;
    pb.finish_and_clear();
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(report) = data.report() {
        let path = a.out.join("domain_weights.json");
        let text = serde_json::to_string_pretty(&report)?;
        lmkit::formats::write::atomic_write(&path, |w| w.write_all(text.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "DoReMi domain weights (average over {} updates): {} → {}",
            report["updates"],
            report["average"],
            path.display()
        );
    }

    // The trained model as an HF folder (LoRA: the PEFT adapter, and the merged model), and
    // as GGUF if asked; never weights that are not finite.
    let final_dir = a.out.join("final");
    if let Some(name) = tr.t.first_non_finite()? {
        bail!(
            "training diverged: `{name}` holds NaN or infinite values after {} steps; nothing \
             was written to {} (lower train.lr; the checkpoints under {} hold earlier weights)",
            tr.step(),
            final_dir.display(),
            a.out.join("checkpoints").display()
        );
    }
    let final_model = match &lora_cfg {
        None => tr.t.model.clone(),
        Some(cfg) => {
            let base_name = base_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            lora::save_peft(&a.out.join("adapter"), cfg, &base_name, &tr.t.params)?;
            let mut merged = tr.t.model.clone();
            lora::merge(&mut merged)?;
            merged
        }
    };
    export::save_hf_model(&final_dir, &final_model, &tok)?;
    if let Some(ty) = gguf_type {
        let path = a.out.join("final.gguf");
        lmkit::models::export::save_gguf(&path, &final_model, &tok, ty)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let last = logs.last();
    Ok(serde_json::json!({
        "steps": tr.step(),
        "parameters": params,
        "train_loss": last.map(|l| l.loss),
        "eval_loss_before": eval_before,
        "eval_loss": last_eval,
        "eval_ppl": last_eval.map(f64::exp),
        "model": final_dir.display().to_string(),
        "metrics": metrics_path.display().to_string(),
    }))
}

/// `--loss-scale`: auto, off, dynamic or a factor > 0.
pub(crate) fn parse_loss_scale(s: &str) -> std::result::Result<LossScale, String> {
    s.parse::<LossScale>().map_err(|e| e.to_string())
}

/// Refuses, on the CPU, a run that cannot fit in the memory left: a lower bound of its needs
/// (the f32 weights, their gradients and AdamW's two moments: 16 bytes per parameter; one f32
/// value per token of a batch, layer and hidden unit) against `MemAvailable`, so that sizes
/// far too large are a clear error instead of an abort when an allocation fails.
fn check_memory(
    cfg: &LlamaConfig,
    batch: usize,
    seq_len: usize,
    device: &lmkit::Device,
    config: &Path,
) -> Result<()> {
    if !device.is_cpu() {
        return Ok(());
    }
    let Some(free) = lmkit::core::device::host_memory_available() else {
        return Ok(());
    };
    let tokens = batch as f64 * seq_len as f64;
    let acts = tokens * cfg.hidden_size as f64 * cfg.num_layers as f64 * 4.0;
    let need = cfg.num_parameters() * 16.0 + acts;
    if need > free as f64 {
        bail!(
            "{}: the run needs at least {:.1} GB ({:.3e} parameters with their gradients and \
             AdamW's moments in f32, and activations for batch {batch} × seq_len {seq_len}), \
             but {:.1} GB of memory are available",
            config.display(),
            need / 1e9,
            cfg.num_parameters(),
            free as f64 / 1e9
        );
    }
    Ok(())
}
