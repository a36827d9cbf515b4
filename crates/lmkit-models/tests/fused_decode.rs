//! Fused decoding (lmkit's CUDA decoding kernels, run here by the CPU emulator of the
//! `cuda-emu` feature) against the reference path: the same logits at every step.

use lmkit_core::{DType, Device, GgmlDType, Tensor};
use lmkit_models::testing::write_tiny_gguf;
use lmkit_models::{load, KvCache, Llama, LlamaConfig, LoadOptions};

mod fused_common;
use fused_common::{compare, compare_models, model, quantized_pair};

/// This binary tests the warp-per-row decoding kernels (`fused_decode_tc.rs` the tensor-core
/// ones, the default from 8 sequences with dense weights and from 4 with blocks): every test
/// turns the tensor cores off, the same value from every thread.
fn warp_kernels() {
    std::env::set_var("LMKIT_DECODE_TC", "0");
}

/// The tiny config with two heads of 64 sharing one kv head (the flash kernels' size).
fn heads_of_64() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 128,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 64,
        ..LlamaConfig::tiny()
    }
}

#[test]
fn f32_steps_match_the_reference_path() {
    warp_kernels();
    let cfg = LlamaConfig::tiny(); // GQA 4/2, head 16
    let m = model(&cfg, DType::F32, false);
    let (d, same) = compare(&m, 1, 5, 6, 0);
    assert!(d < 1e-4, "relative logit difference {d}");
    assert_eq!(same, 1.0);
    // Three sequences at once, and a first step straight from an empty cache.
    let (d, same) = compare(&m, 3, 1, 4, 0);
    assert!(d < 1e-4, "batch 3: {d}");
    assert_eq!(same, 1.0);
}

#[test]
fn bias_wide_heads_and_large_batches() {
    warp_kernels();
    // q/k/v biases (Qwen2), head 64 (two lanes' worth per warp), 18 sequences (two GEMV
    // launches of 16 and 2).
    let cfg = LlamaConfig {
        attention_bias: true,
        ..heads_of_64()
    };
    let m = model(&cfg, DType::F32, true);
    let (d, same) = compare(&m, 18, 3, 2, 0);
    assert!(d < 1e-4, "relative logit difference {d}");
    assert_eq!(same, 1.0);
}

#[test]
fn odd_widths_take_the_scalar_loop() {
    warp_kernels();
    // Rows of 62 and 90 values are no multiple of a 16-byte load: the GEMVs' scalar loop.
    let cfg = LlamaConfig {
        hidden_size: 62,
        intermediate_size: 90,
        ..LlamaConfig::tiny()
    };
    let (d, same) = compare(&model(&cfg, DType::F32, false), 2, 3, 3, 0);
    assert!(d < 1e-4, "f32: {d}");
    assert_eq!(same, 1.0);
    let (d, _) = compare(&model(&cfg, DType::BF16, false), 2, 3, 3, 0);
    assert!(d < 0.05, "bf16: {d}");
}

#[test]
fn quantized_weights_match_their_dequantized_model() {
    warp_kernels();
    // Q8_0, Q4_1 and Q4_0 files (the embedding and tied output layer too): fused decoding reads
    // the blocks themselves, the reference path their dequantized f32 values. A one-token
    // prompt keeps every step on the fused path (a longer prompt would run the quantized
    // reference path, whose 8-bit activations differ).
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::tiny();
    for t in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4_0] {
        let (f, q) = quantized_pair(dir.path(), &cfg, 5, t);
        assert!(q
            .named_weights()
            .iter()
            .all(|(_, w)| w.type_name() != "F32"));
        let (d, same) = compare_models(&f, &q, 3, 1, 6, 0);
        assert!(d < 1e-4, "{t:?}: relative logit difference {d}");
        assert_eq!(same, 1.0, "{t:?}");
    }
}

#[test]
fn scalar_loops_match_too() {
    warp_kernels();
    // Every buffer treated as unaligned: the GEMVs' one-value-at-a-time loops, dense and
    // quantized. (Other tests running meanwhile may take these loops too: same results.)
    let cfg = LlamaConfig::tiny();
    let dir = tempfile::tempdir().unwrap();
    let (f, q) = quantized_pair(dir.path(), &cfg, 6, GgmlDType::Q4_1);
    let (f8, q8) = quantized_pair(dir.path(), &cfg, 6, GgmlDType::Q8_0);
    lmkit_core::launch::Launcher::emu_force_scalar(true);
    let results = [
        compare_models(&f, &q, 2, 1, 3, 0),
        compare_models(&f8, &q8, 2, 1, 3, 0),
        compare(&model(&cfg, DType::BF16, false), 2, 1, 3, 0),
        compare(&f, 2, 2, 3, 0),
    ];
    lmkit_core::launch::Launcher::emu_force_scalar(false);
    for (i, (d, _)) in results.iter().enumerate() {
        let bar = if i == 2 { 0.05 } else { 1e-4 };
        assert!(*d < bar, "case {i}: relative logit difference {d}");
    }
}

