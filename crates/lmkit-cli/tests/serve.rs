//! `lmkit serve` on the default model, driven by the official `openai` Python package
//! (`scripts/openai_client_check.py`, installed with pip into a cached virtual environment on
//! first use): chat and text completions, streamed and not, log-probabilities, `n`, and the
//! errors a client sees. Then SIGTERM: the server drains and exits cleanly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The pinned client version (its API is what users run against us).
const OPENAI: &str = "openai==3.51.0";

/// A virtual environment with the `openai` package, made once in the cache.
fn client_python() -> PathBuf {
    let home = lmkit::default_model::cache_dir().expect("cache dir");
    let venv = home.join("py-openai");
    let py = venv.join("bin").join("python");
    let stamp = venv.join(format!("{OPENAI}.ok"));
    if stamp.exists() {
        return py;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 -m venv")
        .success();
    assert!(
        ok,
        "cannot make a virtual environment at {}",
        venv.display()
    );
    let ok = Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            OPENAI,
        ])
        .status()
        .expect("pip install openai")
        .success();
    assert!(ok, "pip install {OPENAI} failed");
    std::fs::write(&stamp, "").unwrap();
    py
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai_client_check.py")
}

#[test]
fn the_openai_client_talks_to_lmkit_serve() {
    let model = lmkit::default_model::ensure(&mut |_, _, _| {}).expect("default model");
    let py = client_python();
    let port = free_port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args([
            "serve",
            "--port",
            &port.to_string(),
            "--api-key",
            "k3y",
            "--max-batch",
            "4",
        ])
        .arg("--model")
        .arg(&model)
        .stderr(Stdio::piped())
        .spawn()
        .expect("lmkit serve");
    // Wait for "lmkit serve: http://…".
    let mut err = BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    let t = Instant::now();
    while !line.contains("http://") {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("lmkit serve exited before listening");
        }
        assert!(t.elapsed() < Duration::from_secs(120));
    }
    let out = Command::new(&py)
        .arg(script())
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("k3y")
        .output()
        .expect("python client");
    // SIGTERM: graceful shutdown.
    unsafe {
        libc::kill(server.id() as i32, libc::SIGTERM);
    }
    let status = server.wait().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status.success(), "lmkit serve exited with {status:?}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();

    let chat = &v["chat"];
    assert_eq!(chat["role"], "assistant");
    assert!(chat["text"].as_str().unwrap().contains("Berlin"), "{chat}");
    let u = &chat["usage"];
    assert!(u["completion_tokens"].as_u64().unwrap() <= 16);
    // Greedy: streamed text equals the whole answer; usage arrives in the last chunk.
    assert_eq!(v["chat_stream"]["text"], chat["text"]);
    assert_eq!(v["chat_stream"]["finish"], chat["finish"]);
    assert_eq!(v["chat_stream"]["usage"], chat["usage"]);
    let lp = v["chat_logprobs"].as_array().unwrap();
    assert!(!lp.is_empty() && lp.len() <= 4);
    for t in lp {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(t["top"], 2);
    }
    assert_eq!(v["completion"]["text"], v["completion_stream"]);
    assert!(!v["completion"]["text"].as_str().unwrap().is_empty());
    assert_eq!(v["n"], 2);
    let e = &v["errors"];
    for k in [
        "empty_messages",
        "max_tokens_zero",
        "max_tokens_huge",
        "unknown_field",
    ] {
        assert_eq!(e[k]["status"], 400, "{k}: {e}");
    }
    assert!(e["unknown_field"]["message"]
        .as_str()
        .unwrap()
        .contains("frobnicate"));
    assert_eq!(v["wrong_key"], 401);
}
