//! Tiny random models (2 layers, hidden 64, vocab 128): loading, caching and format paths.

use std::collections::HashMap;

use lmkit_core::testing::max_abs_diff;
use lmkit_core::{Device, GgmlDType, Tensor};
use lmkit_formats::gguf::{GgufFile, Value};
use lmkit_models::testing::{random_weights, write_tiny_gguf};
use lmkit_models::{load, LlamaConfig, LoadOptions};

/// Incremental decoding with the KV cache vs one full forward pass (f32 weights).
const CACHE_TOL: f32 = 1e-4;
/// The same weights read from GGUF (permuted q/k) and from an HF folder.
const FORMAT_TOL: f32 = 1e-4;
/// Q8_0 weights vs F32 weights, relative to the logit range.
const Q8_REL_TOL: f32 = 0.05;

fn ids(t: usize) -> Vec<u32> {
    (0..t as u32).map(|i| (i * 37 + 11) % 100).collect()
}

fn logits(m: &lmkit_models::Llama, ids: &[u32]) -> Tensor {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&x, &mut m.new_cache())
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// The logits of `ids` from a `prefill`-token forward pass, then one token at a time through
/// the KV cache (which must end up holding every position).
fn incremental_logits(m: &lmkit_models::Llama, ids: &[u32], prefill: usize) -> Tensor {
    let mut cache = m.new_cache();
    let x = Tensor::new(&ids[..prefill], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut rows = vec![m.forward(&x, &mut cache).unwrap().squeeze(0).unwrap()];
    for &id in &ids[prefill..] {
        let x = Tensor::new(&[id], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        rows.push(m.forward(&x, &mut cache).unwrap().squeeze(0).unwrap());
    }
    assert_eq!(cache.len(), ids.len());
    Tensor::cat(&rows, 0).unwrap()
}

#[test]
fn gguf_round_trip_keeps_metadata_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    let cfg = LlamaConfig::tiny();
    write_tiny_gguf(&p, &cfg, 1, GgmlDType::F32).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get("llama.block_count"), Some(&Value::U32(2)));
    let norm = g.tensor_f32("output_norm.weight", &Device::Cpu).unwrap();
    assert_eq!(norm.to_vec1::<f32>().unwrap(), vec![1.0; 64]);
    let emb = g.tensor_info("token_embd.weight").unwrap();
    assert_eq!(emb.shape(), vec![128, 64]);
    assert_eq!(LlamaConfig::from_gguf(&g).unwrap(), cfg);
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, &LlamaConfig::tiny(), 2, GgmlDType::F32).unwrap();
    let m = load(&p, LoadOptions::default()).unwrap().model;
    let ids = ids(20);
    let full = logits(&m, &ids);
    // A 12-token prefill, then one token at a time.
    let inc = incremental_logits(&m, &ids, 12);
    let d = max_abs_diff(&full, &inc).unwrap();
    assert!(d < CACHE_TOL, "incremental vs full: {d}");
    // And the logits are not degenerate.
    let spread = full
        .max_keepdim(1)
        .unwrap()
        .sub(&full.min_keepdim(1).unwrap())
        .unwrap();
    assert!(spread.min(0).unwrap().to_vec1::<f32>().unwrap()[0] > 0.1);
}

#[test]
fn hf_folder_and_gguf_give_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::tiny();
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, &cfg, 3, GgmlDType::F32).unwrap();
    let from_gguf = load(&p, LoadOptions::default()).unwrap();

    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    let tensors: HashMap<String, Tensor> = random_weights(&cfg, 3)
        .into_iter()
        .map(|(n, s, v)| (n, Tensor::from_vec(v, s, &Device::Cpu).unwrap()))
        .collect();
    lmkit_core::candle::safetensors::save(&tensors, hf.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1.52587890625e-05, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": true
    });
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    from_gguf
        .tokenizer
        .tokenizer
        .save(hf.join("tokenizer.json"), false)
        .unwrap();
    let from_hf = load(&hf, LoadOptions::default()).unwrap();
    assert_eq!(from_hf.model.config(), from_gguf.model.config());
    let text = "the cat ran in 2024";
    let a = from_gguf.tokenizer.encode(text).unwrap();
    assert_eq!(a, from_hf.tokenizer.encode(text).unwrap());
    let d = max_abs_diff(&logits(&from_gguf.model, &a), &logits(&from_hf.model, &a)).unwrap();
    assert!(d < FORMAT_TOL, "gguf vs hf: {d}");
}

