//! The GPU training path (`body_gpu`) run on the CPU emulator of its kernels (`cuda-emu`),
//! against lmkit's CPU backward (`body_cpu`, itself checked against PyTorch's gradients): f32
//! to the last bits that reordered sums allow, bf16 within its rounding, and only the
//! gradients of what trains.

use std::collections::HashMap;

use lmkit_core::candle::backprop::GradStore;
use lmkit_core::candle::Var;
use lmkit_core::launch::Launcher;
use lmkit_core::{DType, Device, Tensor};
use lmkit_models::LlamaConfig;
use lmkit_train::body_gpu::Attention;
use lmkit_train::{body_cpu, body_gpu, Trainable};

mod common;

use common::{ids, lora_model, lora_model_stored, random};

type Res = Result<(), Box<dyn std::error::Error>>;
type Out = Result<(Tensor, GradStore), Box<dyn std::error::Error>>;

fn emulated(t: &Trainable, ids: &Tensor, mask: Option<&Tensor>) -> Out {
    emulated_with(t, ids, mask, Attention::Auto)
}

fn emulated_with(t: &Trainable, ids: &Tensor, mask: Option<&Tensor>, attn: Attention) -> Out {
    let out = body_gpu::loss_and_grads_with(t, ids, mask, Launcher::Emu, attn)?;
    Ok(out.expect("the GPU path applies"))
}

fn reference(t: &Trainable, ids: &Tensor, mask: Option<&Tensor>) -> Out {
    Ok(body_cpu::loss_and_grads(t, ids, mask)?.expect("the CPU path applies"))
}

/// ‖a − b‖ / ‖b‖ and max |a − b| / max |b|.
fn errors(a: &Tensor, b: &Tensor) -> Result<(f32, f32), Box<dyn std::error::Error>> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a.len(), b.len());
    let (mut dd, mut bb, mut dm, mut bm) = (0f64, 0f64, 0f32, 0f32);
    for (x, y) in a.iter().zip(&b) {
        dd += ((x - y) as f64).powi(2);
        bb += (*y as f64).powi(2);
        dm = dm.max((x - y).abs());
        bm = bm.max(y.abs());
    }
    assert!(bm > 0.0, "a zero reference gradient");
    Ok(((dd / bb).sqrt() as f32, dm / bm))
}

/// Every parameter of `t` has a gradient in both stores, within `tol` (largest difference
/// over the largest entry, and relative norm).
fn same_grads(t: &Trainable, got: &GradStore, want: &GradStore, tol: f32, what: &str) -> Res {
    for (name, var) in &t.params {
        let g = got
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: {name} received no gradient"));
        let w = want.get(var.as_tensor()).expect("a reference gradient");
        assert_eq!(g.dtype(), DType::F32, "{what}: {name}");
        let (norm, max) = errors(g, w)?;
        assert!(
            norm <= tol && max <= 4.0 * tol,
            "{what}: {name}: relative error {norm} (max {max})"
        );
    }
    Ok(())
}

#[test]
fn f32_matches_the_cpu_path() -> Res {
    // GQA with groups of 4 and of 2, q/k/v biases, tied and untied heads, and a loss mask.
    let mut gqa = LlamaConfig::tiny();
    gqa.tie_word_embeddings = false;
    gqa.attention_bias = true;
    gqa.num_kv_heads = 1;
    for (cfg, b, t1) in [(LlamaConfig::tiny(), 2, 17), (gqa, 3, 40)] {
        let t = random(cfg.clone(), 3)?;
        let ids = ids(&cfg, b, t1)?;
        let mask: Vec<f32> = (0..b * (t1 - 1))
            .map(|i| ((i % 5) != 1) as u8 as f32)
            .collect();
        let mask = Tensor::from_vec(mask, (b, t1 - 1), &Device::Cpu)?;
        for mask in [None, Some(&mask)] {
            let what = format!("b {b}, t {t1}, mask {}", mask.is_some());
            let (l, got) = emulated(&t, &ids, mask)?;
            let (lw, want) = reference(&t, &ids, mask)?;
            let (l, lw) = (l.to_scalar::<f32>()?, lw.to_scalar::<f32>()?);
            assert!((l - lw).abs() < 1e-5, "{what}: loss {l} vs {lw}");
            same_grads(&t, &got, &want, 2e-5, &what)?;
        }
    }
    Ok(())
}

