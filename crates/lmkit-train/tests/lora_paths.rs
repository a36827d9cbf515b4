//! LoRA training and LoRA DPO take lmkit's own CPU backward (`body_cpu`); the same runs through
//! candle's autograd (`LMKIT_TRAIN_AUTOGRAD=1`) give the same losses and adapters.
//!
//! One test in this file: it sets the process's environment between the two runs.

use lmkit_core::candle::Var;
use lmkit_models::LlamaConfig;
use lmkit_train::body_cpu::applies;
use lmkit_train::data::Sequences;
use lmkit_train::dpo::{self, DpoConfig, PrefData};
use lmkit_train::lora::{self, LoraConfig};
use lmkit_train::prefs::TokenPair;
use lmkit_train::{AdamWConfig, Decay, Schedule, TrainConfig, Trainable, Trainer};

/// Per-step losses of the two paths (f32 sums in another order, through a few AdamW steps).
const LOSS_TOL: f64 = 1e-4;
/// The adapters after training, relative to their largest entry.
const WEIGHT_REL_TOL: f32 = 1e-3;

fn lora_cfg(dropout: f64) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        targets: vec![
            "q_proj".into(),
            "k_proj".into(),
            "v_proj".into(),
            "o_proj".into(),
            "down_proj".into(),
        ],
    }
}

fn schedule(steps: usize) -> Schedule {
    Schedule {
        peak: 5e-3,
        min: 5e-4,
        warmup: 2,
        total: steps,
        decay: Decay::Cosine,
    }
}

fn values(vars: &[Var]) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

/// Five steps of LoRA training (dropout 0.1, two micro-batches per step): losses and adapters.
fn train_lora() -> (Vec<f64>, Vec<Vec<f32>>) {
    let base = Trainable::init(LlamaConfig::tiny(), 0.05, 3).unwrap();
    let mut model = base.model.clone();
    let params = lora::attach(&mut model, &lora_cfg(0.1), 5).unwrap();
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    assert!(
        applies(&model, &vars),
        "LoRA training takes the own backward"
    );
    let cfg = TrainConfig {
        steps: 5,
        batch: 3,
        accumulate: 2,
        schedule: schedule(5),
        adamw: AdamWConfig::default(),
        clip: Some(1.0),
        eval_every: 0,
        eval_sequences: 0,
        loss_scale: Default::default(),
    };
    let tokens: Vec<u32> = (0..600u32).map(|i| (i * i + 7 * i) % 113).collect();
    let mut data = Sequences::new(tokens, 30, 2).unwrap();
    let mut tr = Trainer::new(Trainable { model, params }, cfg).unwrap();
    let logs = tr
        .run(&mut data, None, usize::MAX, &mut |_, _, _| true)
        .unwrap();
    (logs.iter().map(|l| l.loss).collect(), values(&vars))
}

fn pair(k: u32) -> TokenPair {
    let prompt: Vec<u32> = (0..5).map(|i| (k * 7 + i * 3) % 60 + 1).collect();
    let mk = |resp: Vec<u32>| {
        let ids: Vec<u32> = prompt.iter().copied().chain(resp).collect();
        let mask: Vec<u32> = (0..ids.len())
            .map(|j| u32::from(j >= prompt.len()))
            .collect();
        (ids, mask)
    };
    TokenPair {
        chosen: mk((0..(k % 3 + 3)).map(|i| 100 + i).collect()),
        rejected: mk(vec![103, 102, 101, 100]),
    }
}

/// Six steps of DPO with LoRA (dropout 0.1; pairs of unequal lengths, so padding): losses and
/// adapters.
fn dpo_lora() -> (Vec<f64>, Vec<Vec<f32>>) {
    let base = Trainable::init(LlamaConfig::tiny(), 0.05, 11).unwrap();
    let mut policy = base.model.clone();
    let train = PrefData::new(&base.model, (0..12).map(pair).collect(), 0).unwrap();
    let vars: Vec<Var> = lora::attach(&mut policy, &lora_cfg(0.1), 2)
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert!(
        applies(&policy, &vars),
        "DPO with LoRA takes the own backward"
    );
    let dc = DpoConfig {
        beta: 0.1,
        steps: 6,
        batch: 4,
        schedule: schedule(6),
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
        clip: Some(1.0),
        eval_every: 0,
        seed: 1,
        loss_scale: Default::default(),
    };
    let logs = dpo::train(&policy, vars.clone(), &train, None, &dc, 0, &mut |_| {}).unwrap();
    (logs.iter().map(|l| l.train.loss).collect(), values(&vars))
}

fn assert_same(what: &str, own: &(Vec<f64>, Vec<Vec<f32>>), auto: &(Vec<f64>, Vec<Vec<f32>>)) {
    assert_eq!(own.0.len(), auto.0.len());
    for (step, (a, b)) in own.0.iter().zip(&auto.0).enumerate() {
        assert!(
            (a - b).abs() < LOSS_TOL,
            "{what}, step {step}: loss {a} vs autograd {b}"
        );
    }
    // The adapters moved, and to the same place.
    let moved = own.1.iter().flatten().any(|&x| x != 0.0);
    assert!(moved, "{what}: the adapters did not train");
    for (i, (a, b)) in own.1.iter().zip(&auto.1).enumerate() {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            err <= WEIGHT_REL_TOL * scale.max(1e-6),
            "{what}, adapter tensor {i}: max |Δ| {err} vs scale {scale}"
        );
    }
}

#[test]
fn lora_training_and_dpo_match_the_autograd_path() {
    std::env::remove_var("LMKIT_TRAIN_AUTOGRAD");
    let (train_own, dpo_own) = (train_lora(), dpo_lora());
    std::env::set_var("LMKIT_TRAIN_AUTOGRAD", "1");
    let (train_auto, dpo_auto) = (train_lora(), dpo_lora());
    std::env::remove_var("LMKIT_TRAIN_AUTOGRAD");
    assert_same("LoRA training", &train_own, &train_auto);
    assert_same("DPO with LoRA", &dpo_own, &dpo_auto);
    // The runs differ from step to step (the check above compares moving numbers).
    assert!(train_own.0.windows(2).any(|w| w[0] != w[1]));
}
