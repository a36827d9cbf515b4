//! KV-cache eviction on the native path (tiny random models): a budget that never binds changes
//! nothing; a one-layer model under a sliding window equals a fresh cache over the window (its
//! keys depend only on token and position); H2O's accumulated attention is normalized, the same
//! whether the prompt runs at once or token by token, and its cache stays within the budget.

use std::sync::Arc;

use lmkit_core::testing::max_abs_diff;
use lmkit_core::{Device, GgmlDType, Tensor};
use lmkit_generate::h2o::H2o;
use lmkit_generate::kv::{policy, Budget, SlidingWindow};
use lmkit_models::testing::write_tiny_gguf;
use lmkit_models::{load, KvCache, Llama, LlamaConfig, LoadOptions};

fn ids(t: usize) -> Vec<u32> {
    (0..t as u32).map(|i| (i * 37 + 11) % 100).collect()
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn tiny(dir: &std::path::Path, layers: usize) -> Llama {
    let p = dir.join(format!("tiny{layers}.gguf"));
    let cfg = LlamaConfig {
        num_layers: layers,
        ..LlamaConfig::tiny()
    };
    write_tiny_gguf(&p, &cfg, 7, GgmlDType::F32).unwrap();
    let m = load(&p, LoadOptions::default()).unwrap().model;
    assert!(m.is_native());
    m
}

/// Last-position logits after each token, fed one at a time.
fn stream(m: &Llama, cache: &mut KvCache, ids: &[u32]) -> Vec<Vec<f32>> {
    ids.iter()
        .map(|&id| {
            m.forward_last(&row(&[id]), cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    let a = Tensor::new(a, &Device::Cpu).unwrap();
    let b = Tensor::new(b, &Device::Cpu).unwrap();
    max_abs_diff(&a, &b).unwrap()
}

#[test]
fn a_budget_that_never_binds_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path(), 2);
    let x = ids(40);
    let full = stream(&m, &mut m.new_cache(), &x);
    for p in [
        policy("h2o", Budget::Tokens(40), 0.5).unwrap(),
        policy("window", Budget::Tokens(64), 0.5).unwrap(),
        policy("h2o", Budget::Ratio(1.0), 0.5).unwrap(),
    ] {
        let mut c = m.new_cache();
        c.set_policy(p.clone()).unwrap();
        let got = stream(&m, &mut c, &x);
        for (a, b) in full.iter().zip(&got) {
            assert_eq!(a, b, "{}", p.name());
        }
        assert_eq!(c.entries(), 40);
        assert_eq!(c.len(), 40);
    }
}

#[test]
fn a_one_layer_window_equals_a_fresh_cache_over_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path(), 1);
    let x = ids(48);
    let w = 10;
    let mut c = m.new_cache();
    c.set_policy(Arc::new(SlidingWindow {
        budget: Budget::Tokens(w),
    }))
    .unwrap();
    let got = stream(&m, &mut c, &x);
    let full = stream(&m, &mut m.new_cache(), &x);
    for i in 0..x.len() {
        // Step i attends to the w entries kept after step i−1 and itself.
        let start = i.saturating_sub(w);
        let mut fresh = m.new_cache();
        fresh.start_at(start).unwrap();
        let want = m
            .forward_last(&row(&x[start..=i]), &mut fresh)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let d = max_diff(&got[i], &want);
        assert!(d < 1e-4, "step {i}: {d}");
        if i > w + 2 {
            assert!(
                max_diff(&got[i], &full[i]) > 1e-3,
                "step {i} ignored the window"
            );
        }
    }
    assert_eq!(c.entries(), w);
    assert_eq!(c.len(), x.len());
}

#[test]
fn h2o_scores_are_normalized_and_the_same_for_prefill_and_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path(), 2);
    let cfg = m.config().clone();
    let g = cfg.num_heads / cfg.num_kv_heads;
    let x = ids(30);
    let never = || {
        Arc::new(H2o {
            budget: Budget::Tokens(1000),
            recent: 0.5,
        })
    };
    let mut one = m.new_cache();
    one.set_policy(never()).unwrap();
    stream(&m, &mut one, &x);
    let mut all = m.new_cache();
    all.set_policy(never()).unwrap();
    m.forward_last(&row(&x), &mut all).unwrap();
    for l in 0..cfg.num_layers {
        for h in 0..cfg.num_kv_heads {
            let (p1, s1) = one.head_scores(l, h).unwrap();
            let (p2, s2) = all.head_scores(l, h).unwrap();
            assert_eq!(p1, (0..30).collect::<Vec<u32>>());
            assert_eq!(p1, p2);
            // Every query's row sums to 1 over the g query heads of the group.
            let total: f32 = s1.iter().sum();
            assert!((total - (30 * g) as f32).abs() < 1e-3, "{total}");
            // The last position is seen by one query per head only; the first by all.
            assert!(s1[0] > s1[29]);
            let d = max_diff(&s1, &s2);
            assert!(d < 1e-4, "layer {l} head {h}: {d}");
        }
    }
}