/// The model at `path` with every weight dequantized to f32 at load (the reference path).
fn load_dequantized(path: &std::path::Path) -> lmkit_models::Llama {
    let opts = LoadOptions {
        dequantize: true,
        ..Default::default()
    };
    load(path, opts).unwrap().model
}

/// The storage type of every weight matrix.
fn weight_types(m: &lmkit_models::Llama) -> Vec<String> {
    m.named_weights()
        .iter()
        .map(|(_, w)| w.type_name())
        .collect()
}

/// `max |a|`.
fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max |a − b|` relative to `max |a|`.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b).unwrap() / max_abs(a)
}

#[test]
fn quantized_weights_track_f32_and_dequantize_matches() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::tiny();
    let (pf, pq) = (dir.path().join("f32.gguf"), dir.path().join("q8.gguf"));
    write_tiny_gguf(&pf, &cfg, 4, GgmlDType::F32).unwrap();
    write_tiny_gguf(&pq, &cfg, 4, GgmlDType::Q8_0).unwrap();
    let f = load(&pf, LoadOptions::default()).unwrap().model;
    let q = load(&pq, LoadOptions::default()).unwrap().model;
    let dq = load_dequantized(&pq);
    assert!(q
        .named_weights()
        .iter()
        .any(|(_, w)| w.type_name() == "Q8_0"));
    assert!(dq
        .named_weights()
        .iter()
        .all(|(_, w)| w.type_name() == "F32"));
    let ids = ids(16);
    let (lf, lq, ld) = (logits(&f, &ids), logits(&q, &ids), logits(&dq, &ids));
    let dq_err = rel_err(&lf, &lq);
    assert!(dq_err < Q8_REL_TOL, "q8 vs f32 relative error {dq_err}");
    let d2 = max_abs_diff(&lq, &ld).unwrap() / max_abs(&lf);
    assert!(d2 < Q8_REL_TOL, "q8 kernel vs dequantized: {d2}");
}

/// `Q4_K`, `Q5_K` and `Q6_K` weights run through lmkit's own kernels, exact (no conversion): against
/// the same file dequantized to f32, only the 8-bit activations differ, for a prompt and for
/// decoding one token at a time. K-quant rows are whole 256-weight super-blocks, so the model
/// is wider.
#[test]
fn k_quant_weights_run_native_and_track_the_dequantized_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig {
        hidden_size: 256,
        intermediate_size: 512,
        head_dim: 64,
        ..LlamaConfig::tiny()
    };
    for (dtype, name) in [
        (GgmlDType::Q4K, "Q4_K"),
        (GgmlDType::Q5K, "Q5_K"),
        (GgmlDType::Q6K, "Q6_K"),
    ] {
        let p = dir.path().join(format!("{name}.gguf"));
        write_tiny_gguf(&p, &cfg, 8, dtype).unwrap();
        let q = load(&p, LoadOptions::default()).unwrap().model;
        let dq = load_dequantized(&p);
        let types = weight_types(&q);
        assert!(types.iter().all(|t| t == name || t == "F32"), "{types:?}");
        assert!(
            types.iter().filter(|t| *t == name).count() >= 15,
            "{types:?}"
        );
        let ids = ids(16);
        let (lq, ld) = (logits(&q, &ids), logits(&dq, &ids));
        let err = rel_err(&ld, &lq);
        assert!(err < Q8_REL_TOL, "{name} kernel vs dequantized: {err}");
        // Decoding the last four tokens one at a time gives the same rows.
        let inc = incremental_logits(&q, &ids, 12);
        let err = rel_err(&ld, &inc);
        assert!(err < Q8_REL_TOL, "{name} decoding vs dequantized: {err}");
    }
}

/// F16 and BF16 weights (kept in half precision, lmkit's dense kernel for short inputs, the f32
/// GEMM for long ones) vs the same weights in F32, relative to the logit range: f16 keeps 11
/// significant bits, bf16 8.
const F16_REL_TOL: f32 = 2e-3;
const BF16_REL_TOL: f32 = 1.5e-2;

#[test]
fn half_precision_weights_stay_half_and_track_f32() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::tiny();
    let pf = dir.path().join("f32.gguf");
    write_tiny_gguf(&pf, &cfg, 6, GgmlDType::F32).unwrap();
    let f = load(&pf, LoadOptions::default()).unwrap().model;
    for (dtype, name, tol) in [
        (GgmlDType::F16, "F16", F16_REL_TOL),
        (GgmlDType::BF16, "BF16", BF16_REL_TOL),
    ] {
        let ph = dir.path().join(format!("{name}.gguf"));
        write_tiny_gguf(&ph, &cfg, 6, dtype).unwrap();
        let h = load(&ph, LoadOptions::default()).unwrap().model;
        let types = weight_types(&h);
        assert!(types.iter().all(|t| t == name), "{name}: {types:?}");
        // 3 tokens take the dense kernel, 24 the f32 GEMM path.
        for t in [3, 24] {
            let ids = ids(t);
            let err = rel_err(&logits(&f, &ids), &logits(&h, &ids));
            assert!(err < tol, "{name}, {t} tokens: relative error {err} vs f32");
        }
    }
}

#[test]
fn hf_half_precision_weights_stay_half() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::tiny();
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, &cfg, 3, GgmlDType::F32).unwrap();
    let from_gguf = load(&p, LoadOptions::default()).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1.52587890625e-05, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": true
    });
    for (dtype, name, tol) in [
        (lmkit_core::DType::BF16, "BF16", BF16_REL_TOL),
        (lmkit_core::DType::F16, "F16", F16_REL_TOL),
    ] {
        let hf = dir.path().join(name);
        std::fs::create_dir(&hf).unwrap();
        let tensors: HashMap<String, Tensor> = random_weights(&cfg, 3)
            .into_iter()
            .map(|(n, s, v)| {
                let t = Tensor::from_vec(v, s, &Device::Cpu).unwrap();
                (n, t.to_dtype(dtype).unwrap())
            })
            .collect();
        lmkit_core::candle::safetensors::save(&tensors, hf.join("model.safetensors")).unwrap();
        std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
        from_gguf
            .tokenizer
            .tokenizer
            .save(hf.join("tokenizer.json"), false)
            .unwrap();
        // A missing matrix is named.
        let mut partial = tensors.clone();
        partial.remove("model.layers.1.mlp.up_proj.weight");
        lmkit_core::candle::safetensors::save(&partial, hf.join("model.safetensors")).unwrap();
        let e = load(&hf, LoadOptions::default()).err().unwrap().to_string();
        assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");
        lmkit_core::candle::safetensors::save(&tensors, hf.join("model.safetensors")).unwrap();
        let half = load(&hf, LoadOptions::default()).unwrap().model;
        let types = weight_types(&half);
        assert!(types.iter().all(|t| t == name), "{name}: {types:?}");
        let exact = load_dequantized(&hf);
        assert!(weight_types(&exact).iter().all(|t| t == "F32"));
        for t in [3, 24] {
            let ids = ids(t);
            let (lh, le) = (logits(&half, &ids), logits(&exact, &ids));
            // The same stored values either way: only the order of f32 sums differs.
            let same = rel_err(&le, &lh);
            assert!(
                same < 1e-5,
                "{name}, {t} tokens: kernel vs widened weights {same}"
            );
            let err = rel_err(&logits(&from_gguf.model, &ids), &lh);
            assert!(err < tol, "{name}, {t} tokens: relative error {err} vs f32");
        }
    }
}

#[test]
fn out_of_range_tokens_and_context_overflow_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, &LlamaConfig::tiny(), 5, GgmlDType::F32).unwrap();
    let m = load(&p, LoadOptions::default()).unwrap().model;
    let x = Tensor::new(&[1u32, 500], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let e = m.forward(&x, &mut m.new_cache()).unwrap_err().to_string();
    assert!(e.contains("500") && e.contains("vocabulary"), "{e}");
    let long: Vec<u32> = vec![3; 257];
    let x = Tensor::new(long.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let e = m.forward(&x, &mut m.new_cache()).unwrap_err().to_string();
    assert!(e.contains("257") && e.contains("context length 256"), "{e}");
}
