//! The trainer on a tiny random model: a patterned token stream is learned (the loss falls far
//! below chance), runs are reproducible under a seed, and bad options are errors. Loss scaling
//! (f16 on the CPU, through candle's f16 ops): a scale that overflows is backed off with the
//! overflowing steps skipped and retried, the run still learns as f32 does and applies every
//! step asked for, the scale survives a checkpoint, and a scale that always overflows stops
//! the run with an error and the weights untouched.

use lmkit_core::DType;
use lmkit_models::LlamaConfig;
use lmkit_train::data::Sequences;
use lmkit_train::loss_scale::{LossScale, ScalerState, MAX_SKIPS};
use lmkit_train::{checkpoint, Error, StepLog, Trainer};
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

/// A trainer for `steps` steps of the tiny model with products in `dtype` (f32 master weights,
/// as `lmkit train --dtype f16` runs) and `loss_scale`, and its data.
fn scaled_trainer(steps: usize, dtype: DType, loss_scale: LossScale) -> (Trainer, Sequences) {
    let mut cfg = config(steps);
    (cfg.accumulate, cfg.eval_every, cfg.loss_scale) = (1, 0, loss_scale);
    cfg.schedule.warmup = 3;
    let mut t = Trainable::init(LlamaConfig::tiny(), 0.02, 3).unwrap();
    t.model.set_dtype(dtype).unwrap();
    let data = Sequences::new(stream(3000), 32, 1).unwrap();
    (Trainer::new(t, cfg).unwrap(), data)
}

fn run_all(tr: &mut Trainer, data: &mut Sequences) -> Vec<StepLog> {
    tr.run(data, None, usize::MAX, &mut |_, _, _| true).unwrap()
}

fn weights(tr: &Trainer) -> Vec<Vec<f32>> {
    tr.t.params
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn an_overflowing_scale_backs_off_and_f16_learns_as_f32_does() {
    let steps = 25;
    let (mut reference, mut data) = scaled_trainer(steps, DType::F32, LossScale::Auto);
    assert!(!reference.scaler.active(), "f32 is not scaled by default");
    let f32_logs = run_all(&mut reference, &mut data);

    let (mut tr, mut data) = scaled_trainer(steps, DType::F16, LossScale::Auto);
    assert_eq!(
        tr.scaler.scale(),
        65536.0,
        "f16 starts at PyTorch's initial scale"
    );
    // Far too large: the first steps' f16 gradients overflow (this model's run at 2^19).
    let huge = 2f64.powi(30);
    tr.scaler.restore(ScalerState {
        scale: huge,
        good: 0,
    });
    let logs = run_all(&mut tr, &mut data);
    assert_eq!(logs.len(), steps, "every step asked for is applied");
    assert_eq!(tr.step(), steps);
    let first = &logs[0];
    assert!(first.skipped > 0, "no step was skipped at a scale of 2^30");
    let scale = first.loss_scale.expect("the loss is scaled");
    assert_eq!(scale, huge / 2f64.powi(first.skipped as i32));
    // Later steps may back off once more, never grow (2,000 clean steps).
    assert!(logs
        .iter()
        .all(|l| l.loss_scale.is_some_and(|s| s <= scale)));
    assert!(weights(&tr).iter().flatten().all(|x| x.is_finite()));
    // It learns as the f32 run does (the skipped steps consumed other batches).
    let (a, b) = (logs[steps - 1].loss, f32_logs[steps - 1].loss);
    assert!(a < 0.8 * logs[0].loss, "f16 loss {} -> {a}", logs[0].loss);
    assert!((a - b).abs() < 0.1 * b, "f16 final loss {a} vs f32 {b}");
    // The gradient norm is the unscaled one.
    let (na, nb) = (logs[steps - 1].grad_norm, f32_logs[steps - 1].grad_norm);
    assert!(
        na > 0.5 * nb && na < 2.0 * nb,
        "f16 grad norm {na} vs f32 {nb}"
    );

    // The scale is saved with a checkpoint and restored with it.
    let dir = tempfile::tempdir().unwrap();
    let saved = checkpoint::save(dir.path(), &tr, &data, 1).unwrap();
    let (mut back, mut data2) = scaled_trainer(steps, DType::F16, LossScale::Auto);
    checkpoint::load(&saved, &mut back, &mut data2).unwrap();
    assert_eq!(back.scaler.state(), tr.scaler.state());
    assert_ne!(back.scaler.scale(), 65536.0);
}

#[test]
fn a_scale_that_always_overflows_stops_the_run_untouched() {
    let (mut tr, mut data) = scaled_trainer(5, DType::F16, LossScale::Fixed(1e30));
    let before = weights(&tr);
    let mut called = 0;
    let r = tr.run(&mut data, None, usize::MAX, &mut |_, _, _| {
        called += 1;
        true
    });
    let Err(e) = r else {
        panic!("a run whose gradients never are finite went through");
    };
    assert!(matches!(e, Error::Diverged(_)), "{e}");
    assert!(e.to_string().contains(&MAX_SKIPS.to_string()), "{e}");
    assert_eq!((called, tr.step()), (0, 0));
    assert_eq!(weights(&tr), before, "a skipped step changed the weights");
}