#[test]
fn h2o_stays_within_its_budget_and_keeps_the_recent_window() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path(), 2);
    let cfg = m.config().clone();
    let x = ids(120);
    let mut c = m.new_cache();
    c.set_policy(Arc::new(H2o {
        budget: Budget::Tokens(16),
        recent: 0.5,
    }))
    .unwrap();
    let got = stream(&m, &mut c, &x);
    assert!(got.iter().flatten().all(|v| v.is_finite()));
    assert_eq!(c.entries(), 16);
    assert_eq!(c.len(), 120);
    let (now, peak) = c.kv_bytes();
    let per_entry = 2 * 4 * cfg.head_dim * cfg.num_kv_heads * cfg.num_layers;
    // Keys are stored in blocks of 16 positions: 17 entries take two blocks.
    assert!(now <= 16 * per_entry, "{now}");
    assert!(peak <= 32 * per_entry, "{peak}");
    let mut heavy = Vec::new();
    for l in 0..cfg.num_layers {
        for h in 0..cfg.num_kv_heads {
            let (pos, _) = c.head_scores(l, h).unwrap();
            for p in 112..120 {
                assert!(
                    pos.contains(&p),
                    "layer {l} head {h} lost recent position {p}"
                );
            }
            let mut old: Vec<u32> = pos.into_iter().filter(|&p| p < 112).collect();
            old.sort();
            assert_eq!(old.len(), 8);
            heavy.push(old);
        }
    }
    // Each head chooses its own heavy hitters.
    assert!(heavy.windows(2).any(|w| w[0] != w[1]), "{heavy:?}");
    // A policy is set before the first token only.
    assert!(c
        .set_policy(policy("window", Budget::Tokens(4), 0.5).unwrap())
        .is_err());
    // Rewinding past evicted entries keeps the cache usable.
    c.truncate(100).unwrap();
    assert_eq!(c.len(), 100);
    assert!(c.entries() <= 16);
    let again = stream(&m, &mut c, &x[100..110]);
    assert!(again.iter().flatten().all(|v| v.is_finite()));
}

/// The reference path (candle tensors: the GPU's path) under H2O keeps the entries the native
/// path keeps and gives the same logits: a prompt at once, then token by token past the budget,
/// then a rewind and more tokens.
#[test]
fn h2o_on_the_reference_path_matches_the_native_path() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path(), 2);
    let cfg = m.config().clone();
    let x = ids(70);
    let h2o = || {
        Arc::new(H2o {
            budget: Budget::Tokens(16),
            recent: 0.5,
        })
    };
    let mut native = m.new_cache();
    native.set_policy(h2o()).unwrap();
    let mut reference = m.new_reference_cache();
    reference.set_policy(h2o()).unwrap();
    assert!(!reference.is_native());
    let mut worst = 0f32;
    let mut compare = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        for (u, v) in a.iter().zip(b) {
            worst = worst.max(max_diff(u, v));
        }
    };
    let first = |c: &mut KvCache| {
        let l = m.forward_last(&row(&x[..12]), c).unwrap();
        vec![l.flatten_all().unwrap().to_vec1::<f32>().unwrap()]
    };
    compare(&first(&mut native), &first(&mut reference));
    compare(
        &stream(&m, &mut native, &x[12..60]),
        &stream(&m, &mut reference, &x[12..60]),
    );
    for c in [&native, &reference] {
        assert_eq!((c.entries(), c.len()), (16, 60));
    }
    for l in 0..cfg.num_layers {
        for h in 0..cfg.num_kv_heads {
            let (mut p1, _) = native.head_scores(l, h).unwrap();
            let (mut p2, s2) = reference.head_scores(l, h).unwrap();
            p1.sort();
            p2.sort();
            assert_eq!(p1, p2, "layer {l} head {h}");
            assert_eq!(s2.len(), 16);
        }
    }
    native.truncate(55).unwrap();
    reference.truncate(55).unwrap();
    assert_eq!(native.entries(), reference.entries());
    compare(
        &stream(&m, &mut native, &x[55..70]),
        &stream(&m, &mut reference, &x[55..70]),
    );
    assert!(worst < 1e-3, "logits differ by {worst}");
    // A batch is refused under a policy; a full cache takes one.
    let mut r = m.new_reference_cache();
    r.set_policy(h2o()).unwrap();
    let two = Tensor::new(&[[1u32, 2], [3, 4]], &Device::Cpu).unwrap();
    let e = m.forward_last(&two, &mut r).unwrap_err().to_string();
    assert!(e.contains("one sequence"), "{e}");
}

