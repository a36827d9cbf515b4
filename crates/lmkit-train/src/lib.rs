//! lmkit-train: training for the models of `lmkit-models`.
//!
//! - [`schedule`]: learning-rate schedules (linear warmup, then cosine or linear decay);
//! - [`adamw`]: AdamW with decoupled weight decay and parameter groups, and global-norm
//!   gradient clipping;
//! - [`params`]: a model's trainable variables, from existing weights or a fresh initialization;
//! - [`data`]: packing token streams into fixed-length training sequences;
//! - [`mixture`]: a weighted mixture of data domains (hand-set or DoReMi weights);
//! - [`dro`]: DoReMi's proxy training: Group-DRO token weights from excess losses;
//! - [`tokens`]: token streams in memory or in memory-mapped token files (corpora larger than RAM);
//! - [`body_cpu`]: the CPU f32 forward and backward of a dense model's blocks on plain buffers;
//! - [`body_gpu`]: the same on a GPU, in the compute dtype, with lmkit's fused kernels;
//! - [`trainer`]: the loop (schedule, micro-batches with accumulation, clip, step, eval, log);
//! - [`checkpoint`]: atomic checkpoints (model, optimizer, data position) and exact resume;
//! - [`export`]: the trained model as an HF folder;
//! - [`dpo`]: the DPO loss and its metrics, and completion log-probs;
//! - [`loss_scale`]: loss scaling for f16 training (skipped steps, the dynamic scale);
//! - [`lora`]: LoRA adapters in PEFT's layout: attach, save, load, merge;
//! - [`prefs`]: preference pairs (prompt/chosen/rejected JSONL, HH-RLHF dialogues).

pub mod accumulate;
pub mod adamw;
pub mod body_cpu;
pub mod body_gpu;
pub mod checkpoint;
pub mod data;
pub mod dpo;
pub mod dro;
pub mod error;
pub mod export;
mod head_cpu;
pub mod head_loss;
pub mod lora;
pub mod loss_scale;
pub mod mixture;
pub mod params;
pub mod prefs;
pub mod schedule;
pub mod sft;
pub mod tokens;
pub mod trainer;

pub use adamw::{AdamW, AdamWConfig};
pub use error::{Error, Result};
pub use params::Trainable;
pub use schedule::{Decay, Schedule};
pub use trainer::{train, StepLog, TrainConfig, Trainer};