#[test]
fn the_slab_grows_during_decoding() {
    warp_kernels();
    // 64 positions at first; the 65th step reallocates, copies the cache and rebuilds the step.
    let m = model(&LlamaConfig::tiny(), DType::F32, false);
    let (d, same) = compare(&m, 2, 60, 8, 0);
    assert!(d < 1e-4, "relative logit difference {d}");
    assert_eq!(same, 1.0);
}

#[test]
fn bf16_steps_track_the_reference_path() {
    warp_kernels();
    // The reference path rounds activations to bf16 between products; the fused path keeps
    // them in f32, so the two differ by bf16 rounding only.
    let m = model(&LlamaConfig::tiny(), DType::BF16, false);
    let (d, same) = compare(&m, 2, 4, 6, 128);
    assert!(d < 0.05, "relative logit difference {d}");
    assert!(same >= 0.85, "argmax agreement {same}");
}

#[test]
fn eviction_and_bad_tokens() {
    warp_kernels();
    let m = model(&LlamaConfig::tiny(), DType::F32, false);
    // Eviction runs on the tensor cache: an empty fused cache turns into one.
    let mut c = m.new_fused_cache().unwrap();
    c.set_policy(std::sync::Arc::new(Window)).unwrap();
    assert!(!c.is_slab());
    let x = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10]], &Device::Cpu).unwrap();
    m.forward_last(&x, &mut c).unwrap();
    assert_eq!(c.entries(), 8);
    let mut c = m.new_fused_cache().unwrap();
    // A token outside the vocabulary is an error, not a kernel's out-of-bounds read.
    let bad = Tensor::new(&[[500u32]], &Device::Cpu).unwrap();
    let e = m.forward_last(&bad, &mut c).unwrap_err().to_string();
    assert!(e.contains("500"), "{e}");
}

/// A window of 8 entries (the policies themselves live in lmkit-generate).
#[derive(Debug)]
struct Window;

impl lmkit_models::KvPolicy for Window {
    fn name(&self) -> String {
        "window 8".into()
    }
    fn capacity(&self, _seen: usize, _planned: usize) -> usize {
        8
    }
    fn evict(&self, head: &lmkit_models::kv_policy::HeadView, n: usize, out: &mut Vec<usize>) {
        lmkit_models::kv_policy::oldest(head.positions, n, out);
    }
}

