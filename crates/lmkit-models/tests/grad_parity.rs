//! Training gradients against PyTorch: a tiny random Llama (GQA, tied embeddings) with the same
//! weights and batch gives the same loss and the same gradient for every parameter as HF
//! transformers' `LlamaForCausalLM` (fixture: `scripts/fixtures/make_grad_fixture.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use lmkit_core::candle::{safetensors, Var};
use lmkit_core::candle_nn::loss::cross_entropy;
use lmkit_core::{Device, Tensor};
use lmkit_models::{open_source, Llama, LlamaConfig, LoadOptions, WeightSource};

/// Loss, absolute (f32 sums over a few hundred terms).
const LOSS_TOL: f64 = 1e-5;
/// Each gradient, relative to its largest entry.
const GRAD_REL_TOL: f32 = 1e-4;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny_llama_grads")
}

/// Mean next-token cross-entropy of `ids (b, t)` (HF's `labels = input_ids`).
fn loss(m: &Llama, ids: &Tensor) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    let logits = m.forward_train(ids).unwrap(); // (b, t, v)
    let v = logits.dims()[2];
    let pred = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    let target = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    cross_entropy(&pred, &target).unwrap()
}

#[test]
fn loss_and_every_gradient_match_pytorch() {
    let dir = fixture();
    let cfg = match open_source(&dir).unwrap() {
        WeightSource::Hf(h) => LlamaConfig::from_hf(&h.config, &dir).unwrap(),
        _ => panic!("fixture is an HF folder"),
    };
    let weights = safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let want_grads = safetensors::load(dir.join("grads.safetensors"), &Device::Cpu).unwrap();
    let vars: HashMap<String, Var> = weights
        .iter()
        .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let src = WeightSource::Map(
        vars.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect(),
    );
    let m = Llama::load(cfg, &src, LoadOptions::default(), &Device::Cpu).unwrap();

    let batch: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("batch.json")).unwrap()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(batch["input_ids"].clone()).unwrap();
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let l = loss(&m, &ids);
    let got = l.to_scalar::<f32>().unwrap() as f64;
    let want = batch["loss"].as_f64().unwrap();
    assert!(
        (got - want).abs() < LOSS_TOL,
        "loss {got} vs PyTorch {want}"
    );

    let grads = l.backward().unwrap();
    assert_eq!(vars.len(), want_grads.len());
    let mut worst = 0f32;
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = want_grads[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(scale > 0.0, "{name}: zero reference gradient");
        let err = g
            .iter()
            .zip(&w)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(
            err <= GRAD_REL_TOL * scale,
            "{name}: max |Δgrad| {err} vs scale {scale}"
        );
        worst = worst.max(err / scale);
    }
    eprintln!("loss {got} vs {want}; worst relative gradient difference {worst:.2e}");
}