#[test]
fn a_batched_call_equals_one_call_per_sequence() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [GgmlDType::F32, GgmlDType::Q4_1] {
        let p = dir.path().join(format!("b{dtype:?}.gguf"));
        write_tiny_gguf(&p, &LlamaConfig::tiny(), 3, dtype).unwrap();
        let m = load(&p, LoadOptions::default()).unwrap().model;
        // Three sequences with different cached lengths; one is mid-prompt (5 tokens at once),
        // one under H2O.
        let prompts = [ids(7), ids(19), ids(3)];
        let next: [Vec<u32>; 3] = [vec![5], vec![9, 8, 7, 6, 5], vec![42]];
        let mut solo: Vec<KvCache> = (0..3).map(|_| m.new_cache()).collect();
        let mut batch: Vec<KvCache> = (0..3).map(|_| m.new_cache()).collect();
        let h2o = || {
            Arc::new(H2o {
                budget: Budget::Tokens(12),
                recent: 0.5,
            })
        };
        solo[1].set_policy(h2o()).unwrap();
        batch[1].set_policy(h2o()).unwrap();
        let mut want = Vec::new();
        for (k, c) in solo.iter_mut().enumerate() {
            m.forward_last(&row(&prompts[k]), c).unwrap();
            let l = m.forward_last(&row(&next[k]), c).unwrap();
            want.push(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        // The prompts go in together too, then the next tokens.
        let mut refs: Vec<&mut KvCache> = batch.iter_mut().collect();
        let p: Vec<&[u32]> = prompts.iter().map(|v| v.as_slice()).collect();
        m.forward_batch_last(&p, &mut refs).unwrap();
        let n: Vec<&[u32]> = next.iter().map(|v| v.as_slice()).collect();
        let got = m.forward_batch_last(&n, &mut refs).unwrap();
        let range = want[0].iter().fold(0f32, |a, &x| a.max(x.abs()));
        for k in 0..3 {
            let d = max_diff(&got[k], &want[k]);
            // 8-bit activations may round a boundary value differently in a bigger batch.
            let tol = if dtype == GgmlDType::F32 {
                1e-4
            } else {
                0.02 * range
            };
            assert!(d <= tol, "{dtype:?} sequence {k}: {d}");
        }
        for k in 0..3 {
            assert_eq!(batch[k].len(), solo[k].len());
            assert_eq!(batch[k].entries(), solo[k].entries());
        }
        assert_eq!(batch[1].entries(), 12);
        // Bad calls: clear errors.
        let mut two: Vec<&mut KvCache> = batch.iter_mut().take(2).collect();
        assert!(m.forward_batch_last(&n, &mut two).is_err());
        let empty: [&[u32]; 2] = [&[], &[1]];
        assert!(m.forward_batch_last(&empty, &mut two).is_err());
        let mut r = m.new_reference_cache();
        let mut one: Vec<&mut KvCache> = vec![&mut r];
        assert!(m.forward_batch_last(&n[..1], &mut one).is_err());
    }
}

#[test]
fn a_share_budget_resolves_against_the_planned_length() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path(), 2);
    let x = ids(100);
    let mut c = m.new_cache();
    c.set_policy(policy("h2o", Budget::Ratio(0.2), 0.5).unwrap())
        .unwrap();
    c.plan(100);
    // Nothing is evicted until the cache holds 20% of the planned 100 tokens.
    stream(&m, &mut c, &x[..20]);
    assert_eq!(c.entries(), 20);
    for l in 0..2 {
        assert!(c.head_scores(l, 0).unwrap().0.contains(&0));
    }
    stream(&m, &mut c, &x[20..]);
    assert_eq!(c.entries(), 20);
    // Past its plan the sequence keeps 20% of what it has seen.
    stream(&m, &mut c, &ids(50));
    assert_eq!(c.entries(), 30);
}
