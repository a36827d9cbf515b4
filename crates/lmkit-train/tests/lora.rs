//! LoRA: a fresh adapter leaves the model unchanged, training moves only the adapters, merging
//! gives the same logits, and PEFT-layout files round-trip.

use lmkit_core::candle::Var;
use lmkit_core::testing::max_abs_diff;
use lmkit_core::{Device, Tensor};
use lmkit_models::LlamaConfig;
use lmkit_train::dpo::sequence_logps;
use lmkit_train::lora::{self, LoraConfig};
use lmkit_train::Trainable;

/// Merged vs unmerged logits (f32 summation order).
const MERGE_TOL: f32 = 1e-4;

fn cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["down_proj".into(), "q_proj".into(), "v_proj".into()],
    }
}

fn ids() -> Tensor {
    Tensor::new(&[[3u32, 17, 42, 9, 88, 5, 61, 23]], &Device::Cpu).unwrap()
}

#[test]
fn adapters_train_merge_and_round_trip() {
    let base = Trainable::init(LlamaConfig::tiny(), 0.05, 7).unwrap();
    let mut m = base.model.clone();
    let before = m.forward_train(&ids()).unwrap();
    let vars = lora::attach(&mut m, &cfg(), 1).unwrap();
    assert_eq!(vars.len(), 2 * 3 * 2); // A and B × 3 targets × 2 layers
    assert!(
        vars[0].0.starts_with("base_model.model.model.layers.0."),
        "{}",
        vars[0].0
    );
    assert!(!m.is_native(), "adapters run on the reference path");
    // B = 0: the adapted model is the base model.
    let d = max_abs_diff(&before, &m.forward_train(&ids()).unwrap()).unwrap();
    assert_eq!(d, 0.0);

    // A few steps of plain gradient descent on the log-likelihood move the adapters only.
    let base_vars: Vec<Var> = base.params.iter().map(|(_, v)| v.clone()).collect();
    let frozen: Vec<Vec<f32>> = base_vars
        .iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let mask = Tensor::ones((1, 8), lmkit_core::DType::U32, &Device::Cpu).unwrap();
    let mut first = None;
    for _ in 0..5 {
        let lp = sequence_logps(&m, &ids(), &mask)
            .unwrap()
            .sum_all()
            .unwrap();
        first.get_or_insert(lp.to_scalar::<f32>().unwrap());
        let g = lp.neg().unwrap().backward().unwrap();
        for (name, v) in &vars {
            let gv = g
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            v.set(&(v.as_tensor() - (gv * 0.05).unwrap()).unwrap())
                .unwrap();
        }
    }
    let lp = sequence_logps(&m, &ids(), &mask)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        lp > first.unwrap() + 0.1,
        "log-likelihood {} -> {lp}",
        first.unwrap()
    );
    for (v, f) in base_vars.iter().zip(&frozen) {
        assert_eq!(
            &v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            f
        );
    }
    let adapted = m.forward_train(&ids()).unwrap();
    assert!(max_abs_diff(&before, &adapted).unwrap() > 1e-3);

    // PEFT layout round trip onto a fresh copy of the base.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    lora::save_peft(&out, &cfg(), "tiny", &vars).unwrap();
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(conf["peft_type"], "LORA");
    assert_eq!(conf["r"], 4);
    let mut fresh = base.model.clone();
    assert_eq!(lora::load_peft(&out, &mut fresh).unwrap(), cfg());
    let d = max_abs_diff(&adapted, &fresh.forward_train(&ids()).unwrap()).unwrap();
    assert!(d < MERGE_TOL, "reloaded adapter: {d}");

    // Merged: same logits, no adapters, native path back.
    lora::merge(&mut fresh).unwrap();
    assert!(fresh.is_native());
    let d = max_abs_diff(&adapted, &fresh.forward_train(&ids()).unwrap()).unwrap();
    assert!(d < MERGE_TOL, "merged: {d}");
}

#[test]
fn bad_lora_options_are_errors() {
    let mut m = Trainable::init(LlamaConfig::tiny(), 0.05, 7).unwrap().model;
    let mut c = cfg();
    c.targets = vec!["nothing".into()];
    assert!(lora::attach(&mut m, &c, 0)
        .unwrap_err()
        .to_string()
        .contains("match no"));
    c = cfg();
    c.r = 0;
    assert!(lora::attach(&mut m, &c, 0).is_err());
    c = cfg();
    c.dropout = 1.0;
    assert!(lora::attach(&mut m, &c, 0)
        .unwrap_err()
        .to_string()
        .contains("dropout"));
}
