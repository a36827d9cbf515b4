//! The native CPU path (lmkit-kernels, one thread team per call) against the reference path
//! (candle ops) on tiny random models, for every weight type with a kernel.

use std::collections::HashMap;

use lmkit_core::testing::max_abs_diff;
use lmkit_core::{Device, GgmlDType, Tensor};
use lmkit_models::testing::{qkv_biases, random_weights, write_tiny_gguf};
use lmkit_models::{load, Llama, LlamaConfig, LoadOptions};

/// Native vs reference logits, f32/f16 weights: the same math in another summation order.
const FLOAT_TOL: f32 = 2e-4;
/// Native vs reference with 8-bit activations: an activation that lands on a rounding
/// boundary may round the other way in one path, relative to the logit range.
const QUANT_REL_TOL: f32 = 0.02;

fn ids(t: usize) -> Vec<u32> {
    (0..t as u32).map(|i| (i * 37 + 11) % 100).collect()
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// All-position logits `(t, v)` with the given cache kind.
fn logits(m: &Llama, ids: &[u32], native: bool) -> Tensor {
    let mut cache = if native {
        m.new_cache()
    } else {
        m.new_reference_cache()
    };
    assert_eq!(cache.is_native(), native);
    m.forward(&row(ids), &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

fn range(t: &Tensor) -> f32 {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (lo, hi) = v
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    hi - lo
}

fn tiny(dtype: GgmlDType, dir: &std::path::Path) -> Llama {
    let p = dir.join(format!("{dtype:?}.gguf"));
    write_tiny_gguf(&p, &LlamaConfig::tiny(), 5, dtype).unwrap();
    load(&p, LoadOptions::default()).unwrap().model
}

#[test]
fn native_matches_reference_for_every_kernel_type() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
    ] {
        let m = tiny(dtype, dir.path());
        assert!(m.is_native(), "{dtype:?} has kernels");
        let ids = ids(40);
        let (n, r) = (logits(&m, &ids, true), logits(&m, &ids, false));
        let d = max_abs_diff(&n, &r).unwrap();
        let tol = match dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => FLOAT_TOL,
            _ => QUANT_REL_TOL * range(&r),
        };
        assert!(d < tol, "{dtype:?}: native vs reference {d} (tol {tol})");
        assert!(range(&r) > 0.1, "degenerate logits");
    }
}

#[test]
fn native_decoding_matches_native_prefill_and_forward_last() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [GgmlDType::F32, GgmlDType::Q4_1] {
        let m = tiny(dtype, dir.path());
        let ids = ids(24);
        let full = logits(&m, &ids, true);
        let mut cache = m.new_cache();
        cache.reserve(8); // smaller than needed: the cache must grow
        let mut rows = vec![m
            .forward(&row(&ids[..10]), &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()];
        for &id in &ids[10..] {
            rows.push(
                m.forward(&row(&[id]), &mut cache)
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), 24);
        let inc = Tensor::cat(&rows, 0).unwrap();
        let d = max_abs_diff(&full, &inc).unwrap();
        // Prefill and decode quantize the same activations the same way: equal up to f32 order.
        assert!(d < FLOAT_TOL, "{dtype:?}: incremental vs full {d}");

        // forward_last is the last row of forward; truncating rewinds.
        let mut c2 = m.new_cache();
        let last = m
            .forward_last(&row(&ids), &mut c2)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let want = full.get(23).unwrap();
        assert!(max_abs_diff(&last, &want).unwrap() < FLOAT_TOL);
        c2.truncate(20).unwrap();
        let again = m
            .forward_last(&row(&ids[20..]), &mut c2)
            .unwrap()
            .squeeze(0)
            .unwrap();
        // Same positions, other batch shape (4 tokens vs 24 take different tilings).
        assert!(max_abs_diff(&again, &last).unwrap() < FLOAT_TOL);
    }
}

