//! DPO against TRL: on fixed log-probs, the loss and the reward metrics equal what TRL 1.16's
//! `DPOTrainer` computes (fixture: `scripts/fixtures/make_dpo_fixture.py`); the loss's gradient
//! has the sign DPO intends; sequence log-probs count only completion tokens.

use std::path::PathBuf;

use lmkit_core::candle::Var;
use lmkit_core::{Device, Tensor};
use lmkit_models::LlamaConfig;
use lmkit_train::dpo::{dpo_loss, sequence_logps};
use lmkit_train::Trainable;

/// f32 arithmetic on both sides.
const TOL: f64 = 1e-6;

fn vec(v: &serde_json::Value) -> Tensor {
    let x: Vec<f32> = serde_json::from_value(v.clone()).unwrap();
    Tensor::new(x, &Device::Cpu).unwrap()
}

#[test]
fn loss_and_metrics_match_trl() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dpo_trl.json");
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    for c in f["cases"].as_array().unwrap() {
        let out = dpo_loss(
            &vec(&c["policy_chosen_logps"]),
            &vec(&c["policy_rejected_logps"]),
            &vec(&c["ref_chosen_logps"]),
            &vec(&c["ref_rejected_logps"]),
            c["beta"].as_f64().unwrap(),
        )
        .unwrap();
        let m = &out.metrics;
        for (got, key) in [
            (m.loss, "loss"),
            (m.rewards_chosen, "rewards_chosen"),
            (m.rewards_rejected, "rewards_rejected"),
            (m.rewards_accuracies, "rewards_accuracies"),
            (m.rewards_margins, "rewards_margins"),
        ] {
            let want = c[key].as_f64().unwrap();
            assert!(
                (got - want).abs() < TOL,
                "beta {}: {key} {got} vs TRL {want}",
                c["beta"]
            );
        }
    }
}

#[test]
fn the_gradient_raises_chosen_and_lowers_rejected() {
    let pc = Var::new(&[-5.0f32, -7.0], &Device::Cpu).unwrap();
    let pr = Var::new(&[-6.0f32, -6.5], &Device::Cpu).unwrap();
    let r = Tensor::new(&[-6.0f32, -6.0], &Device::Cpu).unwrap();
    let out = dpo_loss(pc.as_tensor(), pr.as_tensor(), &r, &r, 0.1).unwrap();
    let g = out.loss.backward().unwrap();
    let gc = g.get(pc.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    let gr = g.get(pr.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert!(
        gc.iter().all(|&x| x < 0.0) && gr.iter().all(|&x| x > 0.0),
        "{gc:?} {gr:?}"
    );
    // At the first step the policy is the reference: every margin is exactly 0, and the
    // gradient is torch's, −β σ(0) / n per chosen log-prob (not twice that).
    let pc = Var::new(&[-5.0f32, -7.0], &Device::Cpu).unwrap();
    let pr = Var::new(&[-6.0f32, -6.5], &Device::Cpu).unwrap();
    let out = dpo_loss(
        pc.as_tensor(),
        pr.as_tensor(),
        &pc.as_tensor().detach(),
        &pr.as_tensor().detach(),
        0.1,
    )
    .unwrap();
    assert!((out.metrics.loss - std::f64::consts::LN_2).abs() < 1e-6);
    let g = out.loss.backward().unwrap();
    let gc = g.get(pc.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    let gr = g.get(pr.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    for (c, r) in gc.iter().zip(&gr) {
        assert!(
            (c + 0.025).abs() < 1e-7 && (r - 0.025).abs() < 1e-7,
            "{gc:?} {gr:?}"
        );
    }
    // Large margins stay finite (log-sigmoid is computed stably).
    let big = Tensor::new(&[1e4f32, -1e4], &Device::Cpu).unwrap();
    let z = Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap();
    let out = dpo_loss(&big, &z, &z, &z, 1.0).unwrap();
    assert!(out.metrics.loss.is_finite() && out.metrics.loss > 1e3);
}

#[test]
fn sequence_logps_count_only_completion_tokens() {
    let t = Trainable::init(LlamaConfig::tiny(), 0.02, 3).unwrap();
    let ids = Tensor::new(&[[5u32, 9, 14, 2, 7], [5, 9, 14, 2, 7]], &Device::Cpu).unwrap();
    let all = Tensor::new(&[[0u32, 1, 1, 1, 1], [0, 0, 0, 1, 1]], &Device::Cpu).unwrap();
    let s = sequence_logps(&t.model, &ids, &all)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // Per-token log-probs from forward_train directly.
    let logits = t
        .model
        .forward_train(&ids.narrow(1, 0, 4).unwrap())
        .unwrap();
    let lp = lmkit_core::candle_nn::ops::log_softmax(&logits, 2).unwrap();
    let lp = lp.get(0).unwrap().to_vec2::<f32>().unwrap();
    let tok = [9usize, 14, 2, 7];
    let full: f32 = (0..4).map(|j| lp[j][tok[j]]).sum();
    let tail: f32 = (2..4).map(|j| lp[j][tok[j]]).sum();
    assert!(
        (s[0] - full).abs() < 1e-4 && (s[1] - tail).abs() < 1e-4,
        "{s:?} vs {full} {tail}"
    );
    assert!(s[0] < s[1] && s[1] < 0.0);
}
