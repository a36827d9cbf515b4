//! `lmkit eval` against lm-evaluation-harness, and its errors.
//!
//! Fixtures: `tests/fixtures/lmeval_smollm2*.json`, made by
//! `scripts/fixtures/make_lmeval_fixture.py`: lm-eval 0.4.13's HF backend on the default model as
//! transformers dequantizes it (f32), with every choice's log-likelihood: the first 200 items of
//! seven multiple-choice tasks, 5 items of each MMLU subject (5-shot), 200 LAMBADA passages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lmkit_core::GgmlDType;
use lmkit_models::testing::{write_tiny_gguf, write_tiny_gguf_with};
use lmkit_models::LlamaConfig;

/// Items per task compared here (the fixture has 200; docs/results.md compares them all).
const ITEMS: usize = 20;
/// Largest |Δ log-likelihood| allowed per choice, lmkit (f32) vs lm-eval + transformers (f32).
const MAX_LL_DIFF: f64 = 2e-3;

fn lmkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(args)
        .output()
        .unwrap()
}

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// Runs `lmkit eval` on `tasks` (first `items` each, f32 weights) and checks every choice's
/// log-likelihood and every item's outcome against the lm-eval fixture `fixture`.
fn compare(fixture: &str, tasks: &[&str], items: usize) {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file(fixture)).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.jsonl");
    let limit = items.to_string();
    let o = lmkit(&[
        "eval",
        "--tasks",
        &tasks.join(","),
        "--limit",
        &limit,
        "--dequantize",
        "--json",
        "--log-samples",
        samples.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["results"].as_array().unwrap().len(), tasks.len());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&samples)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for t in tasks {
        let want = fx["tasks"][t]["items"].as_array().unwrap();
        let got: Vec<&serde_json::Value> = lines.iter().filter(|s| s["task"] == *t).collect();
        assert_eq!(got.len(), items, "{t}");
        let (mut worst, mut same_acc, mut acc) = (0f64, 0, 0.0);
        for (g, w) in got.iter().zip(want) {
            let (gl, wl) = (
                g["logprobs"].as_array().unwrap(),
                w["lls"].as_array().unwrap(),
            );
            assert_eq!(gl.len(), wl.len(), "{t} item {}", w["doc_id"]);
            for (a, b) in gl.iter().zip(wl) {
                worst = worst.max((a.as_f64().unwrap() - b.as_f64().unwrap()).abs());
            }
            // Multiple choice: lm-eval's acc; LAMBADA: its greedy flag.
            let theirs = match w
                .get("greedy")
                .filter(|_| fx["tasks"][t]["perplexity"].is_number())
            {
                Some(gr) => f64::from(u8::from(gr[0].as_bool().unwrap())),
                None => w["acc"].as_f64().unwrap(),
            };
            same_acc += usize::from(g["acc"].as_f64() == Some(theirs));
            acc += g["acc"].as_f64().unwrap();
        }
        assert!(worst < MAX_LL_DIFF, "{t}: max |Δll| {worst}");
        // Equal log-likelihoods up to 2e-3 can still flip a near-tie; allow one item.
        assert!(
            same_acc + 1 >= items,
            "{t}: {same_acc} of {items} items agree"
        );
        let reported = r["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["task"] == *t)
            .unwrap()["metrics"]["acc"]["value"]
            .as_f64()
            .unwrap();
        assert!((reported - acc / items as f64).abs() < 1e-12, "{t}");
    }
}

#[test]
fn matches_lm_evaluation_harness_on_the_default_model() {
    compare(
        "tests/fixtures/lmeval_smollm2.json",
        &[
            "hellaswag",
            "arc_easy",
            "arc_challenge",
            "piqa",
            "boolq",
            "winogrande",
            "openbookqa",
        ],
        ITEMS,
    );
}

/// MMLU 5-shot (the dev split's first five as examples) and LAMBADA's greedy accuracy.
#[test]
fn matches_lm_evaluation_harness_on_mmlu_and_lambada() {
    compare(
        "tests/fixtures/lmeval_smollm2_mmlu.json",
        &["mmlu_anatomy", "mmlu_high_school_us_history"],
        5,
    );
    compare(
        "tests/fixtures/lmeval_smollm2_lambada.json",
        &["lambada_openai"],
        ITEMS,
    );
}

fn tiny(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    write_tiny_gguf(&p, &LlamaConfig::tiny(), 11, GgmlDType::F32).unwrap();
    p
}

