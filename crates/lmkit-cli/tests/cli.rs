//! The `lmkit` binary on a tiny random model: every subcommand works, and every bad input is a
//! clear message with a non-zero exit, never a panic or a hang.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lmkit_core::GgmlDType;
use lmkit_models::testing::{write_tiny_gguf, write_tiny_gguf_with};
use lmkit_models::LlamaConfig;

fn lmkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(args)
        .env(
            "LMKIT_HOME",
            std::env::temp_dir().join("lmkit-cli-test-home-unused"),
        )
        .output()
        .unwrap()
}

fn tiny(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    write_tiny_gguf(&p, &LlamaConfig::tiny(), 11, GgmlDType::Q8_0).unwrap();
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed command: non-zero exit, the message contains `want`, and nothing panicked.
fn fails_with(o: &Output, want: &str) {
    let e = stderr(o);
    // 1: a runtime error; 2: a command-line usage error (clap).
    assert!(
        matches!(o.status.code(), Some(1) | Some(2)),
        "{:?}: {e}",
        o.status
    );
    assert!(e.contains(want), "expected `{want}` in: {e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn run_info_ppl_bench_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let m = m.to_str().unwrap();
    let o = lmkit(&[
        "run",
        "--model",
        m,
        "the cat",
        "-n",
        "8",
        "--greedy",
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["completion_tokens"], 8);
    // Greedy is deterministic.
    let o2 = lmkit(&[
        "run",
        "--model",
        m,
        "the cat",
        "-n",
        "8",
        "--greedy",
        "--ignore-eos",
        "--json",
    ]);
    let v2: serde_json::Value = serde_json::from_slice(&o2.stdout).unwrap();
    assert_eq!(v["tokens"], v2["tokens"]);

    let o = lmkit(&["info", "--model", m, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["config"]["num_layers"], 2);
    assert!(v["parameters"].as_u64().unwrap() > 50_000);

    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "the cat ran in the rain and then the cat sat. ".repeat(30),
    )
    .unwrap();
    let o = lmkit(&[
        "ppl",
        text.to_str().unwrap(),
        "--model",
        m,
        "--ctx",
        "64",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ppl = v["ppl"].as_f64().unwrap();
    // A random model over a 128-token vocabulary: finite, above 1.
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");
    assert_eq!(v["scored_tokens"].as_u64().unwrap() % 31, 0); // 31 scored per window of 64

    let o = lmkit(&[
        "bench", "--model", m, "-p", "32", "-n", "4", "-r", "1", "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let ms = m.to_str().unwrap();

    fails_with(
        &lmkit(&["run", "--model", "/no/such/model.gguf", "hi"]),
        "/no/such/model.gguf",
    );
    fails_with(
        &lmkit(&["run", "--model", ms, "hi", "--threads", "0"]),
        "threads",
    );

    let bytes = std::fs::read(&m).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    fails_with(
        &lmkit(&["info", "--model", cut.to_str().unwrap()]),
        "truncated",
    );

    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model at all").unwrap();
    fails_with(
        &lmkit(&["info", "--model", junk.to_str().unwrap()]),
        "not a GGUF file",
    );

    // The tiny model's context is 256 tokens.
    let long = "a b ".repeat(300);
    fails_with(&lmkit(&["run", "--model", ms, &long, "-n", "4"]), "context");
    // A count that would wrap when added to the prompt's length.
    let most = usize::MAX.to_string();
    fails_with(
        &lmkit(&["run", "--model", ms, "hi", "-n", &most]),
        "context",
    );
    let o = lmkit(&[
        "run",
        "--model",
        ms,
        &long,
        "-n",
        "4",
        "--truncate-prompt",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    fails_with(
        &lmkit(&["run", "--model", ms, "hi", "--top-p", "0"]),
        "top-p",
    );
    fails_with(
        &lmkit(&["run", "--model", ms, "hi", "--temperature=-1"]),
        "temperature",
    );
    fails_with(
        &lmkit(&["ppl", "/no/such.txt", "--model", ms]),
        "/no/such.txt",
    );
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    fails_with(
        &lmkit(&["ppl", short.to_str().unwrap(), "--model", ms, "--ctx", "64"]),
        "fewer than one window",
    );
    fails_with(
        &lmkit(&[
            "ppl",
            short.to_str().unwrap(),
            "--model",
            ms,
            "--ctx",
            "100000",
        ]),
        "context length",
    );
    fails_with(&lmkit(&["bench", "--model", ms, "-p", "100000"]), "context");
}

/// A model with NaN weights: `info --check` names the tensor, and generation, perplexity and
/// the multiple-choice harness stop with an error that points at it, where they used to give
/// "0 generated" or a NaN perplexity.
#[test]
fn nan_weights_are_found_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny(dir.path());
    let good = good.to_str().unwrap();
    let bad = dir.path().join("nan.gguf");
    write_tiny_gguf_with(&bad, &LlamaConfig::tiny(), 11, GgmlDType::F32, |name, v| {
        if name == "model.layers.1.mlp.down_proj.weight" {
            v[5] = f32::NAN;
            v[9] = f32::INFINITY;
        }
    })
    .unwrap();
    let bad = bad.to_str().unwrap();
    let o = lmkit(&["info", "--model", good, "--check"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("every weight is finite"));
    let o = lmkit(&["info", "--model", good, "--check", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["non_finite_weights"], serde_json::json!([]));
    let o = lmkit(&["info", "--model", bad, "--check"]);
    fails_with(&o, "`model.layers.1.mlp.down_proj.weight` (2 of ");
    assert!(stderr(&o).contains("1 weight hold"), "{}", stderr(&o));
    let o = lmkit(&["info", "--model", bad, "--check", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["non_finite_weights"][0]["non_finite"], 2);
    // Without --check, info does not read the weights' values.
    assert!(lmkit(&["info", "--model", bad]).status.success());

    fails_with(
        &lmkit(&["run", "--model", bad, "the cat", "-n", "4"]),
        "lmkit info --check",
    );
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "the cat sat on the mat. ".repeat(40)).unwrap();
    let t = text.to_str().unwrap();
    let o = lmkit(&["ppl", t, "--model", bad, "--ctx", "64"]);
    fails_with(&o, "window 1, position");
    assert!(stderr(&o).contains("NaN or infinite"), "{}", stderr(&o));
    let o = lmkit(&["ppl", t, "--model", bad, "--ctx", "64", "--kv", "h2o"]);
    fails_with(&o, "NaN or infinite");
}

/// `--device`/`--dtype` on a CPU build, batched bench, and `lmkit logits` comparing runs.
#[test]
fn devices_dtypes_batches_and_logits() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let m = m.to_str().unwrap();
    if !lmkit_core::device::CUDA_BUILT {
        let o = lmkit(&["run", "--model", m, "hi", "-n", "2", "--device", "cuda"]);
        fails_with(&o, "built without CUDA");
    }
    fails_with(
        &lmkit(&["run", "--model", m, "hi", "--device", "tpu"]),
        "device",
    );
    fails_with(
        &lmkit(&["run", "--model", m, "hi", "--dtype", "int3"]),
        "dtype",
    );

    // Batched bench (native batched kernels): one row per test, tokens/s over all sequences.
    let o = lmkit(&[
        "bench", "--model", m, "-p", "8", "-n", "4", "-r", "1", "-b", "3", "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["batch"], 3);
    let tests: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["test"].as_str().unwrap())
        .collect();
    assert_eq!(tests, ["pp8 x3", "tg4 x3"]);

    // Logits: f32 against itself is exact; bf16 is close but not equal; a bar it misses fails.
    let f32_path = dir.path().join("f32.st");
    let f32_str = f32_path.to_str().unwrap();
    let text = "the cat sat on the mat and the dog";
    let o = lmkit(&[
        "logits",
        "--model",
        m,
        text,
        "--dequantize",
        "--out",
        f32_str,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = lmkit(&[
        "logits",
        "--model",
        m,
        text,
        "--dequantize",
        "--compare",
        f32_str,
        "--max-diff",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(c["max_abs_diff"], 0.0);
    assert_eq!(c["argmax_agreement"], 1.0);
    let o = lmkit(&[
        "logits",
        "--model",
        m,
        text,
        "--dequantize",
        "--dtype",
        "bf16",
        "--compare",
        f32_str,
        "--max-diff",
        "1e-9",
    ]);
    fails_with(&o, "exceeds --max-diff");
    let o = lmkit(&["logits", "--model", m, "other words", "--compare", f32_str]);
    fails_with(&o, "token ids differ");

    // GGUF export: the file loads and runs; a bad type is a clear error.
    let q8 = dir.path().join("q8.gguf");
    let q8 = q8.to_str().unwrap();
    let o = lmkit(&["export", "--model", m, "--type", "q8_0", "--out", q8]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = lmkit(&[
        "run",
        "--model",
        q8,
        "the cat",
        "-n",
        "3",
        "--greedy",
        "--ignore-eos",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = lmkit(&["export", "--model", m, "--type", "q3_x", "--out", q8]);
    fails_with(&o, "GGUF type `q3_x`");
}

#[test]
fn quantize_a_tiny_model_and_run_it() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let m = m.to_str().unwrap();
    let text = dir.path().join("calib.txt");
    std::fs::write(&text, "the cat sat on the mat and the dog ran. ".repeat(40)).unwrap();
    let calib = text.to_str().unwrap();
    let out = dir.path().join("q.gguf");
    let o = lmkit(&[
        "quantize",
        "--model",
        m,
        "--method",
        "gptq",
        "--bits",
        "3",
        "--calib",
        calib,
        "--calib-ctx",
        "32",
        "--calib-windows",
        "4",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["layers"].as_array().unwrap().len(), 14);
    assert_eq!(v["calib_tokens"], 128);
    let bpw = v["bits_per_weight_layers"].as_f64().unwrap();
    assert!(bpw > 3.0 && bpw < 3.6, "{bpw}");
    assert!(v["mean_rel_error"].as_f64().unwrap() > 0.0);
    let o = lmkit(&["info", "--model", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("LB3"));
    let o = lmkit(&[
        "ppl",
        calib,
        "--model",
        out.to_str().unwrap(),
        "--ctx",
        "32",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["ppl"].as_f64().unwrap().is_finite());

    // A low-bit file is dequantized (rotations undone) and can be quantized again.
    let again = dir.path().join("again.gguf");
    let o = lmkit(&[
        "quantize",
        "--model",
        out.to_str().unwrap(),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(again.exists());

    // Bad input: clear errors, no output file left behind.
    let bad_out = dir.path().join("bad.gguf");
    let bo = bad_out.to_str().unwrap();
    // A tensor type lmkit cannot dequantize (GGML type 16, IQ2_XXS): the error names the
    // file, the tensor and the type.
    let mut bytes = std::fs::read(&out).unwrap();
    let name = b"blk.0.attn_q.weight";
    let at = (8..bytes.len() - name.len())
        .find(|&i| {
            &bytes[i..i + name.len()] == name
                && bytes[i - 8..i] == (name.len() as u64).to_le_bytes()
        })
        .expect("tensor info of blk.0.attn_q.weight");
    let dims = at + name.len();
    let n_dims = u32::from_le_bytes(bytes[dims..dims + 4].try_into().unwrap()) as usize;
    let ty = dims + 4 + 8 * n_dims;
    bytes[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    let iq2 = dir.path().join("iq2.gguf");
    std::fs::write(&iq2, &bytes).unwrap();
    let o = lmkit(&[
        "quantize",
        "--model",
        iq2.to_str().unwrap(),
        "--method",
        "rtn",
        "--out",
        bo,
    ]);
    fails_with(&o, "tensor `blk.0.attn_q.weight` has GGML type 16");
    fails_with(&o, "iq2.gguf");
    let q = |extra: &[&str]| {
        let mut args = vec!["quantize", "--model", m, "--out", bo];
        args.extend_from_slice(extra);
        lmkit(&args)
    };
    fails_with(&q(&["--bits", "5", "--method", "rtn"]), "2, 3 or 4");
    fails_with(&q(&["--method", "awq"]), "expected rtn, gptq or quip");
    fails_with(
        &q(&["--method", "gptq", "--calib", calib, "--calib-ctx", "4096"]),
        "longer than the model's context",
    );
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    fails_with(
        &q(&[
            "--method",
            "gptq",
            "--calib",
            empty.to_str().unwrap(),
            "--calib-ctx",
            "32",
        ]),
        "less than one window",
    );
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "the cat").unwrap();
    fails_with(
        &q(&[
            "--method",
            "quip",
            "--calib",
            short.to_str().unwrap(),
            "--calib-ctx",
            "64",
        ]),
        "less than one window",
    );
    let missing = dir.path().join("no-such-dir").join("q.gguf");
    let o = lmkit(&[
        "quantize",
        "--model",
        m,
        "--method",
        "rtn",
        "--bits",
        "4",
        "--out",
        missing.to_str().unwrap(),
    ]);
    fails_with(&o, "does not exist");
    let jsonl = dir.path().join("c.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"a\"}\n{\"body\": \"b\"}\n").unwrap();
    fails_with(
        &q(&[
            "--method",
            "gptq",
            "--calib",
            jsonl.to_str().unwrap(),
            "--calib-ctx",
            "32",
        ]),
        "no string field `text`",
    );
    assert!(!bad_out.exists());
}

#[test]
fn kv_cache_policies_in_ppl_run_and_bench() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let m = m.to_str().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "the cat sat on the mat and the dog ran far away. ".repeat(30),
    )
    .unwrap();
    let t = text.to_str().unwrap();
    let svg = dir.path().join("kv.svg");

    // Streaming perplexity: the full cache first, then each policy with its agreement.
    let o = lmkit(&[
        "ppl",
        t,
        "--model",
        m,
        "--ctx",
        "48",
        "--max-windows",
        "2",
        "--kv",
        "window,h2o",
        "--kv-budget",
        "0.25,8",
        "--plot",
        svg.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "full",
            "window 25%",
            "window 8 tokens",
            "h2o 25%",
            "h2o 8 tokens"
        ]
    );
    assert_eq!(runs[0]["final_entries"], 47.0);
    assert!(runs[0]["top1_agreement"].is_null());
    for r in &runs[1..] {
        let a = r["top1_agreement"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{r}");
        assert!(
            r["peak_kv_bytes"].as_u64() < runs[0]["peak_kv_bytes"].as_u64(),
            "{r}"
        );
        assert!(r["ppl"].as_f64().unwrap().is_finite());
    }
    assert_eq!(runs[2]["final_entries"], 8.0);
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.contains("h2o") && plot.contains("window") && plot.contains("</svg>"));

    // Generation keeps the cache within a token budget.
    let o = lmkit(&[
        "run",
        "--model",
        m,
        "hello there",
        "-n",
        "40",
        "--ignore-eos",
        "--kv",
        "h2o",
        "--kv-budget",
        "8",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kv_policy"], "h2o 8 tokens");
    assert_eq!(v["kv_entries"], 8);
    assert_eq!(v["completion_tokens"], 40);

    // bench: one tg row per policy, with the KV bytes held.
    let o = lmkit(&[
        "bench",
        "--model",
        m,
        "-p",
        "0",
        "-n",
        "32",
        "-r",
        "1",
        "--kv",
        "full,h2o",
        "--kv-budget",
        "0.25",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["kv"], "h2o 25%");
    assert!(rows[1]["kv_peak_bytes"].as_u64() < rows[0]["kv_peak_bytes"].as_u64());

    // Bad options: clear errors.
    fails_with(
        &lmkit(&["run", "--model", m, "hi", "--kv", "lru"]),
        "expected full, window or h2o",
    );
    fails_with(
        &lmkit(&["run", "--model", m, "hi", "--kv", "h2o", "--kv-budget", "0"]),
        "at least 1",
    );
    fails_with(
        &lmkit(&["run", "--model", m, "hi", "--kv-budget", "0.5"]),
        "add --kv",
    );
    fails_with(
        &lmkit(&[
            "run",
            "--model",
            m,
            "hi",
            "--kv",
            "h2o",
            "--kv-budget",
            "0.1,0.2",
        ]),
        "one policy",
    );
    // The reference path (bf16 compute, quantized weights) evicts too.
    let out = lmkit(&[
        "run",
        "--model",
        m,
        "hi",
        "--kv",
        "h2o",
        "--kv-budget",
        "4",
        "--dtype",
        "bf16",
        "-n",
        "8",
        "--ignore-eos",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fails_with(
        &lmkit(&["ppl", t, "--model", m, "--plot", "x.svg"]),
        "add --kv",
    );
}
