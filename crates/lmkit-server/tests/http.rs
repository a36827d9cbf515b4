//! The server over raw HTTP on 127.0.0.1, with a tiny random model: answers, streaming, the
//! OpenAI error objects for bad input, the API key, a full queue, and a client that leaves
//! mid-stream (its slot is freed).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lmkit_core::GgmlDType;
use lmkit_generate::engine::{self, EngineConfig};
use lmkit_models::testing::write_tiny_gguf;
use lmkit_models::{load, LlamaConfig, LoadOptions};
use lmkit_server::{AppState, ServerConfig};
use serde_json::Value;

struct Server {
    port: u16,
    native: bool,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn start(max_batch: usize, max_queue: usize, api_key: Option<&str>) -> Server {
    start_with(LoadOptions::default(), max_batch, max_queue, api_key)
}

fn start_with(
    opts: LoadOptions,
    max_batch: usize,
    max_queue: usize,
    api_key: Option<&str>,
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, &LlamaConfig::tiny(), 11, GgmlDType::Q8_0).unwrap();
    let m = load(&p, opts).unwrap();
    let native = m.model.is_native();
    let tok = Arc::new(m.tokenizer);
    let (handle, _thread) = engine::start(
        Arc::new(m.model),
        tok.clone(),
        EngineConfig {
            max_batch,
            max_queue,
            prefill_tokens: 64,
            prefix_cache: 4,
        },
    )
    .unwrap();
    let state = Arc::new(AppState::new(
        handle,
        tok,
        Arc::new(m.chat),
        ServerConfig {
            model_id: "tiny".into(),
            api_key: api_key.map(str::to_string),
            max_body: 1 << 20,
        },
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(lmkit_server::serve(
        listener,
        state,
        std::future::pending::<()>(),
    ));
    Server {
        port,
        native,
        _rt: rt,
        _dir: dir,
    }
}

/// One request; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: &[u8], headers: &[&str]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body: ignore a broken pipe.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (status, dechunk(&body))
}

/// Removes HTTP/1.1 chunked framing (hex length lines).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((len, tail)) = rest.split_once("\r\n") else {
            return if out.is_empty() {
                body.to_string()
            } else {
                out
            };
        };
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 || tail.len() < n {
            return out;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn chat(port: u16, extra: &str) -> (u16, String) {
    let body = format!(
        r#"{{"model": "tiny", "messages": [{{"role": "user", "content": "the cat sat"}}]{extra}}}"#
    );
    http(port, "POST", "/v1/chat/completions", body.as_bytes(), &[])
}

fn error_of(status: u16, body: &str, want_status: u16, want: &str) {
    assert_eq!(status, want_status, "{body}");
    let v = json(body);
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains(want), "expected `{want}` in {body}");
    assert!(v["error"]["type"].is_string(), "{body}");
}

/// The deltas of a chat stream, concatenated; panics unless it ends with [DONE].
fn stream_text(body: &str) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    let lines: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(lines.last(), Some(&"[DONE]"), "{body}");
    for l in &lines[..lines.len() - 1] {
        let v = json(l);
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    (text, finish)
}