#[test]
fn bf16_is_within_its_rounding_of_f32() -> Res {
    let cfg = LlamaConfig::tiny();
    let t = random(cfg.clone(), 7)?;
    let ids = ids(&cfg, 2, 33)?;
    let (lw, want) = reference(&t, &ids, None)?;
    let low = t.to_device(&Device::Cpu, DType::BF16)?;
    let (l, got) = emulated(&low, &ids, None)?;
    let (l, lw) = (l.to_scalar::<f32>()?, lw.to_scalar::<f32>()?);
    assert!((l - lw).abs() < 1e-2 * lw.abs(), "loss {l} vs f32 {lw}");
    // The variables of `low` are other tensors than those of `t`: match them by name.
    let by_name: HashMap<&str, &Var> = low.params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    for (name, var) in &t.params {
        let g = got
            .get(by_name[name.as_str()].as_tensor())
            .expect("a gradient");
        let w = want.get(var.as_tensor()).expect("a reference gradient");
        let (norm, _) = errors(g, w)?;
        assert!(norm < 0.03, "{name}: relative error {norm} in bf16");
    }
    Ok(())
}

/// f16's small gradients flush to zero: with the loss scaled by 2¹⁶ (the trainer's dynamic
/// loss scale starts there) and the gradients divided back in f32, f16 is within its rounding of
/// f32; without, the deepest gradients lose most of their bits.
#[test]
fn f16_needs_the_loss_scale() -> Res {
    // A realistic gradient scale: initialized with std 0.02, a vocabulary of 8,192, 256
    // targets, so that ∂z = (p − onehot)/256 is ~5e-7 (f16's smallest normal is 6e-5).
    let mut cfg = LlamaConfig::tiny();
    cfg.vocab_size = 8192;
    let t = Trainable::init(cfg.clone(), 0.02, 5)?;
    let ids = ids(&cfg, 4, 65)?;
    let (lw, want) = reference(&t, &ids, None)?;
    let lw = lw.to_scalar::<f32>()?;
    let low = t.to_device(&Device::Cpu, DType::F16)?;
    let by_name: HashMap<&str, &Var> = low.params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut worst = [0f32; 2];
    for (k, scale) in [1.0, 65536.0].into_iter().enumerate() {
        let run = (Launcher::Emu, Attention::Auto);
        let out = body_gpu::loss_and_grads_scaled(&low, &ids, None, run, scale)?;
        let (l, got) = out.expect("the GPU path applies");
        let l = l.to_scalar::<f32>()? / scale as f32;
        assert!(
            (l - lw).abs() < 1e-2 * lw.abs(),
            "scale {scale}: loss {l} vs f32 {lw}"
        );
        for (name, var) in &t.params {
            let g = got
                .get(by_name[name.as_str()].as_tensor())
                .expect("a gradient");
            let g = (g / scale)?;
            let w = want.get(var.as_tensor()).expect("a reference gradient");
            let (norm, _) = errors(&g, w)?;
            worst[k] = worst[k].max(norm);
        }
    }
    assert!(
        worst[1] < 0.004,
        "scaled f16: relative error up to {}",
        worst[1]
    );
    assert!(
        worst[0] > 5.0 * worst[1],
        "unscaled f16 {} vs scaled {}",
        worst[0],
        worst[1]
    );
    Ok(())
}

#[test]
fn only_what_trains_gets_a_gradient() -> Res {
    let cfg = LlamaConfig::tiny();
    let t = random(cfg.clone(), 11)?;
    let ids = ids(&cfg, 2, 12)?;
    let (_, want) = reference(&t, &ids, None)?;
    // Block 1 only (and the final norm): no gradient below it, and the backward stops there.
    let part = Trainable {
        model: t.model.clone(),
        params: t
            .params
            .iter()
            .filter(|(n, _)| n.starts_with("model.layers.1.") || n == "model.norm.weight")
            .cloned()
            .collect(),
    };
    let (_, got) = emulated(&part, &ids, None)?;
    same_grads(&part, &got, &want, 2e-5, "block 1")?;
    for (name, var) in &t.params {
        let trained = part.params.iter().any(|(n, _)| n == name);
        assert_eq!(
            got.get(var.as_tensor()).is_some(),
            trained,
            "{name}: a gradient iff it trains"
        );
    }
    Ok(())
}