#[test]
fn the_emulator_rejects_bad_launches() {
    warp_kernels();
    use lmkit_core::launch::{Arg, Launcher};
    let l = Launcher::for_device(&Device::Cpu).unwrap();
    assert!(l.is_emulated());
    let e = l
        .launch("dec_nope", (1, 1), 32, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no emulated kernel `dec_nope`"), "{e}");
    let e = l
        .launch("dec_advance", (1, 1), 32, &[Arg::I32(1)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("takes 2 arguments, got 1"), "{e}");
    let meta = Tensor::new(&[3u32, 7, 9], &Device::Cpu).unwrap();
    let args = [Arg::Ptr(l.ptr(&meta).unwrap()), Arg::I32(3)];
    let e = l
        .launch("dec_advance", (1, 1), 48, &args)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 32"), "{e}");
    // Every position and slot moves on by one.
    l.launch("dec_advance", (1, 1), 64, &args).unwrap();
    assert_eq!(meta.to_vec1::<u32>().unwrap(), [4, 8, 10]);
}

#[test]
fn replaced_layers_are_seen() {
    warp_kernels();
    // The fused view of the weights is kept in the model; replacing a layer drops it.
    let mut m = model(&LlamaConfig::tiny(), DType::F32, false);
    let (d, _) = compare(&m, 1, 2, 2, 0);
    assert!(d < 1e-4, "before: {d}");
    m.update_linears(|name, l| {
        if !name.ends_with("mlp.up_proj") {
            return Ok(None);
        }
        let lmkit_core::linear::Weight::Dense(w) = l.weight() else {
            return Ok(None);
        };
        Ok(Some(lmkit_core::Linear::dense((w * 3.0)?, None)?))
    })
    .unwrap();
    let (d, same) = compare(&m, 1, 2, 2, 0);
    assert!(d < 1e-4, "after: {d}");
    assert_eq!(same, 1.0);
}

#[test]
fn a_prompt_after_fused_steps_reads_their_cache() {
    warp_kernels();
    // A chat's next turn: decoded tokens (written by the fused kernels) and then a prompt of
    // several tokens (the reference path over the same slab), then decoding again.
    let m = model(&LlamaConfig::tiny(), DType::F32, false);
    let mut reference = m.new_reference_cache();
    let mut fused = m.new_fused_cache().unwrap();
    let step = |ids: &[u32], cache: &mut KvCache| -> Vec<f32> {
        let x = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
        m.forward_last(&x, cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let turns: [&[u32]; 6] = [&[3, 9, 27], &[5], &[8], &[40, 41, 42, 43], &[7], &[11]];
    for ids in turns {
        let (a, b) = (step(ids, &mut reference), step(ids, &mut fused));
        let scale = a.iter().fold(0f32, |s, v| s.max(v.abs()));
        let d = a
            .iter()
            .zip(&b)
            .fold(0f32, |s, (p, q)| s.max((p - q).abs()));
        assert!(d / scale < 1e-4, "after {} tokens: {d}", fused.len());
    }
    assert_eq!(fused.len(), 11);
    // Rewinding (regeneration) keeps the slab and overwrites the dropped positions.
    reference.truncate(8).unwrap();
    fused.truncate(8).unwrap();
    let (a, b) = (step(&[13], &mut reference), step(&[13], &mut fused));
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |s, (p, q)| s.max((p - q).abs()));
    assert!(
        d < 1e-4 * a.iter().fold(0f32, |s, v| s.max(v.abs())),
        "after truncate: {d}"
    );
}

#[test]
fn long_caches_and_wide_heads() {
    warp_kernels();
    // Heads of 128 and 256 (four and eight values per lane in the attention's output) over
    // 130+ cached positions: three blocks of 64 merged, the last one partly filled.
    for (d, heads, kv) in [(128, 2, 1), (256, 2, 2)] {
        let cfg = LlamaConfig {
            hidden_size: 128,
            intermediate_size: 96,
            num_layers: 1,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: d,
            ..LlamaConfig::tiny()
        };
        let (diff, same) = compare(&model(&cfg, DType::F32, false), 1, 130, 3, 0);
        assert!(diff < 1e-4, "head {d}: relative logit difference {diff}");
        assert_eq!(same, 1.0);
    }
}

#[test]
fn a_cache_in_use_sees_replaced_layers() {
    warp_kernels();
    // The same caches before and after a layer changes: the fused step is rebuilt on the new
    // weights, as the reference path reads them.
    let mut m = model(&LlamaConfig::tiny(), DType::F32, false);
    let mut reference = m.new_reference_cache();
    let mut fused = m.new_fused_cache().unwrap();
    let run = |m: &Llama, id: u32, c: &mut KvCache| -> Vec<f32> {
        let x = Tensor::new(&[[id]], &Device::Cpu).unwrap();
        m.forward_last(&x, c)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for id in [1, 2, 3] {
        run(&m, id, &mut reference);
        run(&m, id, &mut fused);
    }
    m.update_linears(|name, l| {
        let lmkit_core::linear::Weight::Dense(w) = l.weight() else {
            return Ok(None);
        };
        match name.ends_with("mlp.down_proj") {
            true => Ok(Some(lmkit_core::Linear::dense((w * -2.0)?, None)?)),
            false => Ok(None),
        }
    })
    .unwrap();
    let (a, b) = (run(&m, 4, &mut reference), run(&m, 4, &mut fused));
    let scale = a.iter().fold(0f32, |s, v| s.max(v.abs()));
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |s, (p, q)| s.max((p - q).abs()));
    assert!(d / scale < 1e-4, "after the update: {d}");
}

/// Turns of `b` sequences (prompts of several tokens after cached ones, and single tokens)
/// through the f32 model `truth` (reference path) and the bf16 model `m` on the reference path
/// and on the fused one: the largest logit difference to f32, relative to the largest logit,
/// of the reference bf16 path and of the fused one, and between the two bf16 paths on the
/// first turn (a prompt on an empty cache: fused decoding steps keep f32 activations between
/// the products, so the caches differ after them).
fn against_f32(truth: &Llama, m: &Llama, b: usize, turns: &[&[u32]]) -> (f32, f32, f32) {
    let mut tc = truth.new_reference_cache();
    let mut rc = m.new_reference_cache();
    let mut fc = m.new_fused_cache().unwrap();
    let logits = |model: &Llama, ids: &[u32], cache: &mut KvCache| -> Vec<Vec<f32>> {
        let x = Tensor::from_vec(ids.repeat(b), (b, ids.len()), &Device::Cpu).unwrap();
        let l = model.forward_last(&x, cache).unwrap();
        l.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
    };
    let (mut r_err, mut f_err, mut rf) = (0f32, 0f32, 0f32);
    for (turn, ids) in turns.iter().enumerate() {
        let t = logits(truth, ids, &mut tc);
        let r = logits(m, ids, &mut rc);
        let f = logits(m, ids, &mut fc);
        for ((t, r), f) in t.iter().zip(&r).zip(&f) {
            let scale = t.iter().fold(0f32, |s, v| s.max(v.abs()));
            let d = |a: &[f32]| a.iter().zip(t).fold(0f32, |s, (p, q)| s.max((p - q).abs()));
            assert!(d(f).is_finite(), "non-finite logits");
            r_err = r_err.max(d(r) / scale);
            f_err = f_err.max(d(f) / scale);
            if turn == 0 {
                let between = r.iter().zip(f).fold(0f32, |s, (p, q)| s.max((p - q).abs()));
                rf = rf.max(between / scale);
            }
        }
    }
    assert_eq!(fc.len(), tc.len());
    (r_err, f_err, rf)
}

#[test]
fn bf16_prompts_take_the_fused_pass() {
    warp_kernels();
    // Heads of 64 with GQA and q/k/v biases, and heads of 128: prompts run the fused prompt
    // pass (flash attention over the slab). On a prompt both bf16 paths round in the same
    // places (the products' inputs and outputs, the biased q/k/v after RoPE, SiLU·up, the
    // unnormalized attention probabilities of 64-key tiles; scores, softmax sums, norms and
    // the residual stream in f32): their logits agree to f32's rounding, not bf16's.
    let long: Vec<u32> = (0..50).map(|i| (i * 7 + 3) % 128).collect();
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 128).collect();
    for (d, kv, bias) in [(64, 1, true), (128, 2, false), (128, 1, false)] {
        let cfg = LlamaConfig {
            hidden_size: 2 * d,
            num_heads: 2,
            num_kv_heads: kv,
            head_dim: d,
            attention_bias: bias,
            ..LlamaConfig::tiny()
        };
        let (truth, m) = (
            model(&cfg, DType::F32, bias),
            model(&cfg, DType::BF16, bias),
        );
        assert!(m.fused_prompt_applies());
        // A prompt of 40 (ending mid-tile) for two sequences, then decoding from its cache;
        // then prompts after cached positions (the kernels' offset), across tiles and a slab
        // that grows (64 positions at first).
        let turns: [&[u32]; 8] = [
            &prompt,
            &[5],
            &[8],
            &long,
            &[7],
            &[40, 41, 42, 43, 44],
            &[11],
            &[2],
        ];
        let (r, f, rf) = against_f32(&truth, &m, 2, &turns);
        assert!(
            f <= 1.5 * r + 0.005,
            "head {d}: fused bf16 is {f} from f32, candle's bf16 {r}"
        );
        assert!(
            rf <= 0.02 * r.min(f),
            "head {d}: the bf16 paths are {rf} apart on a prompt, {r} and {f} from f32"
        );
    }
    // f32, or heads of 16: candle's ops.
    assert!(!model(&LlamaConfig::tiny(), DType::BF16, false).fused_prompt_applies());
    let cfg = heads_of_64();
    assert!(!model(&cfg, DType::F32, false).fused_prompt_applies());
}

#[test]
fn quantized_files_take_the_fused_prompt_pass_through_a_stacked_copy() {
    warp_kernels();
    // A Q8_0 file computing in bf16: its prompts read one stacked bf16 copy of q/k/v and of
    // gate/up (dequantized once); the same file dequantized to a dense bf16 model reads its
    // own tensors, one product each. Same weights, same math: the logits agree to bf16's
    // rounding of the products' outputs.
    let dir = tempfile::tempdir().unwrap();
    let cfg = heads_of_64();
    let p = dir.path().join("q8.gguf");
    write_tiny_gguf(&p, &cfg, 5, GgmlDType::Q8_0).unwrap();
    let bf16 = |dequantize: bool| {
        let opts = LoadOptions {
            dtype: Some(DType::BF16),
            dequantize,
        };
        load(&p, opts).unwrap().model
    };
    let (q, dense) = (bf16(false), bf16(true));
    assert!(q.fused_prompt_applies() && dense.fused_prompt_applies());
    let ids: Vec<u32> = (0..2 * 37).map(|i| (i * 11 + 1) % 128).collect();
    let x = Tensor::from_vec(ids, (2, 37), &Device::Cpu).unwrap();
    let run = |m: &Llama| -> Vec<Vec<f32>> {
        let mut cache = m.new_fused_cache().unwrap();
        let l = m.forward_last(&x, &mut cache).unwrap();
        l.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
    };
    let (a, b) = (run(&q), run(&dense));
    for (ra, rb) in a.iter().zip(&b) {
        let scale = rb.iter().fold(0f32, |s, v| s.max(v.abs()));
        let d = ra
            .iter()
            .zip(rb)
            .fold(0f32, |s, (p, q)| s.max((p - q).abs()));
        assert!(d / scale < 0.02, "stacked vs own weights: {}", d / scale);
    }
}
