//! # lmkit
//!
//! The methods of NeurIPS 2023 language-modeling research, usable on real models from Rust:
//! load GGUF or HF checkpoints, generate, score perplexity — with compression, training,
//! alignment, evaluation and serving built on the same pieces.
//!
//! One dependency gives the main API:
//!
//! ```
//! use lmkit::{GenerateOptions, SamplingParams};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The default model (SmolLM2-135M-Instruct, Q4_1), fetched and cached on first use.
//! let path = lmkit::default_model::ensure(&mut |_, _, _| {})?;
//! let m = lmkit::load(&path, Default::default())?;
//!
//! // Generate, streaming text as it comes.
//! let prompt = m.tokenizer.encode("The capital of France is")?;
//! let opts = GenerateOptions { max_tokens: 16, sampling: SamplingParams::greedy(), ..Default::default() };
//! let mut session = lmkit::Session::new(&m.model);
//! let out = lmkit::generate(&m.model, &m.tokenizer, &mut session, &prompt, &opts, &mut |piece| {
//!     print!("{piece}");
//!     true
//! })?;
//! println!("\n{} tokens at {:.1} tokens/s", out.tokens.len(), out.gen_tokens_per_sec());
//!
//! // Perplexity, scored as llama.cpp scores it.
//! let ids = m.tokenizer.encode_with_bos(&"The quick brown fox jumps over the lazy dog. ".repeat(40))?;
//! let report = lmkit::perplexity(&m.model, &ids, &lmkit::PplOptions { ctx: 128, ..Default::default() }, &mut |_, _| {})?;
//! println!("ppl {:.3} ± {:.3}", report.ppl, report.ppl_stderr);
//! # Ok(()) }
//! ```

pub mod default_model;
pub mod eval_data;
pub mod parity_data;

pub use lmkit_core as core;
pub use lmkit_core::threads::set_threads;
pub use lmkit_core::{Device, Tensor};
pub use lmkit_data as data;
pub use lmkit_eval as eval;
pub use lmkit_eval::{perplexity, PplOptions, PplReport};
pub use lmkit_formats as formats;
pub use lmkit_formats::chat::Message;
pub use lmkit_generate as generate_mod;
pub use lmkit_generate::generate::Session;
pub use lmkit_generate::{generate, FinishReason, GenerateOptions, Generation, SamplingParams};
pub use lmkit_kernels as kernels;
pub use lmkit_models as models;
pub use lmkit_models::{load, load_on, Llama, LlamaConfig, LoadOptions, LoadedModel};
pub use lmkit_quant as quant;
pub use lmkit_train as train;
