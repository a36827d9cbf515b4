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
    after_help = "Examples:\n  lmkit bench\n  lmkit bench --threads 2 -p 512 -n 128 --reps 5 --json\n  lmkit bench --model smollm2-q8_0.gguf -p 0\n  lmkit bench --kernel-report --roofline"
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
    /// Sequences run side by side (pp: B prompts in one call; tg: B sequences decoded in
    /// lockstep, one call per step, as the server batches them). Native models run lmkit's
    /// batched kernels; others the reference (candle) path.
    #[arg(short, long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,
    #[command(flatten)]
    pub model: ModelArgs,
    /// tg under each KV-cache policy listed (e.g. `--kv full,h2o --kv-budget 0.2 -n 2000`),
    /// with the most KV bytes held.
    #[command(flatten)]
    pub kv: crate::kv::KvArgs,
    /// Also time each kind of operation (norm, matmuls, attention, ...) for one prompt batch
    /// and one decoding step, and show where the time goes.
    #[arg(long)]
    pub kernel_report: bool,
    /// Also measure the machine's ceilings (copy bandwidth, FMA peak) to compare the achieved
    /// weight-streaming GB/s and GFLOP/s against.
    #[arg(long)]
    pub roofline: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Per-token work of the model, for achieved-rate figures.
#[derive(Serialize)]
struct Work {
    /// Bytes of weights one decoding step reads (every matrix once, the head included).
    weight_bytes: usize,
    /// FLOPs per token of a pp test from an empty cache (matmuls + attention; the head for the
    /// last position only, spread over the batch).
    pp_flops_per_token: f64,
}

fn work(model: &Llama, n_prompt: usize) -> Work {
    let cfg = model.config();
    let named = model.named_weights();
    let weight_bytes = named.iter().map(|(_, w)| w.size_in_bytes()).sum();
    let params = |keep: &dyn Fn(&str) -> bool| -> f64 {
        named
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(_, w)| w.dims2().map(|(a, b)| (a * b) as f64).unwrap_or(0.0))
            .sum()
    };
    let body = params(&|n: &str| n.starts_with("model.layers."));
    let head = (cfg.vocab_size * cfg.hidden_size) as f64;
    let n = n_prompt.max(1) as f64;
    let attn = 2.0 * (cfg.num_heads * cfg.head_dim * cfg.num_layers) as f64 * (n + 1.0);
    Work {
        weight_bytes,
        pp_flops_per_token: 2.0 * body + attn + 2.0 * head / n,
    }
}

#[derive(Serialize)]
struct OpShare {
    op: &'static str,
    ms_per_call: f64,
    share: f64,
}

/// Runs `f` once with the native path's per-operation clock on; the time outside the team
/// (embedding, tensor conversion, ...) is the rest of the wall time.
fn profiled(f: impl FnOnce() -> Result<f64>, calls: usize) -> Result<Vec<OpShare>> {
    use lmkit::models::native::profile;
    profile::enable(true);
    let t = Instant::now();
    f()?;
    let wall = t.elapsed().as_secs_f64();
    let ops = profile::totals();
    profile::enable(false);
    let inside: f64 = ops.iter().map(|(_, s)| s).sum();
    let per = |s: f64| s * 1e3 / calls.max(1) as f64;
    let mut rows: Vec<OpShare> = ops
        .into_iter()
        .map(|(op, s)| OpShare {
            op: op.name(),
            ms_per_call: per(s),
            share: s / wall,
        })
        .collect();
    rows.push(OpShare {
        op: "outside the kernels (embedding, tensors, sync)",
        ms_per_call: per((wall - inside).max(0.0)),
        share: ((wall - inside) / wall).max(0.0),
    });
    Ok(rows)
}

