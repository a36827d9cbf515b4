//! `lmkit serve` on the default model, driven by the official `openai` Python package
//! (`scripts/openai_client_check.py`; the package installed with pip into the cache on first
//! use): chat and text completions, streamed and not, log-probabilities, `n`, and the
//! errors a client sees. Then SIGTERM during a streamed request: the request finishes and the
//! server exits cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The pinned client version (its API is what users run against us).
const OPENAI: &str = "openai==3.51.0";

/// A folder with the `openai` package and its dependencies (`pip install --target`, once, in
/// the cache), for `python3` with `PYTHONPATH` set to it.
fn client_packages() -> PathBuf {
    let home = lmkit::default_model::cache_dir().expect("cache dir");
    let dir = home.join("py-openai-3.51.0");
    let stamp = dir.join("installed.ok");
    if stamp.exists() {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ok = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&dir)
        .arg(OPENAI)
        .status()
        .expect("python3 -m pip")
        .success();
    assert!(ok, "pip install {OPENAI} --target {} failed", dir.display());
    std::fs::write(&stamp, "").unwrap();
    dir
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
    let packages = client_packages();
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
    let out = Command::new("python3")
        .env("PYTHONPATH", &packages)
        .arg(script())
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("k3y")
        .output()
        .expect("python client");
    // SIGTERM while a request streams: the server stops taking connections but finishes it.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = r#"{"model": "m", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 48, "ignore_eos": true, "stream": true}"#;
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let n = c.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    unsafe {
        libc::kill(server.id() as i32, libc::SIGTERM);
    }
    let mut rest = String::new();
    let _ = c.read_to_string(&mut rest);
    assert!(
        rest.contains("data: [DONE]"),
        "the in-flight stream was cut: {rest}"
    );
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
