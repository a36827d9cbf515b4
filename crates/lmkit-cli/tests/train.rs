//! `lmkit train` end to end on a tiny config: it trains, writes metrics, checkpoints and an HF
//! folder that `lmkit run` loads; a `kill -9` mid-run loses nothing but the steps since the last
//! checkpoint and `--resume` finishes the run; bad configs are clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lmkit_core::GgmlDType;
use lmkit_models::testing::write_tiny_gguf;
use lmkit_models::LlamaConfig;

fn lmkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(args)
        .output()
        .unwrap()
}

/// `lmkit train --config CFG --out OUT` and `extra` arguments.
fn train(cfg: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    lmkit(&args)
}

/// A config and its data in `dir`; `steps` optimizer steps, a checkpoint every `every`.
fn setup(dir: &Path, steps: usize, every: usize, extra: &str) -> PathBuf {
    let tok = dir.join("tok.gguf");
    write_tiny_gguf(&tok, &LlamaConfig::tiny(), 1, GgmlDType::F32).unwrap();
    let text: String = (0..400)
        .map(|i| format!("the cat {} ran to the {} and back. ", i % 7, i % 5))
        .collect();
    std::fs::write(dir.join("train.txt"), text).unwrap();
    write_config(dir, steps, every, extra)
}

/// The run configuration alone (the data and tokenizer files stay as they are).
fn write_config(dir: &Path, steps: usize, every: usize, extra: &str) -> PathBuf {
    let cfg = format!(
        "[model]\nhidden_size = 32\nintermediate_size = 64\nnum_layers = 2\nnum_heads = 4\n\
         num_kv_heads = 2\nmax_position_embeddings = 64\n\n[data]\ntrain = [\"train.txt\"]\n\
         seq_len = 32\neval_fraction = 0.1\ntokenizer = \"tok.gguf\"\n\n[train]\nsteps = {steps}\n\
         batch = 4\nlr = 3e-3\nwarmup = 2\neval_every = 5\neval_sequences = 4\n\
         checkpoint_every = {every}\nkeep = 2\n{extra}"
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn trains_checkpoints_and_exports_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 10, 5, "");
    let out = dir.path().join("out");
    let o = train(&cfg, &out, &["--json", "-t", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["steps"], 10);
    let m = metrics(&out);
    assert_eq!(m.len(), 10);
    let (first, last) = (
        m[0]["loss"].as_f64().unwrap(),
        m[9]["loss"].as_f64().unwrap(),
    );
    assert!(last < first, "loss {first} -> {last}");
    assert!(s["eval_loss"].as_f64().unwrap().is_finite());
    assert!(out.join("checkpoints/step-00000010").is_dir());
    let final_dir = out.join("final");
    let o = lmkit(&[
        "run",
        "--model",
        final_dir.to_str().unwrap(),
        "the cat",
        "-n",
        "4",
        "--greedy",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn kill_then_resume_finishes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 400, 3, "");
    let out = dir.path().join("out");
    let args = [
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "-t",
        "1",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the second checkpoint (or a later one: with keep = 2 a fast run may already have
    // deleted step 6 when we look), then kill -9.
    let newest = || -> usize {
        std::fs::read_dir(out.join("checkpoints"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("step-")?.parse::<usize>().ok()
            })
            .max()
            .unwrap_or(0)
    };
    let t0 = Instant::now();
    while newest() < 6 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = metrics(&out).len();
    assert!(
        (6..400).contains(&killed_at),
        "killed after {killed_at} steps"
    );
    // Every checkpoint directory present is complete.
    for c in std::fs::read_dir(out.join("checkpoints")).unwrap() {
        let c = c.unwrap().path();
        if c.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("step-")
        {
            for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
                assert!(c.join(f).is_file(), "{} lacks {f}", c.display());
            }
        }
    }
    // The corpus was tokenized into a token file, reused on resume (the sources are unchanged).
    let tokens = out.join("data/train.tokens");
    let written = std::fs::metadata(&tokens).unwrap().modified().unwrap();
    // Resume with fewer total steps so the test stays short.
    let cfg2 = write_config(dir.path(), killed_at + 6, 3, "");
    let o = train(&cfg2, &out, &["--resume", "--json", "-t", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("resumed from"), "{e}");
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["steps"], killed_at + 6);
    assert!(out.join("final/model.safetensors").is_file());
    let reused = std::fs::metadata(&tokens).unwrap().modified().unwrap();
    assert_eq!(written, reused, "the token file was rewritten on resume");
}

#[test]
fn bad_configs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = |cfg: &Path| {
        let o = train(cfg, &out, &[]);
        assert_eq!(o.status.code(), Some(1));
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    let cfg = setup(dir.path(), 10, 0, "learning_rate = 1.0\n");
    assert!(run(&cfg).contains("learning_rate"));
    // The optimizer's settings out of range name the key.
    for (extra, key) in [
        ("beta1 = 1.5\n", "train.beta1"),
        ("beta2 = 1.0\n", "train.beta2"),
        ("clip = -1.0\n", "train.clip"),
        ("min_lr = 1.0\n", "train.min_lr"),
        ("weight_decay = -0.1\n", "train.weight_decay"),
    ] {
        let e = run(&setup(dir.path(), 10, 0, extra));
        assert!(e.contains(key), "{extra}: {e}");
    }
    // A batch that cannot fit in memory is refused before anything is allocated.
    let huge = write_config(dir.path(), 10, 0, "")
        .to_string_lossy()
        .into_owned();
    let text = std::fs::read_to_string(&huge)
        .unwrap()
        .replace("batch = 4", "batch = 100000000000");
    std::fs::write(&huge, text).unwrap();
    assert!(run(Path::new(&huge)).contains("memory"));
    let cfg = setup(dir.path(), 0, 0, "");
    assert!(run(&cfg).contains("train.steps"));
    let cfg = setup(dir.path(), 5, 0, "");
    std::fs::remove_file(dir.path().join("train.txt")).unwrap();
    assert!(run(&cfg).contains("train.txt"));
    std::fs::write(dir.path().join("train.txt"), "").unwrap();
    assert!(run(&cfg).contains("empty"));
    std::fs::write(dir.path().join("run.toml"), "[model\n").unwrap();
    assert!(run(&dir.path().join("run.toml")).contains("run.toml"));
    // A value of the wrong type names its field, in TOML and in JSON.
    let cfg = setup(dir.path(), 5, 0, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("batch = 4", "batch = \"four\"");
    std::fs::write(&cfg, text).unwrap();
    let e = run(&cfg);
    assert!(e.contains("`train.batch`") && e.contains("line 17"), "{e}");
    let json = dir.path().join("run.json");
    let body = r#"{"data": {"train": ["train.txt"], "seq_len": 32, "tokenizer": "tok.gguf"},
        "train": {"steps": 5, "batch": 4, "lr": 3e-3, "warmup": [1]}}"#;
    std::fs::write(&json, body).unwrap();
    let e = run(&json);
    assert!(
        e.contains("run.json") && e.contains("`train.warmup`"),
        "{e}"
    );
    std::fs::write(&json, body.replace("\"steps\"", "\"stesp\"")).unwrap();
    let e = run(&json);
    assert!(e.contains("`train.stesp`: unknown field"), "{e}");
    std::fs::write(&json, format!("{} x", body.replace("[1]", "1"))).unwrap();
    let e = run(&json);
    assert!(
        e.contains("run.json") && e.contains("trailing characters"),
        "{e}"
    );
}

/// A learning rate that makes the weights infinite: the run stops with an error naming a
/// tensor, and no final model is written.
#[test]
fn a_diverged_run_writes_no_final_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 1, 0, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("lr = 3e-3", "lr = 1e300");
    std::fs::write(&cfg, text).unwrap();
    let out = dir.path().join("out");
    let o = train(&cfg, &out, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("diverged") && e.contains("NaN or infinite"),
        "{e}"
    );
    assert!(!out.join("final").exists());
}

/// `--dtype f16` scales the loss (dynamic, logged per step) and warns only when told not to;
/// a bad `--loss-scale` is a clear error.
#[test]
fn f16_training_scales_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 4, 0, "");
    let out = dir.path().join("out");
    let f16 = |extra: &[&str]| {
        let _ = std::fs::remove_dir_all(&out);
        train(
            &cfg,
            &out,
            &[&["--dtype", "f16", "-t", "2"], extra].concat(),
        )
    };
    let o = f16(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("without loss scaling"), "{err}");
    let m = metrics(&out);
    assert_eq!(m.len(), 4);
    for l in &m {
        let s = l["loss_scale"]
            .as_f64()
            .expect("a loss scale in metrics.jsonl");
        assert!(s > 0.0 && s <= 65536.0, "{l}");
        assert!(l["skipped"].as_u64().is_some() && l["loss"].as_f64().unwrap().is_finite());
    }
    let o = f16(&["--loss-scale", "off"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("without loss scaling"), "{err}");
    assert!(metrics(&out).iter().all(|l| l.get("loss_scale").is_none()));
    let o = f16(&["--loss-scale", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("loss-scale") && err.contains("number > 0"),
        "{err}"
    );
}

#[test]
fn dpo_writes_a_peft_adapter_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &LlamaConfig::tiny(), 3, GgmlDType::F32).unwrap();
    let pairs: String = (0..12)
        .map(|i| {
            format!(
                "{{\"prompt\": \"the cat {i}\", \"chosen\": \" ran to the tree\", \"rejected\": \" sat\"}}\n"
            )
        })
        .collect();
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(&data, pairs).unwrap();
    for lora in [true, false] {
        let out = dir.path().join(if lora { "dpo-lora" } else { "dpo-full" });
        let mut args = vec![
            "dpo".to_string(),
            "--data".into(),
            data.to_str().unwrap().into(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--steps".into(),
            "4".into(),
            "--batch".into(),
            "2".into(),
            "--eval-pairs".into(),
            "4".into(),
            "--eval-every".into(),
            "2".into(),
            "--json".into(),
            "-t".into(),
            "1".into(),
        ];
        if lora {
            args.extend(["--lora", "--lora-r", "2", "--lora-dropout", "0.1"].map(String::from));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = lmkit(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(s["train_pairs"], 8);
        assert!(s["eval_after"]["rewards_accuracies"].as_f64().is_some());
        if lora {
            assert!(out.join("adapter/adapter_config.json").is_file());
            assert!(out.join("adapter/adapter_model.safetensors").is_file());
        } else {
            // The fully fine-tuned model is an HF folder that loads.
            assert!(out.join("final/model.safetensors").is_file());
            let f = out.join("final");
            let o = lmkit(&["info", "--model", f.to_str().unwrap(), "--json"]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let logs = metrics(&out);
        assert_eq!(logs.len(), 4);
        for l in &logs {
            let norm = l["grad_norm"].as_f64().expect("a gradient norm");
            assert!(norm.is_finite() && norm > 0.0, "{l}");
            assert!(
                l["train"]["loss"].as_f64().is_some_and(f64::is_finite),
                "{l}"
            );
        }
    }
    // LoRA options need --lora.
    let o = lmkit(&[
        "dpo",
        "--data",
        data.to_str().unwrap(),
        "--out",
        dir.path().join("x").to_str().unwrap(),
        "--lora-r",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let out = dir.path().join("dpo");
    // Too few pairs to hold any out: a clear error.
    let o = lmkit(&[
        "dpo",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--eval-pairs",
        "20",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--eval-pairs"));
}

/// Fine-tuning an existing model on chat data: full and LoRA. The loss (on the assistant's
/// tokens only) goes down, and the run writes a loadable HF folder, a GGUF file, and for LoRA a
/// PEFT adapter.
#[test]
fn fine_tunes_an_existing_model_on_chat_data() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base.gguf");
    write_tiny_gguf(&model, &LlamaConfig::tiny(), 3, GgmlDType::Q8_0).unwrap();
    let lines: String = (0..60)
        .map(|i| {
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"the cat {}\"}}, \
                 {{\"role\": \"assistant\", \"content\": \"the dog {}\"}}]}}\n",
                i % 5,
                i % 5
            )
        })
        .collect();
    std::fs::write(dir.path().join("chat.jsonl"), lines).unwrap();
    let body = "[data]\ntrain = [\"chat.jsonl\"]\nseq_len = 32\neval_fraction = 0.1\n\n\
                [train]\nsteps = 12\nbatch = 4\nlr = 5e-3\nwarmup = 2\neval_every = 6\n\
                eval_sequences = 4\n";
    for (name, extra) in [
        ("full", ""),
        ("lora", "\n[lora]\nr = 4\nalpha = 8\ndropout = 0.05\n"),
    ] {
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, format!("{body}{extra}")).unwrap();
        let out = dir.path().join(name);
        let model_arg = ["--model", model.to_str().unwrap()];
        let o = train(
            &cfg,
            &out,
            &[&model_arg[..], &["--gguf", "f16", "-t", "1"]].concat(),
        );
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let m = metrics(&out);
        let (first, last) = (
            m[0]["loss"].as_f64().unwrap(),
            m[11]["loss"].as_f64().unwrap(),
        );
        assert!(last < first * 0.9, "{name}: loss {first} -> {last}");
        for model_path in [out.join("final"), out.join("final.gguf")] {
            let o = lmkit(&[
                "run",
                "--model",
                model_path.to_str().unwrap(),
                "the cat",
                "-n",
                "3",
                "--greedy",
            ]);
            assert!(
                o.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        assert_eq!(
            out.join("adapter/adapter_config.json").is_file(),
            name == "lora"
        );
    }
    // Both a [model] section and --model is ambiguous.
    let cfg = setup(dir.path(), 2, 0, "");
    let model_arg = ["--model", model.to_str().unwrap()];
    let o = train(&cfg, &dir.path().join("x"), &model_arg);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("either a [model] section"));
    // A role no chat template knows is named with its file and line.
    std::fs::write(
        dir.path().join("chat.jsonl"),
        "{\"messages\": [{\"role\": \"usr\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let full = dir.path().join("full.toml");
    let o = train(&full, &dir.path().join("y"), &model_arg);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("chat.jsonl") && e.contains("`usr`"), "{e}");
}

/// `lmkit tokenizer train`, then pretraining with that tokenizer and a GGUF export of it.
#[test]
fn trains_a_tokenizer_then_a_model_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..300)
        .map(|i| format!("a bird {} flew over the {} hills. ", i % 9, i % 4))
        .collect();
    std::fs::write(dir.path().join("t.txt"), text).unwrap();
    let tok = dir.path().join("tok");
    let o = lmkit(&[
        "tokenizer",
        "train",
        dir.path().join("t.txt").to_str().unwrap(),
        "--vocab-size",
        "300",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(tok.join("tokenizer.json").is_file() && tok.join("tokenizer_config.json").is_file());
    let cfg = "[model]\nhidden_size = 32\nintermediate_size = 64\nnum_layers = 1\nnum_heads = 2\n\
               max_position_embeddings = 64\n\n[data]\ntrain = [\"t.txt\"]\nseq_len = 16\n\
               tokenizer = \"tok\"\n\n[train]\nsteps = 2\nbatch = 2\nlr = 1e-3\n";
    std::fs::write(dir.path().join("c.toml"), cfg).unwrap();
    let out = dir.path().join("out");
    let o = train(&dir.path().join("c.toml"), &out, &["--gguf", "q8_0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/config.json")).unwrap())
            .unwrap();
    // At most the asked size (a small corpus runs out of pairs worth merging), more than the
    // 256 bytes and 3 specials.
    let v = cfg["vocab_size"].as_u64().unwrap();
    assert!(v > 259 && v <= 300, "{v}");
    let o = lmkit(&["info", "--model", out.join("final.gguf").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = lmkit(&["tokenizer", "train", "--vocab-size", "300", "--out", "x"]);
    assert!(!o.status.success());
}

/// `[data.domains]` with `[data.weights]`: the run mixes the domains, logs their weights,
/// resumes, and bad domain configs are clear errors.
#[test]
fn trains_on_weighted_domains() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), 1, 0, "");
    let d = dir.path();
    let code: String = (0..300)
        .map(|i| format!("x = f({i}) + g[{}]\n", i % 9))
        .collect();
    std::fs::write(d.join("code.txt"), code).unwrap();
    let cfg = |data: &str| {
        let text = format!(
            "[model]\nhidden_size = 32\nintermediate_size = 64\nnum_layers = 2\nnum_heads = 4\n\
             num_kv_heads = 2\nmax_position_embeddings = 64\n\n[data]\nseq_len = 16\n\
             tokenizer = \"tok.gguf\"\n{data}\n\n[train]\nsteps = 6\nbatch = 4\nlr = 3e-3\n\
             warmup = 1\ncheckpoint_every = 3\n"
        );
        let p = d.join("mix.toml");
        std::fs::write(&p, text).unwrap();
        p
    };
    let out = d.join("mix-out");
    let good = cfg(
        "[data.domains]\nprose = [\"train.txt\"]\ncode = [\"code.txt\"]\n\
         [data.weights]\nprose = 3.0\ncode = 1.0",
    );
    let o = train(&good, &out, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("domains: code 0.250, prose 0.750"), "{e}");
    assert_eq!(metrics(&out).len(), 6);
    assert!(out.join("data/domain-code.tokens").is_file());
    // A resumed run starts from its last checkpoint (step 6: nothing left to do).
    let o = train(&good, &out, &["--resume"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("resumed"));
    // DoReMi: a proxy run against the trained model as the reference learns weights, and a
    // later run reads them.
    let uniform = cfg("[data.domains]\nprose = [\"train.txt\"]\ncode = [\"code.txt\"]");
    let dro_out = d.join("dro-out");
    let reference = out.join("final");
    let o = train(
        &uniform,
        &dro_out,
        &["--doremi-reference", reference.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dro_out.join("domain_weights.json")).unwrap())
            .unwrap();
    assert_eq!(report["updates"], 6);
    assert_eq!(report["steps"].as_array().unwrap().len(), 6);
    let avg = report["average"].as_object().unwrap();
    let total: f64 = avg.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-9, "{report}");
    let from = cfg("weights_from = \"dro-out/domain_weights.json\"\n\
                    [data.domains]\nprose = [\"train.txt\"]\ncode = [\"code.txt\"]");
    let _ = std::fs::remove_dir_all(&out);
    let o = train(&from, &out, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && e.contains("domains: code"), "{e}");
    let bad = |data: &str, want: &str| {
        let _ = std::fs::remove_dir_all(&out);
        let o = train(&cfg(data), &out, &[]);
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains(want), "want `{want}` in: {e}");
    };
    bad(
        "[data.domains]\nprose = [\"train.txt\"]\n[data.weights]\nweb = 1.0",
        "names no domain",
    );
    bad(
        "[data.domains]\nprose = [\"train.txt\"]\ncode = [\"code.txt\"]\n[data.weights]\nprose = 1.0",
        "has no weight",
    );
    bad("[data.domains]\n\"a b\" = [\"train.txt\"]", "domain name");
    bad(
        "train = [\"train.txt\"]\n[data.domains]\nx = [\"code.txt\"]",
        "exclude each other",
    );
    bad("", "`data.train` or `data.domains`");
}

/// A tokenizer, prose (`train.txt`) and code (`code.txt`) in D, and a tiny proxy config
/// (`proxy.toml`) with these extra `[data]` lines and steps.
fn doremi_setup(d: &Path, data: &str, steps: usize) -> PathBuf {
    setup(d, 1, 0, "");
    let code: String = (0..300)
        .map(|i| format!("x = f({i}) + g[{}]\n", i % 9))
        .collect();
    std::fs::write(d.join("code.txt"), code).unwrap();
    let cfg = d.join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nhidden_size = 32\nintermediate_size = 64\nnum_layers = 2\nnum_heads = 4\n\
             num_kv_heads = 2\nmax_position_embeddings = 64\n\n[data]\nseq_len = 16\n\
             tokenizer = \"tok.gguf\"\n{data}\n[train]\nsteps = {steps}\nbatch = 4\nlr = 3e-3\n\
             warmup = 1\n"
        ),
    )
    .unwrap();
    cfg
}

/// `lmkit data doremi --proxy-config CFG --out OUT EXTRA…`.
fn doremi(cfg: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "data",
        "doremi",
        "--proxy-config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lmkit(&args)
}

/// `lmkit data doremi`: the reference and the proxy in one command, domains from the command
/// line, the weights as JSON and a plot; a second call reuses the reference.
#[test]
fn data_doremi_learns_weights_in_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = doremi_setup(d, "", 5);
    let out = d.join("doremi");
    let prose = format!("prose={}", d.join("train.txt").display());
    let code = format!("code={}", d.join("code.txt").display());
    let run = |extra: &[&str]| {
        let mut args = vec!["--domains", &prose, &code];
        args.extend_from_slice(extra);
        doremi(&cfg, &out, &args)
    };
    let o = run(&["--json"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    assert!(e.contains("1/2") && e.contains("2/2"), "{e}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let avg = r["average"].as_object().unwrap();
    assert_eq!(avg.len(), 2);
    let total: f64 = avg.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-9, "{r}");
    assert_eq!(r["updates"], 5);
    assert!(out.join("reference/final/config.json").is_file());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("domain_weights.json")).unwrap()).unwrap();
    assert_eq!(report["average"], r["average"]);
    let svg = std::fs::read_to_string(out.join("domain_weights.svg")).unwrap();
    assert!(svg.contains("<polyline") && svg.contains("prose"), "{svg}");
    // `lmkit plot` redraws it from the folder.
    let redraw = d.join("redraw.svg");
    let o = lmkit(&[
        "plot",
        out.to_str().unwrap(),
        "--out",
        redraw.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(&redraw)
            .unwrap()
            .matches("<polyline")
            .count(),
        6
    );
    // Again: the reference is reused, the proxy retrained (same seed: same weights).
    let o = run(&["--json"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success() && e.contains("reusing the reference"),
        "{e}"
    );
    let again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["average"], r["average"]);
    // Bad options are named.
    for (extra, want) in [
        (&["--eta", "0"][..], "--eta"),
        (&["--smoothing", "2"][..], "--smoothing"),
    ] {
        let o = run(extra);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(want), "{e}");
    }
    let o = doremi(&cfg, Path::new("x"), &["--domains", "wiki"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("NAME=PATH"), "{e}");
    // A weighted reference mixture: the reference trains on it, the proxy samples uniformly.
    let weighted = doremi_setup(d, "[data.weights]\nprose = 3.0\ncode = 1.0\n", 3);
    let o = doremi(
        &weighted,
        &out.join("weighted"),
        &["--domains", &prose, &code],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    let (reference, proxy) = e.split_once("2/2: the proxy").unwrap();
    assert!(
        reference.contains("domains: code 0.250, prose 0.750"),
        "{e}"
    );
    assert!(proxy.contains("domains: code 0.500, prose 0.500"), "{e}");
    // No domains anywhere: the config's error.
    let o = doremi(&cfg, &out.join("none"), &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("data.domains"), "{e}");
}

/// Iterated DoReMi: round 2's reference trains on round 1's weights; `--converged` stops the
/// rounds; a second call reuses the finished rounds.
#[test]
fn data_doremi_iterates_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = doremi_setup(
        d,
        "[data.domains]\nprose = [\"train.txt\"]\ncode = [\"code.txt\"]\n",
        4,
    );
    let out = d.join("iter");
    let run = |extra: &[&str]| {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        doremi(&cfg, &out, &args)
    };
    // Up to 3 rounds, but any change ≤ 1 counts as converged: round 2 ends it.
    let o = run(&["--rounds", "3", "--converged", "1"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{r}");
    assert!(rounds[0]["moved"].is_null());
    let moved = rounds[1]["moved"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&moved), "{r}");
    assert!(!out.join("round-3").exists());
    assert!(!e.contains("did not converge"), "{e}");
    // Round 2's reference trained on round 1's average weights.
    let w1 = rounds[0]["average"]["code"].as_f64().unwrap();
    assert!(
        e.contains("round 2/3: 1/2: the reference model, on the weights of"),
        "{e}"
    );
    assert!(
        e.contains(&format!("domains: code {w1:.3}")),
        "want code {w1:.3} in: {e}"
    );
    for k in 1..=2 {
        let rd = out.join(format!("round-{k}"));
        assert!(rd.join("reference/final/config.json").is_file());
        assert!(rd.join("domain_weights.svg").is_file());
    }
    // The top level holds the last round's weights and every round's.
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("domain_weights.json")).unwrap()).unwrap();
    assert_eq!(top["average"], rounds[1]["average"]);
    assert_eq!(top["average"], r["average"]);
    assert_eq!(top["rounds"].as_array().unwrap().len(), 2);
    let svg = std::fs::read_to_string(out.join("domain_weights.svg")).unwrap();
    assert!(svg.contains("each round"), "{svg}");
    // Again: both rounds are reused, nothing is trained.
    let o = run(&["--rounds", "3", "--converged", "1"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("round 1/3: reusing") && e.contains("round 2/3: reusing"),
        "{e}"
    );
    assert!(!e.contains("2/2: the proxy"), "{e}");
    let again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["average"], r["average"]);
    // Another step size: round 1 keeps its reference but learns new weights, so round 2's
    // reference (trained on the old ones) is trained again.
    let o = run(&["--rounds", "2", "--eta", "0.5", "--converged", "0"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    assert!(!e.contains("reusing the finished round"), "{e}");
    assert!(e.contains("round 1/2: reusing the reference model"), "{e}");
    assert!(
        e.contains("trained on other weights: training it again"),
        "{e}"
    );
    assert!(e.contains("round 2/2: 1/2: the reference model"), "{e}");
    assert!(e.contains("did not converge in 2 rounds"), "{e}");
    for (extra, want) in [
        (&["--rounds", "0"][..], "--rounds"),
        (&["--rounds", "2", "--converged", "2"][..], "--converged"),
    ] {
        let o = run(extra);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(want), "{e}");
    }
}

/// Training text from Parquet (a DSIR selection of the pyarrow-written fixture pool) and from a
/// gzip file; a null text in a Parquet row is named.
#[test]
fn trains_on_parquet_and_compressed_text() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d, 1, 0, "");
    let pool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parquet");
    let sel = d.join("sel.parquet");
    let o = lmkit(&[
        "data",
        "select",
        "--target",
        d.join("train.txt").to_str().unwrap(),
        "--raw",
        pool.to_str().unwrap(),
        "--n",
        "100",
        "--min-length",
        "1",
        "--skip-bad",
        "--out",
        sel.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gz = d.join("more.txt.gz");
    let f = std::fs::File::create(&gz).unwrap();
    let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    std::io::Write::write_all(&mut e, "the dog sat on the mat. ".repeat(200).as_bytes()).unwrap();
    e.finish().unwrap();
    let run = |files: &str| {
        let cfg = format!(
            "[model]\nhidden_size = 32\nintermediate_size = 64\nnum_layers = 2\nnum_heads = 4\n\
             max_position_embeddings = 64\n\n[data]\ntrain = [{files}]\nseq_len = 16\n\
             tokenizer = \"tok.gguf\"\n\n[train]\nsteps = 2\nbatch = 2\nlr = 1e-3\n"
        );
        let p = d.join("pq.toml");
        std::fs::write(&p, cfg).unwrap();
        let out = d.join("pq-out");
        let _ = std::fs::remove_dir_all(&out);
        train(&p, &out, &[])
    };
    let o = run("\"sel.parquet\", \"more.txt.gz\"");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    // 100 rows of about 10 words plus 1,200 words of text: well over 100 sequences of 16.
    let seqs: usize = e
        .split(" training sequences")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(seqs > 100, "{e}");
    let o = run(&format!(
        "\"{}\"",
        pool.join("train-00000-of-00002.parquet").display()
    ));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("row 8") && e.contains("null"),
        "{e}"
    );
}
