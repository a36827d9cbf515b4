//! The trainer on a tiny random model: a patterned token stream is learned (the loss falls far
//! below chance), runs are reproducible under a seed, and bad options are errors.

use lmkit_models::LlamaConfig;
use lmkit_train::data::Sequences;
use lmkit_train::{train, AdamWConfig, Decay, Schedule, TrainConfig, Trainable};

fn stream(n: usize) -> Vec<u32> {
    // A deterministic sequence with structure: each token is a function of the two before it.
    let mut v = vec![3u32, 7];
    while v.len() < n {
        let k = v.len();
        v.push((v[k - 1] * 5 + v[k - 2] * 3 + 1) % 100);
    }
    v
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch: 4,
        accumulate: 2,
        schedule: Schedule {
            peak: 3e-3,
            min: 3e-4,
            warmup: 5,
            total: steps,
            decay: Decay::Cosine,
        },
        adamw: AdamWConfig::default(),
        clip: Some(1.0),
        eval_every: 10,
        eval_sequences: 8,
        loss_scale: Default::default(),
    }
}

fn run(steps: usize, seed: u64) -> Vec<(f64, Option<f64>)> {
    let cfg = LlamaConfig::tiny();
    let mut t = Trainable::init(cfg, 0.02, seed).unwrap();
    let mut data = Sequences::new(stream(4000), 32, seed).unwrap();
    let eval = Sequences::new(stream(4000)[3000..].to_vec(), 32, 0).unwrap();
    let logs = train(&mut t, &mut data, Some(&eval), &config(steps), &mut |_| {}).unwrap();
    logs.iter().map(|l| (l.loss, l.eval_loss)).collect()
}

#[test]
fn a_patterned_stream_is_learned_reproducibly() {
    let a = run(60, 1);
    let chance = (128f64).ln();
    let (first, last) = (a[0].0, a[a.len() - 1].0);
    assert!(
        (first - chance).abs() < 0.5,
        "first loss {first} vs ln(128) {chance}"
    );
    let eval = a[a.len() - 1].1.unwrap();
    eprintln!("loss {first:.3} -> {last:.3}, eval {eval:.3} (chance {chance:.3})");
    assert!(
        last < 0.5 * chance && eval < 0.5 * chance,
        "loss {last}, eval {eval}"
    );
    assert_eq!(a, run(60, 1), "same seed, same losses");
    assert_ne!(a[..5], run(5, 2)[..], "another seed, other losses");
}

#[test]
fn bad_options_are_errors() {
    let mut t = Trainable::init(LlamaConfig::tiny(), 0.02, 0).unwrap();
    let mut data = Sequences::new(stream(200), 16, 0).unwrap();
    let mut cfg = config(1);
    cfg.batch = 0;
    let e = train(&mut t, &mut data, None, &cfg, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 1"), "{e}");
    assert!(Sequences::new(vec![1, 2, 3], 16, 0).is_err());
    assert!(Sequences::new(stream(100), 0, 0).is_err());
}
