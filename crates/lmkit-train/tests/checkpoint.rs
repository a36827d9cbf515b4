//! Checkpoints: resuming gives the same losses as an uninterrupted run, only complete
//! checkpoints are found, the newest `keep` are kept, and a damaged one is a clear error.

use lmkit_models::LlamaConfig;
use lmkit_train::checkpoint;
use lmkit_train::data::Sequences;
use lmkit_train::{AdamWConfig, Decay, Schedule, TrainConfig, Trainable, Trainer};

fn setup(seed: u64) -> (Trainer, Sequences) {
    let cfg = TrainConfig {
        steps: 12,
        batch: 2,
        accumulate: 2,
        schedule: Schedule {
            peak: 2e-3,
            min: 2e-4,
            warmup: 3,
            total: 12,
            decay: Decay::Cosine,
        },
        adamw: AdamWConfig::default(),
        clip: Some(1.0),
        eval_every: 0,
        eval_sequences: 0,
        loss_scale: Default::default(),
    };
    let t = Trainable::init(LlamaConfig::tiny(), 0.02, seed).unwrap();
    // 400 tokens make 16 sequences of 24: 12 steps × 4 cross three epoch boundaries.
    let tokens: Vec<u32> = (0..400u32).map(|i| (i * i + 7 * i) % 97).collect();
    (
        Trainer::new(t, cfg).unwrap(),
        Sequences::new(tokens, 24, 5).unwrap(),
    )
}

#[test]
fn resume_continues_exactly_and_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut data) = setup(1);
    let mut full = Vec::new();
    a.run(&mut data, None, usize::MAX, &mut |tr, data, log| {
        full.push(log.loss);
        if log.step % 2 == 0 && log.step <= 6 {
            checkpoint::save(dir.path(), tr, data, 2).unwrap();
        }
        true
    })
    .unwrap();
    assert_eq!(full.len(), 12);
    // keep = 2: steps 4 and 6 remain.
    let names: Vec<String> = checkpoint::list(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["step-00000004", "step-00000006"]);
    // A leftover temporary directory (a kill mid-write) is not a checkpoint.
    std::fs::create_dir(dir.path().join(".step-00000008.tmp-1")).unwrap();
    let last = checkpoint::latest(dir.path()).unwrap();
    assert!(last.ends_with("step-00000006"));

    // A fresh process: other initial weights, same data; resume from step 6.
    let (mut b, mut data_b) = setup(99);
    checkpoint::load(&last, &mut b, &mut data_b).unwrap();
    assert_eq!(b.step(), 6);
    let rest: Vec<f64> = b
        .run(&mut data_b, None, usize::MAX, &mut |_, _, _| true)
        .unwrap()
        .iter()
        .map(|l| l.loss)
        .collect();
    assert_eq!(
        rest,
        full[6..],
        "resumed losses equal the uninterrupted run"
    );
}

#[test]
fn a_damaged_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut data) = setup(1);
    a.run(&mut data, None, 2, &mut |_, _, _| true).unwrap();
    let ck = checkpoint::save(dir.path(), &a, &data, 3).unwrap();
    let model = ck.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let (mut b, mut data_b) = setup(1);
    let e = checkpoint::load(&ck, &mut b, &mut data_b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(ck.join("state.json"), "{").unwrap();
    std::fs::write(&model, &bytes).unwrap();
    let e = checkpoint::load(&ck, &mut b, &mut data_b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("state.json"), "{e}");
    // A tensor of another dtype is named with its file.
    std::fs::remove_file(ck.join("state.json")).unwrap();
    let ck = checkpoint::save(dir.path(), &a, &data, 3).unwrap();
    let mut map = lmkit_core::candle::safetensors::load(&model, &lmkit_core::Device::Cpu).unwrap();
    let name = a.t.params[0].0.clone();
    let t = map[&name].to_dtype(lmkit_core::DType::U32).unwrap();
    map.insert(name.clone(), t);
    lmkit_core::candle::safetensors::save(&map, &model).unwrap();
    let e = checkpoint::load(&ck, &mut b, &mut data_b)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("checkpoint:") && e.contains("model.safetensors") && e.contains("U32"),
        "{e}"
    );
}

/// A checkpoint written before loss scaling (no `loss_scale` in its config, no `scaler`)
/// still loads, and the run goes on with the default scale.
#[test]
fn a_checkpoint_from_before_loss_scaling_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut data) = setup(1);
    a.run(&mut data, None, 2, &mut |_, _, _| true).unwrap();
    let ck = checkpoint::save(dir.path(), &a, &data, 3).unwrap();
    let path = ck.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let config = state["config"].as_object_mut().unwrap();
    assert!(config.remove("loss_scale").is_some(), "{config:?}");
    state.as_object_mut().unwrap().remove("scaler");
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    let (mut b, mut data_b) = setup(1);
    checkpoint::load(&ck, &mut b, &mut data_b).unwrap();
    assert_eq!((b.step(), b.scaler.scale()), (2, 1.0));
    let logs = b.run(&mut data_b, None, 4, &mut |_, _, _| true).unwrap();
    assert!(logs
        .iter()
        .all(|l| l.loss.is_finite() && l.loss_scale.is_none()));
}

/// A run on a mixture of two domains resumes exactly too, and a single-stream run refuses
/// its checkpoint.
#[test]
fn a_mixture_resumes_exactly() {
    use lmkit_train::mixture::Mixture;
    let mixture = || {
        let a: Vec<u32> = (0..300u32).map(|i| (i * 3) % 50).collect();
        let b: Vec<u32> = (0..300u32).map(|i| 50 + (i * i) % 47).collect();
        Mixture::new(
            vec![
                ("a".into(), Sequences::new(a, 24, 1).unwrap(), 2.0),
                ("b".into(), Sequences::new(b, 24, 2).unwrap(), 1.0),
            ],
            9,
        )
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut a, _) = setup(1);
    let mut data = mixture();
    let mut full = Vec::new();
    a.run(&mut data, None, usize::MAX, &mut |tr, data, log| {
        full.push(log.loss);
        if log.step == 5 {
            checkpoint::save(dir.path(), tr, data, 2).unwrap();
        }
        true
    })
    .unwrap();
    let last = checkpoint::latest(dir.path()).unwrap();
    let (mut b, mut single) = setup(99);
    let e = checkpoint::load(&last, &mut b, &mut single)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mixture"), "{e}");
    let (mut b, _) = setup(99);
    let mut data_b = mixture();
    checkpoint::load(&last, &mut b, &mut data_b).unwrap();
    let rest: Vec<f64> = b
        .run(&mut data_b, None, usize::MAX, &mut |_, _, _| true)
        .unwrap()
        .iter()
        .map(|l| l.loss)
        .collect();
    assert_eq!(
        rest,
        full[5..],
        "resumed mixture losses equal the uninterrupted run"
    );
}
