//! LoRA fine-tuning (Hu et al., arXiv 2106.09685) in HF PEFT's layout: adapters on the linear
//! layers whose module name ends with one of `targets` (`q_proj`, `v_proj`, …), saved as
//! `adapter_config.json` + `adapter_model.safetensors` with PEFT's tensor names
//! (`base_model.model.<module>.lora_A.weight` `(r, in)`, `lora_B.weight` `(out, r)`), loadable
//! by PEFT and by [`load_peft`], and mergeable into the base weights.
//!
//! Initialization as PEFT's default: `A ~ U(−1/√in, 1/√in)` (Kaiming-uniform with `a = √5`),
//! `B = 0`; `scale = α / r`.
//!
//! Dropout as PEFT's `lora_dropout` (on the adapter's input, training only; masks from a
//! counter-based generator keyed by the seed and the micro-batch, see `lmkit_core::lora`).
//!
//! Deviations: PEFT draws dropout masks from torch's generator, so masks (not their
//! statistics) differ from PEFT's; the base must be dense f32 (load with
//! `--dequantize`), because gradients flow through the frozen base layers to reach earlier
//! adapters and lmkit's quantized kernels have no backward yet.

use std::collections::HashMap;
use std::path::Path;

use lmkit_core::candle::{safetensors, Var};
use lmkit_core::linear::Weight;
use lmkit_core::{Device, LoraAdapter, Tensor};
use lmkit_models::Llama;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Module-name suffixes that get an adapter (PEFT's `target_modules`).
    pub targets: Vec<String>,
}

impl LoraConfig {
    fn check(&self) -> Result<()> {
        let bad = |why: &str| {
            Err(Error::Option {
                option: "lora".into(),
                why: why.into(),
            })
        };
        if self.r == 0 {
            return bad("rank r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout must be in [0, 1)");
        }
        if self.targets.is_empty() {
            return bad("no target modules");
        }
        Ok(())
    }
}

fn peft_name(module: &str, ab: &str) -> String {
    format!("base_model.model.{module}.lora_{ab}.weight")
}

/// Attaches fresh adapters to `model`; returns their variables, PEFT-named.
pub fn attach(model: &mut Llama, cfg: &LoraConfig, seed: u64) -> Result<Vec<(String, Var)>> {
    cfg.check()?;
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let mut vars = Vec::new();
    let mut hits = 0;
    let state = lmkit_core::DropoutState::new(seed ^ 0xD20F_0A7E);
    model.update_linears(|name, l| {
        if !matches!(l.weight(), Weight::Dense(_)) {
            return Err(lmkit_models::Error::Unsupported(format!(
                "{name}: LoRA training needs dense f32 base weights (load with --dequantize)"
            )));
        }
        if !cfg.targets.iter().any(|t| name.ends_with(t.as_str())) {
            return Ok(None);
        }
        hits += 1;
        let (out, inp) = (l.out_features(), l.in_features());
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * inp)
            .map(|_| (uniform() * bound) as f32)
            .collect();
        let dev = match l.weight() {
            Weight::Dense(w) => w.device().clone(),
            _ => Device::Cpu,
        };
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), &dev)?)?;
        let b = Var::zeros((out, cfg.r), lmkit_core::DType::F32, &dev)?;
        let adapter = LoraAdapter {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: cfg.alpha / cfg.r as f64,
            dropout: (cfg.dropout > 0.0).then(|| lmkit_core::LoraDropout {
                p: cfg.dropout as f32,
                id: hits as u64,
                state: state.clone(),
            }),
        };
        vars.push((peft_name(name, "A"), a));
        vars.push((peft_name(name, "B"), b));
        Ok(Some(l.with_lora(adapter)?))
    })?;
    if hits == 0 {
        return Err(Error::Option {
            option: "lora.targets".into(),
            why: format!("{:?} match no linear layer", cfg.targets),
        });
    }
    Ok(vars)
}

/// Writes the adapters in PEFT's layout into `dir` (written under a temporary name, then
/// renamed).
pub fn save_peft(dir: &Path, cfg: &LoraConfig, base: &str, vars: &[(String, Var)]) -> Result<()> {
    let io = |p: &Path, e: &dyn std::fmt::Display| Error::Data(format!("{}: {e}", p.display()));
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, &e))?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    safetensors::save(&tensors, tmp.join("adapter_model.safetensors"))?;
    let mut targets = cfg.targets.clone();
    targets.sort();
    let conf = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "base_model_name_or_path": base,
    });
    let json = serde_json::to_vec_pretty(&conf).map_err(|e| io(&tmp, &e))?;
    std::fs::write(tmp.join("adapter_config.json"), json).map_err(|e| io(&tmp, &e))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io(dir, &e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io(dir, &e))
}

/// Attaches the PEFT adapter in `dir` to `model` (any base format: inference only).
pub fn load_peft(dir: &Path, model: &mut Llama) -> Result<LoraConfig> {
    let io = |p: &Path, e: &dyn std::fmt::Display| Error::Data(format!("{}: {e}", p.display()));
    let cp = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cp).map_err(|e| io(&cp, &e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| io(&cp, &e))?;
    let field = |k: &str| v.get(k).ok_or_else(|| io(&cp, &format!("no field `{k}`")));
    let cfg = LoraConfig {
        r: field("r")?
            .as_u64()
            .ok_or_else(|| io(&cp, &"`r` is not an integer"))? as usize,
        alpha: field("lora_alpha")?
            .as_f64()
            .ok_or_else(|| io(&cp, &"`lora_alpha` is not a number"))?,
        dropout: 0.0,
        targets: serde_json::from_value(field("target_modules")?.clone())
            .map_err(|e| io(&cp, &e))?,
    };
    let wp = dir.join("adapter_model.safetensors");
    let t = safetensors::load(&wp, &Device::Cpu).map_err(|e| io(&wp, &e))?;
    let scale = cfg.alpha / cfg.r as f64;
    model.update_linears(|name, l| {
        let (a, b) = (t.get(&peft_name(name, "A")), t.get(&peft_name(name, "B")));
        match (a, b) {
            (Some(a), Some(b)) => Ok(Some(l.with_lora(LoraAdapter {
                a: a.to_dtype(lmkit_core::DType::F32)?,
                b: b.to_dtype(lmkit_core::DType::F32)?,
                scale,
                // A loaded adapter is for inference or merging: no dropout.
                dropout: None,
            })?)),
            _ => Ok(None),
        }
    })?;
    Ok(cfg)
}

/// Folds every adapter into its layer's weight (the model becomes adapter-free and, on the CPU,
/// runs on the native path again).
pub fn merge(model: &mut Llama) -> Result<()> {
    model.update_linears(|_, l| match l.lora() {
        Some(_) => Ok(Some(l.merge_lora()?)),
        None => Ok(None),
    })?;
    Ok(())
}
