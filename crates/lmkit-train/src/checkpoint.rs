//! Checkpoints that survive a kill: each is a directory `step-NNNNNNNN` holding
//! `model.safetensors` (every variable by HF name), `optimizer.safetensors` (`m.NAME`, `v.NAME`)
//! and `state.json` (steps taken, data position, the training config). It is written under a
//! temporary name, every file synced, then renamed into place, so a directory with the final
//! name is always complete; older ones beyond the newest `keep` are renamed away before they are
//! deleted, so a kill during cleanup cannot leave a half-deleted checkpoint either.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use lmkit_core::candle::safetensors;
use lmkit_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::{Batches, DataPosition};
use crate::loss_scale::ScalerState;
use crate::trainer::{TrainConfig, Trainer};
use crate::{Error, Result};

#[derive(Debug, Serialize, Deserialize)]
struct State {
    step: usize,
    epoch: usize,
    next: usize,
    /// A mixture's position (then `epoch` and `next` are 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mixture: Option<DataPosition>,
    config: TrainConfig,
    /// The loss scale's state (f16 runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scaler: Option<ScalerState>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!("{}: {e}", path.display()))
}

/// `e` as an error of the checkpoint file `path` (a data error's message without its prefix).
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Data(m) => io(path, m),
        e => io(path, e),
    }
}

fn step_of(p: &Path) -> Option<usize> {
    p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()
}

const FILES: [&str; 3] = ["model.safetensors", "optimizer.safetensors", "state.json"];

/// Removes a directory without ever leaving it half-deleted under its own name: it is renamed
/// to a hidden name first.
fn remove(dir: &Path) {
    let hidden = dir.with_file_name(format!(
        ".{}.old-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    if std::fs::rename(dir, &hidden).is_ok() {
        let _ = std::fs::remove_dir_all(&hidden);
    }
}

/// Complete checkpoints under `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir() && step_of(p).is_some())
                .filter(|p| FILES.iter().all(|f| p.join(f).is_file()))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|p| step_of(p));
    v
}

/// The newest complete checkpoint under `dir`.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    list(dir).pop()
}

/// Writes a checkpoint of `tr` and `data` into `dir`; keeps the newest `keep` (at least 1).
pub fn save(dir: &Path, tr: &Trainer, data: &dyn Batches, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let step = tr.step();
    let fin = dir.join(format!("step-{step:08}"));
    let tmp = dir.join(format!(".step-{step:08}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let model: HashMap<String, Tensor> =
        tr.t.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
    let mut opt = HashMap::new();
    for ((n, _), (m, v)) in tr.t.params.iter().zip(tr.opt.moments()) {
        opt.insert(format!("m.{n}"), m.clone());
        opt.insert(format!("v.{n}"), v.clone());
    }
    let (epoch, next, mixture) = match data.data_position() {
        DataPosition::Single { epoch, next } => (epoch, next, None),
        m => (0, 0, Some(m)),
    };
    let state = State {
        step,
        epoch,
        next,
        mixture,
        config: tr.cfg.clone(),
        scaler: tr.scaler.active().then(|| tr.scaler.state()),
    };
    let write = || -> Result<()> {
        safetensors::save(&model, tmp.join("model.safetensors"))?;
        safetensors::save(&opt, tmp.join("optimizer.safetensors"))?;
        let json = serde_json::to_vec_pretty(&state).map_err(|e| io(&tmp, e))?;
        std::fs::write(tmp.join("state.json"), json).map_err(|e| io(&tmp, e))?;
        for f in FILES {
            File::open(tmp.join(f))
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&tmp.join(f), e))?;
        }
        if fin.exists() {
            remove(&fin);
        }
        std::fs::rename(&tmp, &fin).map_err(|e| io(&fin, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let all = list(dir);
    for old in &all[..all.len().saturating_sub(keep.max(1))] {
        remove(old);
    }
    Ok(fin)
}

/// Restores `tr` and `data` from checkpoint directory `ckpt`.
pub fn load(ckpt: &Path, tr: &mut Trainer, data: &mut dyn Batches) -> Result<()> {
    let read = |name: &str| -> Result<HashMap<String, Tensor>> {
        let p = ckpt.join(name);
        safetensors::load(&p, &Device::Cpu).map_err(|e| io(&p, e))
    };
    let model = read("model.safetensors")?;
    let opt = read("optimizer.safetensors")?;
    let sp = ckpt.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| io(&sp, e))?;
    let state: State = serde_json::from_str(&text).map_err(|e| io(&sp, e))?;
    let mut moments = Vec::with_capacity(tr.t.params.len());
    for (name, var) in &tr.t.params {
        let get = |map: &HashMap<String, Tensor>, key: &str, file: &str| -> Result<Tensor> {
            let t = map
                .get(key)
                .ok_or_else(|| io(&ckpt.join(file), format!("no tensor `{key}`")))?;
            if t.dims() != var.as_tensor().dims() {
                return Err(io(
                    &ckpt.join(file),
                    format!(
                        "`{key}` is {:?}, the model has {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    ),
                ));
            }
            if t.dtype() != var.dtype() {
                return Err(io(
                    &ckpt.join(file),
                    format!(
                        "`{key}` is stored as {:?}, the model's is {:?}",
                        t.dtype(),
                        var.dtype()
                    ),
                ));
            }
            Ok(t.clone())
        };
        var.set(&get(&model, name, "model.safetensors")?.to_device(var.device())?)?;
        moments.push((
            get(&opt, &format!("m.{name}"), "optimizer.safetensors")?,
            get(&opt, &format!("v.{name}"), "optimizer.safetensors")?,
        ));
    }
    tr.opt
        .restore(state.step, moments)
        .map_err(|e| in_file(&ckpt.join("optimizer.safetensors"), e))?;
    if let Some(s) = state.scaler {
        tr.scaler.restore(s);
    }
    let seek = match &state.mixture {
        Some(m) => data.seek_to(m),
        None => data.seek_to(&DataPosition::Single {
            epoch: state.epoch,
            next: state.next,
        }),
    };
    seek.map_err(|e| in_file(&sp, e))
}