#[test]
fn bad_inputs_are_refused_and_other_models_are_not_taken() -> Res {
    let cfg = LlamaConfig::tiny();
    let t = random(cfg.clone(), 5)?;
    for bad in [[1u32, 128, 2], [1, 2, 128]] {
        let bad = Tensor::from_vec(bad.to_vec(), (1, 3), &Device::Cpu)?;
        let Err(e) = body_gpu::loss_and_grads_with(&t, &bad, None, Launcher::Emu, Attention::Auto)
        else {
            panic!("an error")
        };
        let e = e.to_string();
        assert!(e.contains("128"), "{e}");
    }
    let long = ids(&cfg, 1, cfg.max_position_embeddings + 2)?;
    let Err(e) = body_gpu::loss_and_grads_with(&t, &long, None, Launcher::Emu, Attention::Auto)
    else {
        panic!("an error")
    };
    assert!(e.to_string().contains("context"), "{e}");
    // On the CPU the trainer never takes this path (only on a GPU).
    let vars: Vec<Var> = t.params.iter().map(|(_, v)| v.clone()).collect();
    assert!(body_gpu::applies(&t.model, &vars) && !body_gpu::wanted(&t.model, &vars));
    // Weights stored in bf16 (not f32 master weights) are not this path's.
    let plain: HashMap<String, Tensor> = t
        .params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    let opts = lmkit_models::LoadOptions {
        dtype: Some(DType::BF16),
        ..Default::default()
    };
    let src = lmkit_models::WeightSource::Map(plain);
    let stored = lmkit_models::Llama::load(cfg.clone(), &src, opts, &Device::Cpu)?;
    let vars: Vec<Var> = t.params.iter().map(|(_, v)| v.clone()).collect();
    assert!(!body_gpu::applies(&stored, &vars));
    Ok(())
}

/// A model with heads of `d` (64 or 128: the flash kernels' sizes), `kv` kv heads of 2.
fn flash_config(d: usize, kv: usize) -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny();
    cfg.num_heads = 2;
    cfg.num_kv_heads = kv;
    cfg.head_dim = d;
    cfg.hidden_size = 2 * d;
    cfg.num_layers = 1;
    cfg
}

#[test]
fn flash_attention_matches_the_materialized_path() -> Res {
    // Heads of 64 with GQA (one kv head for two), sequences that end mid-tile (40) and that
    // span several query and key tiles of 64 (70, 130); heads of 128 (backward tiles of 32),
    // with and without GQA.
    for (d, kv, b, t1) in [
        (64, 1, 2, 41),
        (64, 1, 1, 71),
        (64, 2, 1, 131),
        (128, 2, 1, 46),
        (128, 1, 1, 40),
    ] {
        let cfg = flash_config(d, kv);
        let t = random(cfg.clone(), 13)?;
        let ids = ids(&cfg, b, t1)?;
        let (lw, want) = reference(&t, &ids, None)?;
        let low = t.to_device(&Device::Cpu, DType::BF16)?;
        let (lf, flash) = emulated_with(&low, &ids, None, Attention::Flash)?;
        let (lm, mat) = emulated_with(&low, &ids, None, Attention::Materialized)?;
        let (lw, lf, lm) = (
            lw.to_scalar::<f32>()?,
            lf.to_scalar::<f32>()?,
            lm.to_scalar::<f32>()?,
        );
        let what = format!("d {d}, kv {kv}, b {b}, t {}", t1 - 1);
        assert!(
            (lf - lm).abs() < 2e-3 * lm.abs(),
            "{what}: loss {lf} flash, {lm} materialized"
        );
        assert!(
            (lf - lw).abs() < 1e-2 * lw.abs(),
            "{what}: loss {lf} flash, {lw} f32"
        );
        let by_name: HashMap<&str, &Var> =
            low.params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        for (name, var) in &t.params {
            let low_var = by_name[name.as_str()].as_tensor();
            let f = flash.get(low_var).expect("a gradient");
            let m = mat.get(low_var).expect("a gradient");
            let w = want.get(var.as_tensor()).expect("a reference gradient");
            let (to_mat, _) = errors(f, m)?;
            let (to_f32, _) = errors(f, w)?;
            let (mat_to_f32, _) = errors(m, w)?;
            // As close to f32 as the materialized bf16 path is (within bf16's rounding).
            assert!(
                to_f32 <= 1.5 * mat_to_f32 + 0.005 && to_mat < 0.03,
                "{what}: {name}: flash vs f32 {to_f32} (materialized {mat_to_f32}), \
                 vs materialized {to_mat}"
            );
        }
    }
    Ok(())
}

