//! lmkit's own CPU backward (`body_cpu`) against PyTorch's gradients (the fixture of
//! `scripts/fixtures/make_grad_fixture.py`) and against candle's autograd path on the shapes
//! the fixture does not cover (untied head, q/k/v biases, a loss mask).

use std::path::PathBuf;

use lmkit_core::candle::safetensors;
use lmkit_core::{DType, Device, Tensor};
use lmkit_models::{open_source, LlamaConfig, WeightSource};
use lmkit_train::body_cpu::loss_and_grads;
use lmkit_train::trainer::loss_masked;
use lmkit_train::Trainable;

mod common;

use common::{ids, lora_model, random};

type Res = Result<(), Box<dyn std::error::Error>>;

/// Each gradient, relative to its largest entry.
const GRAD_REL_TOL: f32 = 1e-4;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny_llama_grads")
}

/// Largest |a − b| over the largest |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<(f32, f32), Box<dyn std::error::Error>> {
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    Ok((err, scale))
}

#[test]
fn matches_pytorch_gradients() -> Res {
    let dir = fixture();
    let cfg = match open_source(&dir)? {
        WeightSource::Hf(h) => LlamaConfig::from_hf(&h.config, &dir)?,
        _ => panic!("fixture is an HF folder"),
    };
    let weights = safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let want = safetensors::load(dir.join("grads.safetensors"), &Device::Cpu)?;
    let t = Trainable::from_tensors(cfg, weights)?;
    let batch: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("batch.json"))?)?;
    let ids: Vec<Vec<u32>> = serde_json::from_value(batch["input_ids"].clone())?;
    let ids = Tensor::new(ids, &Device::Cpu)?;

    let (l, grads) = loss_and_grads(&t, &ids, None)?.expect("the native path applies");
    let got = l.to_scalar::<f32>()? as f64;
    let want_loss = batch["loss"].as_f64().unwrap_or(f64::NAN);
    assert!(
        (got - want_loss).abs() < 1e-5,
        "loss {got} vs PyTorch {want_loss}"
    );
    assert_eq!(t.params.len(), want.len());
    for (name, var) in &t.params {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let (err, scale) = rel_err(g, &want[name])?;
        assert!(scale > 0.0, "{name}: zero reference gradient");
        assert!(
            err <= GRAD_REL_TOL * scale,
            "{name}: max |Δgrad| {err} vs scale {scale}"
        );
    }
    Ok(())
}

/// The own path's loss and gradients of every variable of `t` against candle's autograd (the
/// path must apply); returns the own path's gradients.
fn same_as_autograd(
    t: &Trainable,
    ids: &Tensor,
    mask: Option<&Tensor>,
    what: &str,
) -> Result<lmkit_core::candle::backprop::GradStore, Box<dyn std::error::Error>> {
    let (l, got) = loss_and_grads(t, ids, mask)?.expect("the native path applies");
    let lw = loss_masked(&t.model, ids, mask)?;
    let want = lw.backward()?;
    let (a, b) = (l.to_scalar::<f32>()?, lw.to_scalar::<f32>()?);
    assert!((a - b).abs() < 1e-5, "{what}: loss {a} vs autograd {b}");
    for (name, var) in &t.params {
        let g = got.get(var.as_tensor()).expect("a gradient");
        let w = want.get(var.as_tensor()).expect("a reference gradient");
        let (err, scale) = rel_err(g, w)?;
        assert!(scale > 0.0, "{what}: {name}: zero gradient");
        assert!(
            err <= GRAD_REL_TOL * scale,
            "{what}: {name}: {err} vs scale {scale}"
        );
    }
    Ok(got)
}

#[test]
fn matches_the_autograd_path() -> Res {
    let mut cfg = LlamaConfig::tiny();
    cfg.tie_word_embeddings = false;
    cfg.attention_bias = true;
    cfg.num_heads = 4;
    cfg.num_kv_heads = 1; // a group of 4 query heads per kv head
    let t = random(cfg.clone(), 3)?;
    // 19 targets (one block of query rows), and 150 (three, the last partial).
    for (b, t1) in [(3, 20), (2, 151)] {
        let ids = ids(&cfg, b, t1)?;
        let mask: Vec<f32> = (0..b * (t1 - 1))
            .map(|i| ((i % 5) != 1) as u8 as f32)
            .collect();
        let mask = Tensor::from_vec(mask, (b, t1 - 1), &Device::Cpu)?;
        for mask in [None, Some(&mask)] {
            same_as_autograd(&t, &ids, mask, &format!("t {t1}"))?;
        }
    }
    Ok(())
}

#[test]
fn other_models_take_the_autograd_path_and_bad_ids_are_refused() -> Res {
    let cfg = LlamaConfig::tiny();
    let t = random(cfg.clone(), 5)?;
    // bf16 compute: not this path.
    let low = t.to_device(&Device::Cpu, DType::BF16)?;
    assert!(loss_and_grads(&low, &ids(&cfg, 1, 8)?, None)?.is_none());
    // Out of the vocabulary as an input, and as a target only.
    for bad in [[1u32, 128, 2], [1, 2, 128]] {
        let bad = Tensor::from_vec(bad.to_vec(), (1, 3), &Device::Cpu)?;
        let Err(e) = loss_and_grads(&t, &bad, None) else {
            panic!("an error")
        };
        let e = e.to_string();
        assert!(e.contains("128") && e.contains("outside"), "{e}");
    }
    let long = ids(&cfg, 1, cfg.max_position_embeddings + 2)?;
    let Err(e) = loss_and_grads(&t, &long, None) else {
        panic!("an error")
    };
    assert!(e.to_string().contains("context"), "{e}");
    Ok(())
}

#[test]
fn lora_matches_the_autograd_path() -> Res {
    let mut cfg = LlamaConfig::tiny();
    cfg.attention_bias = true; // frozen biases
    cfg.num_heads = 4;
    cfg.num_kv_heads = 2;
    let all = common::ALL_TARGETS;
    // Every layer kind with dropout; and an adapter on the last block only (the backward
    // stops there).
    for (targets, dropout) in [(&all[..], 0.2), (&["1.self_attn.v_proj"][..], 0.0)] {
        let t = lora_model(&cfg, targets, dropout, DType::F32)?;
        let (b, t1) = (2, 40);
        let ids = ids(&cfg, b, t1)?;
        let mask: Vec<f32> = (0..b * (t1 - 1))
            .map(|i| (i % 3 != 0) as u8 as f32)
            .collect();
        let mask = Tensor::from_vec(mask, (b, t1 - 1), &Device::Cpu)?;
        let got = same_as_autograd(&t, &ids, Some(&mask), targets[0])?;
        assert_eq!(
            t.params.len(),
            2 * targets.len() * if targets.len() > 1 { 2 } else { 1 }
        );
        // The frozen base gets no gradient.
        for (name, w) in t.model.named_weights() {
            if let lmkit_core::linear::Weight::Dense(w) = w {
                assert!(got.get(w).is_none(), "{name} got a gradient");
            }
        }
    }
    Ok(())
}
