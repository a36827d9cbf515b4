//! DPO training with LoRA on a tiny model: on held-out pairs whose chosen response follows a
//! rule the rejected one breaks, reward accuracy and margin rise from the reference's zero.

use lmkit_models::LlamaConfig;
use lmkit_train::dpo::{self, DpoConfig, PrefData};
use lmkit_train::lora::{self, LoraConfig};
use lmkit_train::prefs::TokenPair;
use lmkit_train::{AdamWConfig, Decay, Schedule, Trainable};

/// Prompt `k` (4 tokens) with a chosen continuation of ascending tokens and a rejected one of
/// descending tokens.
fn pair(k: u32) -> TokenPair {
    let prompt: Vec<u32> = (0..4).map(|i| (k * 7 + i * 3) % 60 + 1).collect();
    let mk = |resp: Vec<u32>| {
        let ids: Vec<u32> = prompt.iter().copied().chain(resp.iter().copied()).collect();
        let mask: Vec<u32> = (0..ids.len())
            .map(|j| u32::from(j >= prompt.len()))
            .collect();
        (ids, mask)
    };
    TokenPair {
        chosen: mk(vec![100, 101, 102, 103]),
        rejected: mk(vec![103, 102, 101, 100]),
    }
}

#[test]
fn dpo_with_lora_learns_the_preference() {
    let base = Trainable::init(LlamaConfig::tiny(), 0.05, 11).unwrap();
    let mut policy = base.model.clone();
    let train = PrefData::new(&base.model, (0..24).map(pair).collect(), 0).unwrap();
    let held = PrefData::new(&base.model, (100..112).map(pair).collect(), 0).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![
            "q_proj".into(),
            "v_proj".into(),
            "o_proj".into(),
            "down_proj".into(),
        ],
    };
    let vars = lora::attach(&mut policy, &cfg, 2).unwrap();
    let before = dpo::evaluate(&policy, &held, 0.1, 0).unwrap();
    assert!(
        before.rewards_margins.abs() < 1e-4,
        "starts at the reference: {before:?}"
    );
    let dc = DpoConfig {
        beta: 0.1,
        steps: 30,
        batch: 4,
        schedule: Schedule {
            peak: 5e-3,
            min: 5e-4,
            warmup: 3,
            total: 30,
            decay: Decay::Cosine,
        },
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
        clip: Some(1.0),
        eval_every: 10,
        seed: 1,
    };
    let logs = dpo::train(
        &policy,
        vars.into_iter().map(|(_, v)| v).collect(),
        &train,
        Some(&held),
        &dc,
        0,
        &mut |_| {},
    )
    .unwrap();
    let after = logs.last().unwrap().eval.clone().unwrap();
    eprintln!("held-out before {before:?}\nafter {after:?}");
    assert!(after.rewards_accuracies >= 0.9, "{after:?}");
    assert!(after.rewards_margins > 0.5, "{after:?}");
    assert!(after.loss < 0.5 * before.loss, "{after:?}");
}
