//! `lmkit bench`: prompt processing (pp) and generation (tg) speed, measured like llama-bench:
//! pp runs a batch of N tokens through an empty cache (logits of the last position only); tg
//! decodes N tokens one at a time from an empty cache. Each test runs once to warm up, then
//! `--reps` times; we report mean ± standard deviation of tokens/s.

use std::time::Instant;

use anyhow::Result;
use lmkit::{Llama, Tensor};
use serde::Serialize;

use crate::common::ModelArgs;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit bench\n  lmkit bench --threads 2 -p 512 -n 128 --reps 5 --json\n  lmkit bench --model smollm2-q8_0.gguf -p 0"
)]
pub struct Args {
    /// Prompt tokens for the pp test (0 skips it).
    #[arg(short = 'p', long, default_value_t = 512)]
    pub n_prompt: usize,
    /// Generated tokens for the tg test (0 skips it).
    #[arg(short = 'n', long, default_value_t = 128)]
    pub n_gen: usize,
    /// Measured repetitions per test.
    #[arg(short, long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub reps: u32,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    test: String,
    tokens: usize,
    tokens_per_sec_mean: f64,
    tokens_per_sec_sd: f64,
    samples: Vec<f64>,
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn pp(model: &Llama, ids: &[u32]) -> Result<f64> {
    let x = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let mut cache = model.new_cache();
    let t = Instant::now();
    let _ = model.forward_last(&x, &mut cache)?;
    Ok(ids.len() as f64 / t.elapsed().as_secs_f64())
}

fn tg(model: &Llama, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache();
    let t = Instant::now();
    for &id in ids {
        let x = Tensor::new(&[id], model.device())?.unsqueeze(0)?;
        let _ = model.forward_last(&x, &mut cache)?;
    }
    Ok(ids.len() as f64 / t.elapsed().as_secs_f64())
}

fn stats(name: String, n: usize, xs: Vec<f64>) -> Row {
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64
    } else {
        0.0
    };
    Row {
        test: name,
        tokens: n,
        tokens_per_sec_mean: mean,
        tokens_per_sec_sd: var.sqrt(),
        samples: xs,
    }
}

pub fn main(a: Args) -> Result<()> {
    let m = a.model.load()?;
    let threads = lmkit::core::threads::threads();
    let cfg = m.model.config();
    let ctx = cfg.max_position_embeddings;
    if a.n_prompt > ctx || a.n_gen > ctx {
        anyhow::bail!(
            "test sizes (-p {}, -n {}) exceed the model's context {ctx}",
            a.n_prompt,
            a.n_gen
        );
    }
    let mut rows = vec![];
    if a.n_prompt > 0 {
        let ids = tokens(a.n_prompt, cfg.vocab_size);
        pp(&m.model, &ids)?;
        let xs = (0..a.reps)
            .map(|_| pp(&m.model, &ids))
            .collect::<Result<Vec<_>>>()?;
        rows.push(stats(format!("pp{}", a.n_prompt), a.n_prompt, xs));
    }
    if a.n_gen > 0 {
        let ids = tokens(a.n_gen, cfg.vocab_size);
        tg(&m.model, &ids[..a.n_gen.min(8)])?;
        let xs = (0..a.reps)
            .map(|_| tg(&m.model, &ids))
            .collect::<Result<Vec<_>>>()?;
        rows.push(stats(format!("tg{}", a.n_gen), a.n_gen, xs));
    }
    let types: Vec<String> = m.file.tensor_types.iter().map(|t| t.0.clone()).collect();
    if a.json {
        let v = serde_json::json!({
            "model": m.path.display().to_string(),
            "tensor_types": types,
            "dequantized": a.model.dequantize,
            "threads": threads,
            "results": rows,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model: {} ({})", m.path.display(), types.join("/"));
        println!("threads: {threads}");
        println!("{:<8} {:>18}", "test", "tokens/s");
        for r in &rows {
            println!(
                "{:<8} {:>10.2} ± {:<6.2}",
                r.test, r.tokens_per_sec_mean, r.tokens_per_sec_sd
            );
        }
    }
    Ok(())
}
