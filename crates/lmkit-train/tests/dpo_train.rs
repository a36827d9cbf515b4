//! DPO training with LoRA on a tiny model: on held-out pairs whose chosen response follows a
//! rule the rejected one breaks, reward accuracy and margin rise from the reference's zero.

use lmkit_core::candle::Var;
use lmkit_core::DType;
use lmkit_models::LlamaConfig;
use lmkit_train::dpo::{self, DpoConfig, DpoLog, DpoMetrics, PrefData};
use lmkit_train::lora::{self, LoraConfig};
use lmkit_train::loss_scale::LossScale;
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

/// DPO with LoRA adapters on the tiny model, its policy computing in `dtype`: the held-out
/// metrics before, the run's logs (or its error), and the adapters' values before and after.
#[allow(clippy::type_complexity)]
fn run(
    dtype: DType,
    loss_scale: LossScale,
) -> (
    DpoMetrics,
    Result<Vec<DpoLog>, lmkit_train::Error>,
    [Vec<Vec<f32>>; 2],
) {
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
    let vars: Vec<Var> = lora::attach(&mut policy, &cfg, 2)
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    policy.set_dtype(dtype).unwrap();
    let values = || -> Vec<Vec<f32>> {
        vars.iter()
            .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let before = dpo::evaluate(&policy, &held, 0.1, 0).unwrap();
    let start = values();
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
        loss_scale,
    };
    let logs = dpo::train(
        &policy,
        vars.clone(),
        &train,
        Some(&held),
        &dc,
        0,
        &mut |_| {},
    );
    (before, logs, [start, values()])
}

#[test]
fn dpo_with_lora_learns_the_preference() {
    let (before, logs, _) = run(DType::F32, LossScale::Auto);
    assert!(
        before.rewards_margins.abs() < 1e-4,
        "starts at the reference: {before:?}"
    );
    let logs = logs.unwrap();
    assert!(logs.iter().all(|l| l.loss_scale.is_none()));
    let after = logs.last().unwrap().eval.clone().unwrap();
    eprintln!("held-out before {before:?}\nafter {after:?}");
    assert!(after.rewards_accuracies >= 0.9, "{after:?}");
    assert!(after.rewards_margins > 0.5, "{after:?}");
    assert!(after.loss < 0.5 * before.loss, "{after:?}");
}

/// In f16 the loss is scaled (dynamically, from 2^16) and DPO learns as in f32; a scale at
/// which every gradient overflows stops the run with the adapters untouched.
#[test]
fn dpo_in_f16_scales_the_loss() {
    let (before, logs, _) = run(DType::F16, LossScale::Auto);
    let logs = logs.unwrap();
    assert_eq!(logs.len(), 30);
    assert!(logs.iter().all(|l| l.loss_scale.is_some()));
    let after = logs.last().unwrap().eval.clone().unwrap();
    assert!(after.rewards_accuracies >= 0.9, "{after:?}");
    assert!(after.loss < 0.5 * before.loss, "{after:?}");
    let (_, logs, [start, end]) = run(DType::F16, LossScale::Fixed(1e30));
    let Err(e) = logs else {
        panic!("a run whose gradients never are finite went through");
    };
    assert!(matches!(e, lmkit_train::Error::Diverged(_)), "{e}");
    assert_eq!(start, end, "a skipped step changed the adapters");
}