#[derive(Serialize)]
struct Row {
    test: String,
    tokens: usize,
    tokens_per_sec_mean: f64,
    tokens_per_sec_sd: f64,
    samples: Vec<f64>,
    /// tg: the KV-cache policy and the most bytes of keys and values held.
    #[serde(skip_serializing_if = "Option::is_none")]
    kv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_peak_bytes: Option<usize>,
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

/// A cache for `batch` sequences in lockstep: the model's own (the native CPU path's, or on a
/// GPU fused decoding's, which takes batches; `LMKIT_CUDA_DECODE=off` turns it off), else the
/// reference path's.
fn cache_for(model: &Llama, batch: usize) -> lmkit::models::KvCache {
    let cache = model.new_cache();
    if batch == 1 || cache.is_slab() {
        return cache;
    }
    model.new_reference_cache()
}

/// `batch` prompts of `ids` through an empty cache; tokens/s over all of them. The clock stops
/// when the device has finished (GPU work is asynchronous).
fn pp(model: &Llama, ids: &[u32], batch: usize) -> Result<f64> {
    if batch > 1 && model.is_native() {
        let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let seqs = vec![ids; batch];
        let t = Instant::now();
        model.forward_batch_last(&seqs, &mut refs)?;
        return Ok((batch * ids.len()) as f64 / t.elapsed().as_secs_f64());
    }
    let x = Tensor::new(ids, model.device())?
        .unsqueeze(0)?
        .repeat((batch, 1))?;
    let mut cache = cache_for(model, batch);
    lmkit::core::device::synchronize(model.device())?;
    let t = Instant::now();
    let _ = model.forward_last(&x, &mut cache)?;
    lmkit::core::device::synchronize(model.device())?;
    Ok((batch * ids.len()) as f64 / t.elapsed().as_secs_f64())
}

/// `batch` sequences decoded in lockstep, one token each per step, waiting for the logits of
/// every step as a sampler would.
fn tg(model: &Llama, ids: &[u32], batch: usize, kv: Option<&KvPolicyRef>) -> Result<(f64, usize)> {
    if batch > 1 && model.is_native() {
        let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
        if let Some(p) = kv {
            for c in &mut caches {
                c.set_policy(p.clone())?;
                c.plan(ids.len());
            }
        }
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let t = Instant::now();
        for id in ids {
            let step = vec![std::slice::from_ref(id); batch];
            model.forward_batch_last(&step, &mut refs)?;
        }
        let rate = (batch * ids.len()) as f64 / t.elapsed().as_secs_f64();
        let peak = caches.iter().map(|c| c.kv_bytes().1).sum();
        return Ok((rate, peak));
    }
    let mut cache = cache_for(model, batch);
    if let Some(p) = kv {
        cache.set_policy(p.clone())?;
        cache.plan(ids.len());
    }
    lmkit::core::device::synchronize(model.device())?;
    let t = Instant::now();
    for &id in ids {
        let x = Tensor::from_vec(vec![id; batch], (batch, 1), model.device())?;
        let _ = model.forward_last(&x, &mut cache)?;
        lmkit::core::device::synchronize(model.device())?;
    }
    let rate = (batch * ids.len()) as f64 / t.elapsed().as_secs_f64();
    Ok((rate, cache.kv_bytes().1))
}

type KvPolicyRef = std::sync::Arc<dyn lmkit::models::KvPolicy>;

/// `pp512`, or `pp512 x16` for a batch.
fn test_name(kind: &str, n: usize, batch: usize) -> String {
    match batch {
        1 => format!("{kind}{n}"),
        b => format!("{kind}{n} x{b}"),
    }
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
        kv: None,
        kv_peak_bytes: None,
    }
}