fn metric(port: u16, name: &str) -> f64 {
    let (_, m) = http(port, "GET", "/metrics", b"", &[]);
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn answers_streams_and_batches() {
    let s = start(4, 16, None);
    assert!(s.native);
    let (st, body) = http(s.port, "GET", "/health", b"", &[]);
    assert_eq!(st, 200, "{body}");
    let (st, body) = http(s.port, "GET", "/v1/models", b"", &[]);
    assert_eq!(st, 200);
    assert_eq!(json(&body)["data"][0]["id"], "tiny");

    // Greedy: the same text streamed or not, alone or among other requests.
    let (st, body) = chat(s.port, r#", "temperature": 0, "max_tokens": 12"#);
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["object"], "chat.completion");
    let used = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used <= 12 && used > 0, "{body}");
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        used + v["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    let (st, body) = chat(
        s.port,
        r#", "temperature": 0, "max_tokens": 12, "stream": true"#,
    );
    assert_eq!(st, 200, "{body}");
    let (streamed, finish) = stream_text(&body);
    assert_eq!(streamed, text);
    assert!(finish.is_some());
    let threads: Vec<_> = (0..6)
        .map(|k| {
            let port = s.port;
            std::thread::spawn(move || {
                let extra = if k % 2 == 0 {
                    r#", "temperature": 0, "max_tokens": 12"#
                } else {
                    r#", "temperature": 0.9, "max_tokens": 20, "seed": 3"#
                };
                chat(port, extra)
            })
        })
        .collect();
    for (k, t) in threads.into_iter().enumerate() {
        let (st, body) = t.join().unwrap();
        assert_eq!(st, 200, "{body}");
        if k % 2 == 0 {
            assert_eq!(json(&body)["choices"][0]["message"]["content"], text);
        }
    }

    // Text completions with logprobs, n = 2, a stop string.
    let (st, body) = http(
        s.port,
        "POST",
        "/v1/completions",
        br#"{"model": "tiny", "prompt": "the dog", "max_tokens": 5, "logprobs": 3, "n": 2, "temperature": 0}"#,
        &[],
    );
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    let lp = &v["choices"][0]["logprobs"];
    let n = lp["tokens"].as_array().unwrap().len();
    assert!(n > 0 && n <= 5, "{body}");
    assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);
    // Up to 3 alternatives (two ids may decode to the same text, one key); greedy picks the
    // most likely, so the chosen token's logprob is the best of them.
    let top = lp["top_logprobs"][0].as_object().unwrap();
    assert!((1..=3).contains(&top.len()), "{body}");
    let best = top
        .values()
        .map(|v| v.as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    let chosen = lp["token_logprobs"][0].as_f64().unwrap();
    assert!((best - chosen).abs() < 1e-4, "{best} vs {chosen}");
    // Frequency and presence penalties: greedy text repeats fewer tokens with them.
    let repeats = |extra: &str| {
        let body = format!(
            r#"{{"model": "tiny", "prompt": "the dog", "max_tokens": 24, "logprobs": 0, "temperature": 0{extra}}}"#
        );
        let (st, body) = http(s.port, "POST", "/v1/completions", body.as_bytes(), &[]);
        assert_eq!(st, 200, "{body}");
        let v = json(&body);
        let toks: Vec<String> = v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        let distinct: std::collections::HashSet<&String> = toks.iter().collect();
        toks.len() - distinct.len()
    };
    let plain = repeats("");
    let penalized = repeats(r#", "frequency_penalty": 2, "presence_penalty": 2"#);
    eprintln!("greedy repeats: {plain} plain, {penalized} with penalties");
    assert!(
        plain > 0 && penalized < plain,
        "{penalized} vs {plain} repeats"
    );
    // Per-request H2O.
    let (st, body) = chat(
        s.port,
        r#", "max_tokens": 30, "kv": "h2o", "kv_budget": "8""#,
    );
    assert_eq!(st, 200, "{body}");

    // Everything was answered: nothing queued or running.
    assert_eq!(metric(s.port, "lmkit_queue_depth"), 0.0);
    assert_eq!(metric(s.port, "lmkit_active_sequences"), 0.0);
    assert!(metric(s.port, "lmkit_generated_tokens_total") > 0.0);
    // The repeated prompts came from the prefix cache (and gave the same greedy text above).
    assert!(metric(s.port, "lmkit_prompt_tokens_cached_total") > 0.0);
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = start(2, 4, None);
    let p = s.port;
    let post = |body: &[u8]| http(p, "POST", "/v1/chat/completions", body, &[]);
    let (st, b) = post(b"{not json");
    error_of(st, &b, 400, "not valid JSON");
    let (st, b) = chat(p, r#", "frobnicate": 1"#);
    error_of(
        st,
        &b,
        400,
        "Unrecognized request argument supplied: frobnicate",
    );
    assert_eq!(json(&b)["error"]["param"], "frobnicate");
    let (st, b) = chat(p, r#", "max_tokens": "ten""#);
    error_of(st, &b, 400, "`max_tokens` must be an integer, got a string");
    assert_eq!(json(&b)["error"]["param"], "max_tokens");
    let (st, b) = chat(p, r#", "temperature": -1.5"#);
    error_of(st, &b, 400, "temperature");
    let (st, b) = chat(p, r#", "stream": "yes""#);
    error_of(st, &b, 400, "`stream` must be a boolean");
    let (st, b) = post(br#"{"model": "tiny", "messages": []}"#);
    error_of(st, &b, 400, "at least one message");
    let (st, b) = post(br#"{"model": "tiny"}"#);
    error_of(st, &b, 400, "missing field `messages`");
    let (st, b) = chat(p, r#", "max_tokens": 0"#);
    error_of(st, &b, 400, "at least 1");
    let (st, b) = chat(p, r#", "max_tokens": 1000000000"#);
    error_of(st, &b, 400, "maximum context length");
    assert_eq!(json(&b)["error"]["code"], "context_length_exceeded");
    let long = "the cat ".repeat(400);
    let (st, b) = post(
        format!(r#"{{"model": "tiny", "messages": [{{"role": "user", "content": "{long}"}}]}}"#)
            .as_bytes(),
    );
    error_of(st, &b, 400, "maximum context length");
    let (st, b) = chat(p, r#", "temperature": 7"#);
    error_of(st, &b, 400, "temperature");
    let (st, b) = chat(p, r#", "presence_penalty": 2.5"#);
    error_of(st, &b, 400, "`presence_penalty` must be between -2 and 2");
    assert_eq!(json(&b)["error"]["param"], "presence_penalty");
    let (st, b) = chat(p, r#", "kv": "lru""#);
    error_of(st, &b, 400, "expected full, window or h2o");
    let (st, b) = post(br#"{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}"#);
    error_of(st, &b, 400, "unknown role");
    // Token-id prompts (OpenAI accepts them) are refused by name, as is a count that would
    // wrap past the context check.
    let comp = |body: &[u8]| http(p, "POST", "/v1/completions", body, &[]);
    let (st, b) = comp(br#"{"model": "tiny", "prompt": [1, 2, 3]}"#);
    error_of(st, &b, 400, "token-id prompts are not supported");
    let (st, b) = comp(br#"{"model": "tiny", "prompt": "a", "max_tokens": 18446744073709551615}"#);
    error_of(st, &b, 400, "maximum context length");
    assert!(!b.contains("requested 0 tokens"), "{b}");
    let big = vec![b'x'; 2 << 20];
    let (st, b) = post(&big);
    error_of(st, &b, 413, "too large");
    let (st, b) = http(p, "GET", "/v2/nothing", b"", &[]);
    error_of(st, &b, 404, "no such route");
    // Still serving.
    let (st, b) = chat(p, r#", "max_tokens": 3"#);
    assert_eq!(st, 200, "{b}");
}

#[test]
fn api_key_queue_limit_and_cancellation() {
    let s = start(1, 0, Some("sesame"));
    let p = s.port;
    let (st, b) = chat(p, r#", "max_tokens": 2"#);
    error_of(st, &b, 401, "API key");
    let auth = ["Authorization: Bearer sesame"];
    let body =
        br#"{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}"#;
    let (st, b) = http(p, "POST", "/v1/chat/completions", body, &auth);
    assert_eq!(st, 200, "{b}");
    let (st, _) = http(p, "GET", "/health", b"", &[]);
    assert_eq!(st, 200, "health needs no key");

    // A long streamed request holds the only slot; with no queue a second one gets 503. (With
    // no queue at all, a request is taken only while the engine waits for one: retry until the
    // engine is back from the previous request.)
    let long = br#"{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "ignore_eos": true, "stream": true}"#;
    let mut tries = 0;
    let c = loop {
        let mut c = TcpStream::connect(("127.0.0.1", p)).unwrap();
        write!(
            c,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            long.len()
        )
        .unwrap();
        c.write_all(long).unwrap();
        let mut first = [0u8; 256];
        let n = c.read(&mut first).unwrap();
        if String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200") {
            break c;
        }
        tries += 1;
        assert!(tries < 200, "the long request never got the slot");
        std::thread::sleep(Duration::from_millis(10));
    };
    let (st, b) = http(p, "POST", "/v1/chat/completions", body, &auth);
    error_of(st, &b, 503, "busy");
    // The client leaves mid-stream: its slot is freed and counted as cancelled.
    drop(c);
    let t = Instant::now();
    while metric(p, "lmkit_active_sequences") != 0.0
        || metric(p, "lmkit_sequences_cancelled_total") < 1.0
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the slot was not freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (st, b) = http(p, "POST", "/v1/chat/completions", body, &auth);
    assert_eq!(st, 200, "{b}");
}

/// A model on the reference path (f16 compute: the GPU's path) is served too, one forward call
/// per request and step: greedy text is the same alone and among concurrent requests, streams
/// match, and H2O runs on its tensor cache.
#[test]
fn serves_a_model_on_the_reference_path() {
    let s = start_with(
        LoadOptions {
            dequantize: true,
            dtype: Some(lmkit_core::DType::F16),
        },
        4,
        16,
        None,
    );
    assert!(!s.native);
    let greedy = r#", "temperature": 0, "max_tokens": 10"#;
    let (st, body) = chat(s.port, greedy);
    assert_eq!(st, 200, "{body}");
    let alone = json(&body)["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!alone.is_empty(), "{body}");
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let port = s.port;
            std::thread::spawn(move || chat(port, greedy))
        })
        .collect();
    for t in threads {
        let (st, body) = t.join().unwrap();
        assert_eq!(st, 200, "{body}");
        assert_eq!(
            json(&body)["choices"][0]["message"]["content"],
            alone.as_str()
        );
    }
    let (st, body) = chat(
        s.port,
        r#", "temperature": 0, "max_tokens": 10, "stream": true"#,
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(stream_text(&body).0, alone);
    let (st, body) = chat(
        s.port,
        r#", "max_tokens": 30, "kv": "h2o", "kv_budget": "8""#,
    );
    assert_eq!(st, 200, "{body}");
}
