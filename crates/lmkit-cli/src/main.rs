//! `lmkit`: the command-line tool. Thin: one module per subcommand, the work is in the library.

mod bench;
mod chat;
mod common;
mod data;
mod doremi;
mod dpo;
mod emergence;
mod eval;
mod export;
mod fetch;
mod info;
mod kv;
mod logits;
mod parity;
mod plot;
mod ppl;
mod quantize;
mod run;
mod scaling;
mod serve;
mod tokenizer;
mod train;
mod train_data;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lmkit",
    version,
    about = "NeurIPS 2023 language-modeling research on real models: run, chat, perplexity, benchmarks",
    after_help = "Examples:\n  lmkit run \"The capital of France is\"\n  lmkit chat\n  lmkit ppl wiki.test.raw --ctx 512\n  lmkit bench --threads 2\n  lmkit info --model model.gguf --json\n  lmkit train --config run.toml --out runs/tiny\n\nWithout --model, commands use the default model (SmolLM2-135M-Instruct, Q4_1), fetched on first use."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log more (repeat for debug logs); logs go to stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed.
    Run(run::Args),
    /// Interactive multi-turn chat using the model's chat template.
    Chat(chat::Args),
    /// Perplexity of a text file over fixed windows (llama.cpp's scoring convention).
    Ppl(ppl::Args),
    /// Benchmarks (HellaSwag, ARC, PIQA, BoolQ, Winogrande, OpenBookQA, MMLU, LAMBADA, GSM8K, arithmetic) scored as lm-evaluation-harness does; `lmkit eval emergence`.
    Eval(eval::Args),
    /// Prompt-processing and generation speed, like llama-bench (pp512 / tg128).
    Bench(bench::Args),
    /// Architecture, parameter count, tensor types and sizes of a model.
    Info(info::Args),
    /// Download the default model into the cache (done automatically when needed).
    Fetch(fetch::Args),
    /// Train a Llama-family model: from scratch on text, or fine-tune one (full or LoRA) on chat
    /// data (checkpoints, --resume, HF and GGUF export).
    Train(train::Args),
    /// Align a model to preference pairs with DPO (full fine-tuning, or LoRA with --lora).
    Dpo(dpo::Args),
    /// A model's logits at every position of a text, saved as safetensors and compared with
    /// another run's (CPU vs GPU, f32 vs bf16).
    Logits(logits::Args),
    /// The curves of a run's metrics.jsonl (train, DPO, DoReMi) as an SVG file.
    Plot(plot::Args),
    /// Write any model lmkit loads as a GGUF file (f32, f16, bf16, q8_0, q4_0, q4_1).
    Export(export::Args),
    /// Post-training quantization to 2/3/4 bits: RTN, GPTQ (LDLQ) or QuIP (incoherence processing).
    Quantize(quantize::Args),
    /// An OpenAI-compatible server (chat and text completions, streaming) with continuous
    /// batching and per-request KV-cache policies.
    Serve(serve::Args),
    /// Tokenizers: `lmkit tokenizer train`, `lmkit tokenizers parity`.
    #[command(subcommand, alias = "tokenizers")]
    Tokenizer(tokenizer::Command),
    /// The data-constrained scaling law: predict, compute-optimal allocation, fit.
    #[command(subcommand)]
    Scaling(scaling::Command),
    /// Data: `lmkit data select` (DSIR), `lmkit data kl`, `lmkit data doremi` (domain weights).
    #[command(subcommand)]
    Data(data::Command),
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LMKIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    keep_freed_memory();
    quiet_on_closed_pipe();
    let threads = match &cli.command {
        Command::Run(a) => a.model.threads,
        Command::Chat(a) => a.model.threads,
        Command::Ppl(a) => a.model.threads,
        Command::Bench(a) => a.model.threads,
        Command::Info(a) => a.model.threads,
        Command::Eval(a) => match &a.study {
            Some(eval::Study::Emergence(e)) => e.threads,
            None => a.model.threads,
        },
        Command::Fetch(_) => None,
        Command::Train(a) => a.threads,
        Command::Dpo(a) => a.model.threads,
        Command::Logits(a) => a.model.threads,
        Command::Plot(_) => None,
        Command::Export(a) => a.model.threads,
        Command::Quantize(a) => a.model.threads,
        Command::Serve(a) => a.model.threads,
        Command::Tokenizer(_) => None,
        Command::Scaling(_) => None,
        Command::Data(c) => data::threads(c),
    }
    .map(|t| t as usize)
    .unwrap_or_else(lmkit::core::threads::default_threads);
    // The whole command runs on the worker pool (see `lmkit::core::threads::install`).
    let result = lmkit::core::threads::install(threads, move || match cli.command {
        Command::Run(a) => run::main(a),
        Command::Chat(a) => chat::main(a),
        Command::Ppl(a) => ppl::main(a),
        Command::Bench(a) => bench::main(a),
        Command::Info(a) => info::main(a),
        Command::Eval(a) => eval::main(a),
        Command::Fetch(a) => fetch::main(a),
        Command::Train(a) => train::main(a),
        Command::Dpo(a) => dpo::main(a),
        Command::Logits(a) => logits::main(a),
        Command::Plot(a) => plot::main(a),
        Command::Export(a) => export::main(a),
        Command::Quantize(a) => quantize::main(a),
        Command::Serve(a) => serve::main(a),
        Command::Tokenizer(c) => tokenizer::main(c),
        Command::Scaling(c) => scaling::main(c),
        Command::Data(c) => data::main(c),
    })
    .map_err(anyhow::Error::from)
    .and_then(|r| r);
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Asks glibc's allocator to keep freed memory for reuse instead of handing every large block
/// back to the kernel. A training step allocates and frees the same activation-sized buffers
/// (tens of MB) hundreds of times; by default each is a fresh `mmap` whose pages the kernel
/// must fault in and zero again, which cost a third of a CPU training step (measured with
/// `perf`). Peak memory is unchanged: the blocks are reused, not added.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Blocks up to 1 GiB come from the heap (a step's largest are ~50 MB).
        const LARGE: i32 = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; called before any other thread
        // exists.
        let (a, b) = unsafe {
            (
                libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE),
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX),
            )
        };
        let ok = a == 1 && b == 1;
        if !ok {
            tracing::debug!("mallopt refused the allocator settings; keeping the defaults");
        }
    }
}

/// Exits quietly when stdout is a closed pipe (`lmkit … --json | head`), as Unix tools do,
/// instead of panicking on the failed write (Rust ignores SIGPIPE by default).
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