pub fn main(a: Args) -> Result<()> {
    let m = a.model.load()?;
    let threads = lmkit::core::threads::threads();
    let batch = a.batch as usize;
    let device = lmkit::core::device::device_name(m.model.device());
    let dtype = format!("{:?}", m.model.dtype()).to_lowercase();
    let cfg = m.model.config();
    let ctx = cfg.max_position_embeddings;
    if a.n_prompt == 0 && a.n_gen == 0 && !a.kernel_report {
        anyhow::bail!("nothing to measure: -p and -n are both 0");
    }
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
        pp(&m.model, &ids, batch)?;
        let xs = (0..a.reps)
            .map(|_| pp(&m.model, &ids, batch))
            .collect::<Result<Vec<_>>>()?;
        rows.push(stats(test_name("pp", a.n_prompt, batch), a.n_prompt, xs));
    }
    if a.n_gen > 0 {
        let ids = tokens(a.n_gen, cfg.vocab_size);
        let policies = a.kv.policies()?;
        let named = policies.len() > 1 || policies.iter().any(|(_, b)| b.is_some());
        for (p, budget) in policies {
            let kv = budget.is_some().then_some(&p);
            tg(&m.model, &ids[..a.n_gen.min(8)], batch, kv)?;
            let runs = (0..a.reps)
                .map(|_| tg(&m.model, &ids, batch, kv))
                .collect::<Result<Vec<_>>>()?;
            let mut name = test_name("tg", a.n_gen, batch);
            if named {
                name = format!("{name} {}", p.name());
            }
            let peak = runs.iter().map(|r| r.1).max();
            let mut row = stats(name, a.n_gen, runs.into_iter().map(|r| r.0).collect());
            if named {
                row.kv = Some(p.name());
                row.kv_peak_bytes = peak;
            }
            rows.push(row);
        }
    }
    let w = work(&m.model, a.n_prompt);
    let rate = |test: &str| {
        rows.iter()
            .find(|r| r.test.starts_with(test))
            .map(|r| r.tokens_per_sec_mean)
    };
    let achieved = serde_json::json!({
        "tg_weight_gb_per_sec": rate("tg").map(|r| r * w.weight_bytes as f64 / 1e9),
        "pp_gflop_per_sec": rate("pp").map(|r| r * w.pp_flops_per_token / 1e9),
    });
    let mut report = serde_json::Map::new();
    if a.kernel_report {
        if !m.model.is_native() {
            anyhow::bail!(
                "--kernel-report times lmkit's native CPU path, and this model has weights \
                 without a native kernel ({})",
                types_of(&m).join("/")
            );
        }
        if a.n_prompt > 0 {
            let ids = tokens(a.n_prompt, cfg.vocab_size);
            let r = profiled(|| pp(&m.model, &ids, 1), 1)?;
            report.insert(format!("pp{}", a.n_prompt), serde_json::to_value(r)?);
        }
        if a.n_gen > 0 {
            let ids = tokens(a.n_gen, cfg.vocab_size);
            let r = profiled(|| Ok(tg(&m.model, &ids, 1, None)?.0), a.n_gen)?;
            report.insert("tg (per token)".into(), serde_json::to_value(r)?);
        }
    }
    let ceilings = if a.roofline {
        let isa = lmkit::kernels::isa();
        Some(serde_json::json!({
            "isa": format!("{isa:?}"),
            "copy_gb_per_sec_64mib": lmkit::kernels::roofline::copy_bandwidth(64 << 20, 5),
            "copy_gb_per_sec_1gib": lmkit::kernels::roofline::copy_bandwidth(1 << 30, 3),
            "fma_peak_gflop_per_sec": lmkit::kernels::roofline::fma_peak(isa),
        }))
    } else {
        None
    };
    let types = types_of(&m);
    // Which path decodes: lmkit's CPU kernels, fused decoding on a GPU, or candle's ops.
    let decode = if m.model.is_native() {
        "native"
    } else if cache_for(&m.model, batch).is_slab() {
        "fused"
    } else {
        "candle"
    };
    // And prompts: the fused prompt pass over the same cache, or candle's ops.
    let prompt = match decode {
        "native" => "native",
        "fused" if m.model.fused_prompt_applies() => "fused",
        _ => "candle",
    };
    if a.json {
        let v = serde_json::json!({
            "model": m.path.display().to_string(),
            "tensor_types": types,
            "dequantized": a.model.dequantize,
            "native": m.model.is_native(),
            "decode": decode,
            "prompt": prompt,
            "device": device,
            "dtype": dtype,
            "batch": batch,
            "threads": threads,
            "results": rows,
            "work": w,
            "achieved": achieved,
            "kernel_report": report,
            "ceilings": ceilings,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model: {} ({})", m.path.display(), types.join("/"));
        println!(
            "device: {device} ({dtype}), threads: {threads}, batch: {batch}, decoding: {decode}, \
             prompts: {prompt}"
        );
        println!("{:<12} {:>18}", "test", "tokens/s");
        for r in &rows {
            let kv = r
                .kv_peak_bytes
                .map(|b| format!("  peak KV {:.2} MB", b as f64 / 1e6))
                .unwrap_or_default();
            println!(
                "{:<12} {:>10.2} ± {:<6.2}{kv}",
                r.test, r.tokens_per_sec_mean, r.tokens_per_sec_sd
            );
        }
        if let Some(r) = rate("tg") {
            println!(
                "tg: {:.1} MB of weights per token, {:.1} GB/s streamed",
                w.weight_bytes as f64 / 1e6,
                r * w.weight_bytes as f64 / 1e9
            );
        }
        if let Some(r) = rate("pp") {
            println!(
                "pp: {:.0} MFLOP per token, {:.1} GFLOP/s",
                w.pp_flops_per_token / 1e6,
                r * w.pp_flops_per_token / 1e9
            );
        }
        if let Some(c) = &ceilings {
            println!(
                "ceilings ({}): copy {:.1} GB/s (64 MiB, cache-resident) / {:.1} GB/s (1 GiB), \
                 FMA peak {:.0} GFLOP/s",
                c["isa"].as_str().unwrap_or("?"),
                c["copy_gb_per_sec_64mib"].as_f64().unwrap_or(0.0),
                c["copy_gb_per_sec_1gib"].as_f64().unwrap_or(0.0),
                c["fma_peak_gflop_per_sec"].as_f64().unwrap_or(0.0)
            );
        }
        for (test, ops) in &report {
            println!("\nkernel report, {test}:");
            println!("{:<48} {:>10} {:>7}", "operation", "ms/call", "share");
            for o in ops.as_array().into_iter().flatten() {
                println!(
                    "{:<48} {:>10.3} {:>6.1}%",
                    o["op"].as_str().unwrap_or(""),
                    o["ms_per_call"].as_f64().unwrap_or(0.0),
                    100.0 * o["share"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    Ok(())
}

fn types_of(m: &lmkit::LoadedModel) -> Vec<String> {
    m.file.tensor_types.iter().map(|t| t.0.clone()).collect()
}
