//! `lmkit dpo`: Direct Preference Optimization with LoRA adapters on preference pairs
//! (`{"prompt","chosen","rejected"}` JSONL or HH-RLHF dialogues, optionally gzip), writing a
//! PEFT adapter, a JSONL metrics log and a summary.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lmkit::train::dpo::{self, DpoConfig, PrefData};
use lmkit::train::lora::{self, LoraConfig};
use lmkit::train::loss_scale::{LossScale, LossScaler};
use lmkit::train::prefs;
use lmkit::train::{AdamWConfig, Decay, Schedule, Trainable};

use crate::common::ModelArgs;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit dpo --data pairs.jsonl --lora --steps 200 --out runs/dpo\n  lmkit dpo --data pairs.jsonl --steps 200 --out runs/dpo-full      # full fine-tuning\n  lmkit dpo --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz --lora --limit 512 --eval-pairs 64 --out runs/hh\n\nThe model is loaded dequantized (f32); with --lora the adapters' gradients flow through the\nfrozen base layers. The reference log-probs are computed once, before training, on the same base model."
)]
pub struct Args {
    /// Preference pairs: .jsonl or .jsonl.gz.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out pairs to evaluate on (default: the last --eval-pairs of --data).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Pairs held out from --data when --eval is not given.
    #[arg(long, default_value_t = 64)]
    pub eval_pairs: usize,
    /// Use at most this many pairs of --data.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output folder: metrics.jsonl, adapter/ (PEFT layout).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Pairs per step.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Tokens per sequence (prompt cut from the left).
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Train LoRA adapters (saved in PEFT's layout under OUT/adapter); without it, every
    /// weight trains (full fine-tuning; the model is saved as an HF folder under OUT/final).
    #[arg(long)]
    pub lora: bool,
    #[arg(long, default_value_t = 8, requires = "lora")]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0, requires = "lora")]
    pub lora_alpha: f64,
    /// Dropout on the adapters' inputs while training (PEFT's lora_dropout), in [0, 1).
    #[arg(long, default_value_t = 0.0, requires = "lora")]
    pub lora_dropout: f64,
    /// Comma-separated module names that get adapters.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj", requires = "lora")]
    pub targets: String,
    /// Evaluate every this many steps (and at the end).
    #[arg(long, default_value_t = 20)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Loss scaling: auto (dynamic when the model computes in f16, off otherwise), dynamic,
    /// off, or a fixed factor; a step with a gradient that is not finite is skipped.
    #[arg(long, default_value = "auto", value_parser = crate::train::parse_loss_scale)]
    pub loss_scale: LossScale,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn main(a: Args) -> Result<()> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(a.beta) || !positive(a.lr) {
        bail!("--beta and --lr must be positive");
    }
    if a.max_len < 4 {
        bail!("--max-len must be at least 4");
    }
    let mut margs = a.model.clone();
    margs.dequantize = true;
    let m = margs.load_as_stored()?;
    let f16 = m.model.dtype() == lmkit::core::DType::F16;
    let scaled = LossScaler::new(a.loss_scale, f16).active();
    if let Some(w) = lmkit::core::device::train_dtype_warning(m.model.dtype(), scaled) {
        tracing::warn!("{w}");
    }
    let mut pairs = prefs::read_pairs(&a.data)?;
    if let Some(n) = a.limit {
        pairs.truncate(n);
    }
    let eval_pairs = match &a.eval {
        Some(p) => prefs::read_pairs(p)?,
        None => {
            if pairs.len() <= a.eval_pairs {
                bail!(
                    "{} pairs leave none to train on after holding out --eval-pairs {}",
                    pairs.len(),
                    a.eval_pairs
                );
            }
            pairs.split_off(pairs.len() - a.eval_pairs)
        }
    };
    let pad = m.tokenizer.special.eos.unwrap_or(0);
    let tok = |ps: &[prefs::Pair]| -> Result<Vec<prefs::TokenPair>> {
        ps.iter()
            .map(|p| Ok(prefs::tokenize(&m.tokenizer, p, a.max_len)?))
            .collect()
    };
    let spinner = crate::common::spinner("reference log-probs");
    let train = PrefData::new(&m.model, tok(&pairs)?, pad)?;
    let eval = if eval_pairs.is_empty() {
        None
    } else {
        Some(PrefData::new(&m.model, tok(&eval_pairs)?, pad)?)
    };
    spinner.finish_and_clear();

    let mut policy = m.model.clone();
    let lcfg = a.lora.then(|| LoraConfig {
        r: a.lora_r,
        alpha: a.lora_alpha,
        dropout: a.lora_dropout,
        targets: a
            .targets
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    });
    let vars = match &lcfg {
        Some(c) => lora::attach(&mut policy, c, a.seed)?,
        None => {
            // f32 master weights, products in the loaded model's dtype (mixed precision).
            let mut t = Trainable::from_model(&m.model)?;
            t.model.set_dtype(m.model.dtype())?;
            policy = t.model;
            t.params
        }
    };
    let steps = a.steps as usize;
    let cfg = DpoConfig {
        beta: a.beta,
        steps,
        batch: a.batch as usize,
        schedule: Schedule {
            peak: a.lr,
            min: a.lr / 10.0,
            warmup: a.warmup,
            total: steps,
            decay: Decay::Cosine,
        },
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
        clip: Some(1.0),
        eval_every: a.eval_every,
        seed: a.seed,
        loss_scale: a.loss_scale,
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let metrics_path = a.out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path)
        .with_context(|| format!("cannot create {}", metrics_path.display()))?;
    let before = match &eval {
        Some(e) => Some(dpo::evaluate(&policy, e, a.beta, pad)?),
        None => None,
    };
    let pb = ProgressBar::new(steps as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut write_err = None;
    let logs = dpo::train(
        &policy,
        vars.iter().map(|(_, v)| v.clone()).collect(),
        &train,
        eval.as_ref(),
        &cfg,
        pad,
        &mut |log| {
            pb.set_position(log.step as u64);
            pb.set_message(format!(
                "loss {:.4}  acc {:.2}  margin {:.3}{}",
                log.train.loss,
                log.train.rewards_accuracies,
                log.train.rewards_margins,
                log.eval.as_ref().map_or(String::new(), |e| format!(
                    "  eval acc {:.2}",
                    e.rewards_accuracies
                ))
            ));
            if let Err(e) = writeln!(
                metrics,
                "{}",
                serde_json::to_string(log).unwrap_or_default()
            ) {
                write_err = Some(e);
            }
        },
    )?;
    pb.finish_and_clear();
    if let Some(e) = write_err {
        bail!("{}: {e}", metrics_path.display());
    }
    if let Some(name) = lmkit::train::params::first_non_finite(&vars)? {
        bail!(
            "DPO diverged: `{name}` holds NaN or infinite values after {} steps; nothing was \
             saved (lower --lr)",
            logs.len()
        );
    }
    let saved = match &lcfg {
        Some(c) => {
            let dir = a.out.join("adapter");
            lora::save_peft(&dir, c, &m.path.display().to_string(), &vars)?;
            dir
        }
        None => {
            let dir = a.out.join("final");
            lmkit::train::export::save_hf_model(&dir, &policy, &m.tokenizer)?;
            dir
        }
    };
    let after = logs.last().and_then(|l| l.eval.clone());
    let summary = serde_json::json!({
        "train_pairs": train.pairs.len(),
        "eval_pairs": eval.as_ref().map_or(0, |e| e.pairs.len()),
        "steps": logs.len(),
        "eval_before": before,
        "eval_after": after,
        "saved": saved.display().to_string(),
        "lora": a.lora,
        "metrics": metrics_path.display().to_string(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let f = |m: &Option<dpo::DpoMetrics>| {
            m.as_ref().map_or("-".into(), |m| {
                format!(
                    "loss {:.4}, reward accuracy {:.3}, margin {:.3}",
                    m.loss, m.rewards_accuracies, m.rewards_margins
                )
            })
        };
        println!("held-out before: {}", f(&before));
        println!("held-out after:  {}", f(&after));
        println!("saved: {}", saved.display());
    }
    Ok(())
}