#[test]
fn task_files_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = tiny(d);
    let items = d.join("items.jsonl");
    std::fs::write(
        &items,
        "{\"q\": \"the cat\", \"opts\": [\"sat\", \"ran\"], \"gold\": 0}\n\
         {\"q\": \"a dog\", \"opts\": [\"sat\", \"ran\", \"hid\"], \"gold\": 2}\n",
    )
    .unwrap();
    let task = |name: &str, body: &str| {
        let p = d.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let good = task(
        "good.toml",
        "name = \"mine\"\ndataset = \"items.jsonl\"\nkind = \"multiple_choice\"\n\
         text = \"Q: {{ q }}\"\nchoices = \"opts\"\ntarget = \"gold\"\nmetrics = [\"acc\", \"acc_norm\"]\n",
    );
    let eval = |model: &Path, task: &Path, data: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--tasks",
            task.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ];
        args.extend(extra);
        lmkit(&args)
    };
    let run = |task: &Path, data: &Path| eval(&m, task, data, &["--json"]);
    let o = run(&good, &items);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["results"][0]["items"], 2);
    // A dataset folder: its data files only (not the `cache-*` files `datasets` leaves there).
    let folder = d.join("data/items");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(&items, folder.join("data-00000.jsonl")).unwrap();
    std::fs::write(folder.join("cache-0123.jsonl"), "not json\n").unwrap();
    let in_folder = task(
        "folder.toml",
        "name = \"mine\"\ndataset = \"items\"\nkind = \"multiple_choice\"\n\
         text = \"Q: {{ q }}\"\nchoices = \"opts\"\ntarget = \"gold\"\nmetrics = [\"acc\"]\n",
    );
    let o = run(&in_folder, &d.join("data"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["results"][0]["items"], 2);
    let o = eval(&m, &good, &items, &["--limit", "0"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("no items") && e.contains("--limit 0"),
        "{e}"
    );
    let acc = r["results"][0]["metrics"]["acc"]["value"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    // A model with a NaN weight: an error naming the request, not an accuracy of NaN scores.
    let nan = d.join("nan.gguf");
    write_tiny_gguf_with(&nan, &LlamaConfig::tiny(), 11, GgmlDType::F32, |name, v| {
        if name == "model.layers.0.self_attn.v_proj.weight" {
            v[0] = f32::NAN;
        }
    })
    .unwrap();
    let o = eval(&nan, &good, &items, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("mine: item 1, choice 1")
            && e.contains("lmkit info --check"),
        "{e}"
    );
    let fails = |o: Output, want: &str| {
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(
            e.contains(want) && !e.contains("panicked"),
            "want `{want}` in: {e}"
        );
    };
    fails(
        lmkit(&[
            "eval",
            "--tasks",
            "no_such_task",
            "--model",
            m.to_str().unwrap(),
        ]),
        "no such task",
    );
    fails(
        run(
            &task("bad.toml", "name = \"x\"\nkind = \"multiple_choice\"\n"),
            &items,
        ),
        "missing field",
    );
    // An empty choice is scored (as the harness does) with a warning naming it.
    std::fs::write(
        &items,
        "{\"q\": \"the cat\", \"opts\": [\"sat\", \"\"], \"gold\": 0}\n",
    )
    .unwrap();
    let o = run(&good, &items);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && e.contains("item 0: choice 1 is empty"),
        "{e}"
    );
    // A context longer than the model's is cut from the left, with a warning.
    let long = format!(
        "{{\"q\": \"{}\", \"opts\": [\"sat\"], \"gold\": 0}}\n",
        "the cat ".repeat(200)
    );
    std::fs::write(&items, long).unwrap();
    let o = run(&good, &items);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && e.contains("1 of 1 items were cut"),
        "{e}"
    );
    // A gold answer outside the choices, and a missing field, name the item.
    std::fs::write(
        &items,
        "{\"q\": \"the cat\", \"opts\": [\"sat\"], \"gold\": 3}\n",
    )
    .unwrap();
    fails(run(&good, &items), "not one of the 1 choices");
    std::fs::write(&items, "{\"opts\": [\"sat\"], \"gold\": 0}\n").unwrap();
    fails(run(&good, &items), "item 0");
    fails(run(&good, &d.join("missing.jsonl")), "missing.jsonl");
}

