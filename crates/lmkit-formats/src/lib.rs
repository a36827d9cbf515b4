//! lmkit-formats: reading and writing the files people already have.
//!
//! - [`gguf`]: GGUF v2/v3 reader (mmap, validated) and writer (atomic);
//! - [`hf`]: HF checkpoints: `config.json` and `*.safetensors`;
//! - [`tokenizer`]: a `tokenizers::Tokenizer` from GGUF metadata or `tokenizer.json`;
//! - [`chat`]: chat templates (ChatML, ...);
//! - [`names`]: the one HF ⇄ GGUF tensor-name table.
//!
//! No model math lives here.

pub mod chat;
pub mod error;
pub mod gguf;
pub mod hf;
pub mod names;
pub mod tokenizer;
pub mod tokenizer_gguf;
pub mod tokenizer_train;
pub mod write;

pub use error::{Error, Result};