#[test]
fn flash_tiles_load_the_same_without_16_byte_loads() -> Res {
    // Every buffer treated as unaligned: the tiles go to shared memory one value at a time
    // (also transposed), and the gradients must be the same bits. f16 with heads of 128 too.
    for (d, dtype) in [(64, DType::BF16), (128, DType::F16)] {
        let cfg = flash_config(d, 1);
        let t = random(cfg.clone(), 5)?.to_device(&Device::Cpu, dtype)?;
        let ids = ids(&cfg, 1, 75)?;
        let (l1, vector) = emulated_with(&t, &ids, None, Attention::Flash)?;
        Launcher::emu_force_scalar(true);
        let scalar = emulated_with(&t, &ids, None, Attention::Flash);
        Launcher::emu_force_scalar(false);
        let (l2, scalar) = scalar?;
        assert_eq!(l1.to_scalar::<f32>()?, l2.to_scalar::<f32>()?, "head {d}");
        for (name, var) in &t.params {
            let (a, b) = (vector.get(var.as_tensor()), scalar.get(var.as_tensor()));
            let (a, b) = (a.expect("a gradient"), b.expect("a gradient"));
            let (rel, _) = errors(a, b)?;
            assert!(rel == 0.0, "head {d}: {name}: {rel}");
        }
    }
    Ok(())
}

#[test]
fn flash_attention_refuses_what_it_does_not_take() -> Res {
    let cfg = flash_config(64, 1);
    let t = random(cfg.clone(), 1)?;
    let ids = ids(&cfg, 1, 9)?;
    // f32 compute, and heads of 16.
    let Err(e) = emulated_with(&t, &ids, None, Attention::Flash) else {
        panic!("an error")
    };
    assert!(e.to_string().contains("flash"), "{e}");
    let small = random(LlamaConfig::tiny(), 1)?.to_device(&Device::Cpu, DType::BF16)?;
    assert!(emulated_with(&small, &ids, None, Attention::Flash).is_err());
    assert!(body_gpu::flash_applies(DType::BF16, 64) && !body_gpu::flash_applies(DType::F32, 64));
    // Auto takes flash where its kernels exist (the emulator has them all); a launcher without
    // a kernel answers no (a GPU older than sm_80 lacks the flash kernels).
    let low = t.to_device(&Device::Cpu, DType::BF16)?;
    assert!(body_gpu::uses_flash(&low.model) && !body_gpu::uses_flash(&t.model));
    let emu = Launcher::for_device(&Device::Cpu).expect("the emulator");
    assert!(emu.has_kernel("tr_flash_bwd_q_128_f16") && emu.has_kernel("dec_advance"));
    assert!(!emu.has_kernel("tr_flash_fwd_32_bf16") && !emu.has_kernel(""));
    Ok(())
}

#[test]
fn lora_on_a_base_stored_in_bf16() -> Res {
    // The base's matrices stored in bf16 (as `lmkit train --lora` loads them on a GPU) take
    // this path too, with no cast of the frozen weights: the adapters' gradients are those of
    // an f32 base cast to bf16 per step, but for the embedding's rounding to bf16 (3% here).
    let cfg = LlamaConfig::tiny();
    let ids = ids(&cfg, 2, 19)?;
    let all = common::ALL_TARGETS;
    let f32_base = lora_model(&cfg, &all, 0.1, DType::BF16)?;
    let bf16_base = lora_model_stored(&cfg, &all, 0.1, DType::BF16, DType::BF16)?;
    let vars: Vec<Var> = bf16_base.params.iter().map(|(_, v)| v.clone()).collect();
    assert!(body_gpu::applies(&bf16_base.model, &vars));
    let (l1, want) = emulated(&f32_base, &ids, None)?;
    let (l2, got) = emulated(&bf16_base, &ids, None)?;
    let (l1, l2) = (l1.to_scalar::<f32>()?, l2.to_scalar::<f32>()?);
    assert!((l1 - l2).abs() < 2e-3 * l1.abs(), "loss {l2} vs {l1}");
    for ((name, a), (_, b)) in bf16_base.params.iter().zip(&f32_base.params) {
        let g = got.get(a.as_tensor()).expect("a gradient");
        let w = want.get(b.as_tensor()).expect("a gradient");
        let (norm, _) = errors(g, w)?;
        assert!(norm < 0.05, "{name}: {norm} from the f32 base's");
    }
    Ok(())
}

