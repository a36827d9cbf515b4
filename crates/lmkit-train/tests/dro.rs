//! DoReMi's proxy training: a reference model that knows domain `a` and not `b` leaves the
//! proxy's excess loss on `a`, so Group DRO moves weight to `a`; every update is logged and
//! the token weights keep the mean cross-entropy's scale.

use lmkit_models::LlamaConfig;
use lmkit_train::data::{Batches, Sequences};
use lmkit_train::dro::DroBatches;
use lmkit_train::mixture::Mixture;
use lmkit_train::{train, AdamWConfig, Decay, Schedule, TrainConfig, Trainable};

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch: 4,
        accumulate: 1,
        schedule: Schedule {
            peak: 3e-3,
            min: 3e-4,
            warmup: 2,
            total: steps,
            decay: Decay::Cosine,
        },
        adamw: AdamWConfig::default(),
        clip: Some(1.0),
        eval_every: 0,
        eval_sequences: 0,
        loss_scale: Default::default(),
    }
}

#[test]
fn excess_loss_moves_weight_to_the_domain_the_reference_knows() {
    let a: Vec<u32> = (0..2000u32).map(|i| (i * 3) % 50).collect();
    let b: Vec<u32> = (0..2000u32).map(|i| 50 + (i * i + i / 7) % 47).collect();
    // The reference learns `a` only.
    let mut reference = Trainable::init(LlamaConfig::tiny(), 0.02, 1).unwrap();
    let mut only_a = Sequences::new(a.clone(), 24, 1).unwrap();
    train(&mut reference, &mut only_a, None, &config(40), &mut |_| {}).unwrap();
    // The proxy starts fresh on a uniform mixture of both.
    let mut proxy = Trainable::init(LlamaConfig::tiny(), 0.02, 2).unwrap();
    let mix = Mixture::new(
        vec![
            ("a".into(), Sequences::new(a, 24, 3).unwrap(), 1.0),
            ("b".into(), Sequences::new(b, 24, 4).unwrap(), 1.0),
        ],
        5,
    )
    .unwrap();
    let mut dro =
        DroBatches::new(mix, proxy.model.clone(), reference.model.clone(), 1.0, 1e-3).unwrap();
    // One batch by hand: the token weights average 1 (the loss keeps its scale).
    let (ids, m, _) = {
        let (ids, m) = dro.next_batch(4).unwrap();
        (ids, m.unwrap(), ())
    };
    assert_eq!(m.dims(), [4, 24]);
    assert_eq!(ids.dims(), [4, 25]);
    let mean = m.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((mean - 1.0).abs() < 1e-4, "{mean}");
    train(&mut proxy, &mut dro, None, &config(12), &mut |_| {}).unwrap();
    assert_eq!(dro.history.len(), 13);
    let w = &dro.weights;
    assert!((w.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    assert!(
        w.average[0] > 0.6,
        "the domain the reference knows should gain weight: {:?}, scores {:?}",
        w.average,
        w.scores
    );
}

#[test]
fn pooled_updates_come_every_k_batches() {
    let a: Vec<u32> = (0..800u32).map(|i| (i * 3) % 50).collect();
    let b: Vec<u32> = (0..800u32).map(|i| 50 + (i * i + i / 7) % 47).collect();
    let reference = Trainable::init(LlamaConfig::tiny(), 0.02, 1).unwrap();
    let proxy = Trainable::init(LlamaConfig::tiny(), 0.02, 2).unwrap();
    let mix = Mixture::new(
        vec![
            ("a".into(), Sequences::new(a, 24, 3).unwrap(), 1.0),
            ("b".into(), Sequences::new(b, 24, 4).unwrap(), 1.0),
        ],
        5,
    )
    .unwrap();
    let dro =
        DroBatches::new(mix, proxy.model.clone(), reference.model.clone(), 1.0, 1e-3).unwrap();
    assert!(DroBatches::update_every(dro, 0).is_err());
    let mix = Mixture::new(
        vec![
            (
                "a".into(),
                Sequences::new((0..800u32).map(|i| i % 50).collect(), 24, 3).unwrap(),
                1.0,
            ),
            (
                "b".into(),
                Sequences::new((0..800u32).map(|i| 50 + i % 47).collect(), 24, 4).unwrap(),
                1.0,
            ),
        ],
        5,
    )
    .unwrap();
    let mut dro = DroBatches::new(mix, proxy.model.clone(), reference.model.clone(), 1.0, 1e-3)
        .unwrap()
        .update_every(4)
        .unwrap();
    for k in 1..=10 {
        let (_, m) = dro.next_batch(2).unwrap();
        assert!(m.is_some());
        assert_eq!(dro.history.len(), k / 4, "after {k} batches");
    }
    assert!((dro.weights.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);
}