#[test]
fn generation_tasks_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = tiny(d);
    let items = d.join("gen.jsonl");
    std::fs::write(
        &items,
        "{\"q\": \"2 and 3\", \"a\": \"5\"}\n{\"q\": \"1 and 1\", \"a\": \"2\"}\n",
    )
    .unwrap();
    let task = |body: &str| {
        let p = d.join("gen.toml");
        std::fs::write(&p, body).unwrap();
        p
    };
    let base = "name = \"sums\"\ndataset = \"gen.jsonl\"\nkind = \"generate_until\"\n\
         text = \"Q: {{ q }}\\nA:\"\ntarget = \"{{ a }}\"\nuntil = [\"\\n\"]\nmax_gen_toks = 4\n\
         metrics = [\"exact_match\", \"token_edit_distance\", \"per_token_acc\", \"target_logprob\", \"brier_score\"]\n";
    let run = |task: &Path| {
        let samples = d.join("s.jsonl");
        let o = lmkit(&[
            "eval",
            "--tasks",
            task.to_str().unwrap(),
            "--data",
            items.to_str().unwrap(),
            "--model",
            m.to_str().unwrap(),
            "--json",
            "--log-samples",
            samples.to_str().unwrap(),
        ]);
        let s = std::fs::read_to_string(&samples).unwrap_or_default();
        (o, s)
    };
    let (o, samples) = run(&task(&format!(
        "{base}filters = [{{ name = \"num\", regex = \"([0-9]+)\" }}]\n"
    )));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let met = &r["results"][0]["metrics"];
    for k in [
        "exact_match,num",
        "token_edit_distance",
        "per_token_acc",
        "target_logprob",
        "brier_score",
    ] {
        assert!(met[k]["value"].is_number(), "{k}: {met}");
    }
    let acc = met["per_token_acc"]["value"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(met["target_logprob"]["value"].as_f64().unwrap() < 0.0);
    let brier = met["brier_score"]["value"].as_f64().unwrap();
    assert!((0.0..=2.0).contains(&brier), "{brier}");
    let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    assert!(first["generation"]["output"].is_string(), "{first}");
    assert_eq!(first["item"]["target"], "5");
    let fails = |o: Output, want: &str| {
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(
            e.contains(want) && !e.contains("panicked"),
            "want `{want}` in: {e}"
        );
    };
    // A pattern the regex engine cannot take is named.
    fails(
        run(&task(&format!(
            "{base}filters = [{{ name = \"num\", regex = \"(?<=x)y\" }}]\n"
        )))
        .0,
        "(?<=x)y",
    );
    fails(
        run(&task(
            &base.replace("max_gen_toks = 4", "max_gen_toks = 100000"),
        ))
        .0,
        "leaves no room",
    );
    fails(
        run(&task(&base.replace("target = \"{{ a }}\"\n", ""))).0,
        "needs `target`",
    );
    fails(
        lmkit(&[
            "eval",
            "--tasks",
            "arithmetic_mul_12",
            "--model",
            m.to_str().unwrap(),
        ]),
        "digits must be",
    );
}

/// GSM8K chain of thought (8 fixed examples, greedy generation, two answer extractions) on the
/// first items: the same generated text and the same extracted answers as lm-eval.
#[test]
fn matches_lm_evaluation_harness_on_gsm8k_cot() {
    const N: usize = 8;
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("tests/fixtures/lmeval_smollm2_gsm8k.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.jsonl");
    let o = lmkit(&[
        "eval",
        "--tasks",
        "gsm8k_cot",
        "--limit",
        &N.to_string(),
        "--dequantize",
        "--json",
        "--log-samples",
        samples.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours: Vec<serde_json::Value> = std::fs::read_to_string(&samples)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ours.len(), N);
    let (mut same_text, mut same_answer, mut compared) = (0, 0, 0);
    for w in fx["tasks"]["gsm8k_cot"]["items"].as_array().unwrap() {
        let id = w["doc_id"].as_u64().unwrap() as usize;
        if id >= N {
            continue;
        }
        let g = &ours[id]["generation"];
        let (_, answer, hit) = g["answers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a[0].as_str().unwrap(),
                    a[1].as_str().unwrap(),
                    a[2].as_bool().unwrap(),
                )
            })
            .find(|a| a.0 == w["filter"])
            .unwrap();
        compared += 1;
        // Greedy decoding can part ways at a near tie; allow one item of N to differ.
        same_answer += usize::from(
            answer == w["answer"] && f64::from(u8::from(hit)) == w["exact_match"].as_f64().unwrap(),
        );
        if w["filter"] == "strict-match" {
            same_text += usize::from(
                g["output"].as_str().unwrap().trim() == w["output"].as_str().unwrap().trim(),
            );
        }
    }
    assert_eq!(compared, 2 * N);
    assert!(same_text >= N - 1, "{same_text} of {N} outputs identical");
    assert!(
        same_answer >= 2 * N - 2,
        "{same_answer} of {} answers identical",
        2 * N
    );
}