#[test]
fn lora_adapters_match_the_cpu_path() -> Res {
    let mut cfg = LlamaConfig::tiny();
    cfg.attention_bias = true;
    let all = common::ALL_TARGETS;
    let ids = ids(&cfg, 2, 19)?;
    // Every layer, with and without dropout; then only some (stacked products with zero
    // columns for the others).
    for (targets, dropout) in [
        (&all[..], 0.0),
        (&all[..], 0.1),
        (&["k_proj", "up_proj"][..], 0.1),
    ] {
        let t = lora_model(&cfg, targets, dropout, DType::F32)?;
        let what = format!("{targets:?}, dropout {dropout}");
        let (l, got) = emulated(&t, &ids, None)?;
        let (lw, want) = reference(&t, &ids, None)?;
        let (l, lw) = (l.to_scalar::<f32>()?, lw.to_scalar::<f32>()?);
        assert!((l - lw).abs() < 1e-5, "{what}: loss {l} vs {lw}");
        same_grads(&t, &got, &want, 2e-5, &what)?;
        // Nothing of the base model gets a gradient.
        for (n, w) in t.model.named_weights() {
            if let lmkit_core::linear::Weight::Dense(w) = w {
                assert!(got.get(w).is_none(), "{what}: {n} got a gradient");
            }
        }
    }
    // bf16 compute (f32 adapters as master weights): within bf16's rounding of f32.
    let f32_model = lora_model(&cfg, &all, 0.1, DType::F32)?;
    let (_, want) = reference(&f32_model, &ids, None)?;
    let low = lora_model(&cfg, &all, 0.1, DType::BF16)?;
    let (_, got) = emulated(&low, &ids, None)?;
    for ((name, lv), (_, fv)) in low.params.iter().zip(&f32_model.params) {
        let g = got.get(lv.as_tensor()).expect("a gradient");
        let w = want.get(fv.as_tensor());
        let Some(w) = w else {
            panic!("{name}: no reference gradient")
        };
        let (norm, _) = errors(g, w)?;
        assert!(norm < 0.05, "{name}: bf16 relative error {norm}");
    }
    Ok(())
}

/// Both RMSNorm backward kernels against the formula, f64 on the host: a warp per row for
/// rows of up to 1,024 (`tr_rms_bwd_w1..4`: 16-byte loads where c is a multiple of 8, with a
/// last group partly past the row at 1,000; one value at a time at 40), a block per row beyond
/// (`tr_rms_bwd`), each with the gradient added into `dx` and the compute-dtype copy; 300 rows
/// make 38 partial sums of `dw` per column, over two column blocks of `tr_colsum`, and 4,500
/// rows take a second turn of some warps (512 blocks of eight).
#[test]
fn rms_backward_kernels_match_the_formula() -> Res {
    let dev = Device::Cpu;
    let eps = 1e-5f32;
    for (rows, c) in [
        (37usize, 96usize),
        (300, 40),
        (5, 1000),
        (3, 1100),
        (70, 768),
        (4500, 16),
        (9, 264),
    ] {
        let vals = |n: usize, k: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 * k).sin() + 0.1) * 1.3).collect()
        };
        let (xv, gv, wv, d0) = (
            vals(rows * c, 0.37),
            vals(rows * c, 0.11),
            vals(c, 0.53),
            vals(rows * c, 0.29),
        );
        let x = Tensor::from_vec(xv.clone(), (rows, c), &dev)?;
        let g = Tensor::from_vec(gv.clone(), (rows, c), &dev)?;
        let w = Tensor::from_vec(wv.clone(), c, &dev)?;
        let dx = Tensor::from_vec(d0.clone(), (rows, c), &dev)?;
        let ops = lmkit_core::block_ops::BlockOps::new(Launcher::Emu, DType::F32, &dev)?;
        let (lp, dw) = ops.rms_bwd(&x, &w, &g, &dx, true, eps)?;
        let (got_dx, got_lp) = (
            dx.flatten_all()?.to_vec1::<f32>()?,
            lp.flatten_all()?.to_vec1::<f32>()?,
        );
        let got_dw = dw.to_vec1::<f32>()?;
        let mut want_dw = vec![0f64; c];
        for r in 0..rows {
            let row = |v: &[f32], j: usize| v[r * c + j] as f64;
            let ss: f64 = (0..c).map(|j| row(&xv, j).powi(2)).sum::<f64>() / c as f64;
            let inv = 1.0 / (ss + eps as f64).sqrt();
            let dot: f64 = (0..c)
                .map(|j| row(&xv, j) * inv * row(&gv, j) * wv[j] as f64)
                .sum::<f64>()
                / c as f64;
            for j in 0..c {
                let xh = row(&xv, j) * inv;
                let want = inv * (row(&gv, j) * wv[j] as f64 - xh * dot) + row(&d0, j);
                let i = r * c + j;
                assert!(
                    (got_dx[i] as f64 - want).abs() < 1e-4,
                    "dx {rows}x{c} [{i}]: {} vs {want}",
                    got_dx[i]
                );
                assert_eq!(
                    got_lp[i], got_dx[i],
                    "the compute-dtype copy {rows}x{c} [{i}]"
                );
                want_dw[j] += row(&gv, j) * xh;
            }
        }
        for j in 0..c {
            let (a, b) = (got_dw[j] as f64, want_dw[j]);
            assert!(
                (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                "dw {rows}x{c} [{j}]: {a} vs {b}"
            );
        }
    }
    Ok(())
}