/// Hidden states of `ids` after a context already in `cache`, the cache cut back after.
fn hidden_after(m: &Llama, cache: &mut lmkit_models::KvCache, ids: &[u32]) -> Tensor {
    let p0 = cache.len();
    let h = m
        .forward_hidden(&row(ids), cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    cache.truncate(p0).unwrap();
    h
}

#[test]
fn a_tree_matches_each_branch_run_alone() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [GgmlDType::F32, GgmlDType::Q4_1] {
        let m = tiny(dtype, dir.path());
        let all = ids(70);
        let (context, trunk) = (&all[..9], &all[9..15]);
        // Lengths across the 4-query attention groups and the 16-position key blocks; one
        // branch longer than the context, one empty.
        let branches: Vec<&[u32]> =
            vec![&all[15..22], &all[22..23], &[], &all[23..42], &all[42..47]];
        for (native, with_trunk) in [(true, true), (true, false), (false, true), (false, false)] {
            let trunk = if with_trunk { trunk } else { &[][..] };
            let mut cache = if native {
                m.new_cache()
            } else {
                m.new_reference_cache()
            };
            m.forward_hidden(&row(context), &mut cache).unwrap();
            let tree = m.forward_tree_hidden(trunk, &branches, &mut cache).unwrap();
            assert_eq!(cache.len(), 9 + trunk.len(), "the cache keeps the trunk");
            // The same rows, each branch run alone after context + trunk.
            let mut alone = vec![];
            let mut c2 = if native {
                m.new_cache()
            } else {
                m.new_reference_cache()
            };
            m.forward_hidden(&row(context), &mut c2).unwrap();
            if !trunk.is_empty() {
                alone.push(hidden_after(&m, &mut c2, trunk));
                m.forward_hidden(&row(trunk), &mut c2).unwrap();
            }
            for b in branches.iter().filter(|b| !b.is_empty()) {
                alone.push(hidden_after(&m, &mut c2, b));
            }
            let alone = Tensor::cat(&alone, 0).unwrap();
            assert_eq!(tree.dims(), &[trunk.len() + 32, m.config().hidden_size]);
            let d = max_abs_diff(&tree, &alone).unwrap();
            assert!(
                d < FLOAT_TOL,
                "{dtype:?} native={native} trunk={with_trunk}: tree vs alone {d}"
            );
        }
        // A branch reaching past the context window is refused and the cache is untouched.
        let mut cache = m.new_cache();
        m.forward_hidden(&row(context), &mut cache).unwrap();
        let long: Vec<u32> = ids(m.config().max_position_embeddings);
        assert!(m.forward_tree_hidden(trunk, &[&long], &mut cache).is_err());
        assert_eq!(cache.len(), 9);
    }
}

#[test]
fn the_output_layer_on_the_team_matches_the_linear_layer() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [GgmlDType::F32, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let m = tiny(dtype, dir.path());
        let h = m
            .forward_hidden(&row(&ids(11)), &mut m.new_cache())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let team = m.logits_of_hidden(&h).unwrap();
        let linear = m.lm_head().forward(&h).unwrap();
        assert_eq!(team.dims(), &[11, m.config().vocab_size]);
        let d = max_abs_diff(&team, &linear).unwrap();
        // Both quantize the activations the same way for quantized heads.
        assert!(d < FLOAT_TOL * range(&linear).max(1.0), "{dtype:?}: {d}");
    }
}

#[test]
fn native_results_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(GgmlDType::Q8_0, dir.path());
    let ids = ids(33);
    let run = |threads: usize| -> Vec<f32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            logits(&m, &ids, true)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
    };
    let one = run(1);
    assert_eq!(one, run(3));
    assert_eq!(one, run(4));
}

#[test]
fn native_applies_qkv_bias() {
    // An HF folder with q/k/v biases (Qwen2 layout), f32 weights.
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::tiny();
    let mut tensors: HashMap<String, Tensor> = random_weights(&cfg, 9)
        .into_iter()
        .map(|(n, s, v)| (n, Tensor::from_vec(v, s, &Device::Cpu).unwrap()))
        .collect();
    for (name, b) in qkv_biases(&cfg) {
        let n = b.len();
        tensors.insert(name, Tensor::from_vec(b, n, &Device::Cpu).unwrap());
    }
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    lmkit_core::candle::safetensors::save(&tensors, hf.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "qwen2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": true
    });
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    let p = dir.path().join("tok.gguf");
    write_tiny_gguf(&p, &cfg, 1, GgmlDType::F32).unwrap();
    load(&p, LoadOptions::default())
        .unwrap()
        .tokenizer
        .tokenizer
        .save(hf.join("tokenizer.json"), false)
        .unwrap();
    let m = load(&hf, LoadOptions::default()).unwrap().model;
    assert!(m.config().attention_bias && m.is_native());
    let ids = ids(17);
    let d = max_abs_diff(&logits(&m, &ids, true), &logits(&m, &ids, false)).unwrap();
    assert!(d < FLOAT_TOL, "with bias: native vs reference {d}");
}

#[test]
fn native_batches_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(GgmlDType::Q8_0, dir.path());
    let x = Tensor::new(&[[1u32, 2], [3, 4]], &Device::Cpu).unwrap();
    let e = m.forward(&x, &mut m.new_cache()).unwrap_err().to_string();
    assert!(e.contains("one sequence"), "{e}");
    // The reference cache takes batches.
    let y = m.forward(&x, &mut m.new_reference_cache()).unwrap();
    assert_eq!(y.dims()[0], 2);
}
