//! GGUF export: a model written by `save_gguf` loads back with the same logits (exactly for
//! f32, closely for f16/q8_0), with the same tokenizer, from a GGUF or an HF-keyed source.

use lmkit_core::{Device, GgmlDType, Tensor};
use lmkit_models::export::{export_type, save_gguf};
use lmkit_models::testing::write_tiny_gguf;
use lmkit_models::{load, LlamaConfig, LoadOptions};

fn logits(m: &lmkit_models::LoadedModel, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = m.model.new_reference_cache();
    m.model
        .forward(&x, &mut cache)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn exported_gguf_reloads_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.gguf");
    write_tiny_gguf(&src, &LlamaConfig::tiny(), 5, GgmlDType::F32).unwrap();
    let opts = LoadOptions {
        dequantize: true,
        ..Default::default()
    };
    let m = load(&src, opts).unwrap();
    let ids = m.tokenizer.encode("the cat sat on the mat").unwrap();
    let want = logits(&m, &ids);
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (ty, tol) in [("f32", 0.0), ("f16", 2e-2), ("q8_0", 5e-2), ("bf16", 1e-1)] {
        let out = dir.path().join(format!("out-{ty}.gguf"));
        save_gguf(&out, &m.model, &m.tokenizer, export_type(ty).unwrap()).unwrap();
        let back = load(&out, opts).unwrap();
        assert_eq!(
            back.tokenizer.encode("the cat sat on the mat").unwrap(),
            ids,
            "{ty}"
        );
        assert_eq!(back.model.config().num_heads, m.model.config().num_heads);
        let d = max_diff(&logits(&back, &ids), &want);
        assert!(d <= tol * scale.max(1.0), "{ty}: max |Δ| {d}");
        if ty != "f32" {
            assert!(
                d > 0.0,
                "{ty}: a lossy type gave identical logits: not re-encoded?"
            );
        }
    }
    assert!(export_type("q3_x").is_err());
}
