//! Bad model files: every one is a clear error naming the file and what is wrong, never a panic.

use lmkit_core::GgmlDType;
use lmkit_models::testing::write_tiny_gguf;
use lmkit_models::{load, LlamaConfig, LoadOptions};

fn tiny_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.gguf");
    write_tiny_gguf(&p, &LlamaConfig::tiny(), 9, GgmlDType::Q8_0).unwrap();
    std::fs::read(p).unwrap()
}

fn load_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    std::fs::write(&p, bytes).unwrap();
    let e = load(&p, LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("bad.gguf"), "error does not name the file: {e}");
    e
}

#[test]
fn wrong_magic() {
    let mut b = tiny_bytes();
    b[..4].copy_from_slice(b"GGML");
    let e = load_err(&b);
    assert!(e.contains("not a GGUF file"), "{e}");
}

#[test]
fn unsupported_version() {
    let mut b = tiny_bytes();
    b[4..8].copy_from_slice(&99u32.to_le_bytes());
    let e = load_err(&b);
    assert!(e.contains("version 99"), "{e}");
}

#[test]
fn corrupted_header_counts() {
    let mut b = tiny_bytes();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    let e = load_err(&b);
    assert!(e.contains("tensor count"), "{e}");
    let mut b = tiny_bytes();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes()); // metadata count
    let e = load_err(&b);
    assert!(e.contains("metadata count"), "{e}");
}

#[test]
fn corrupted_string_length() {
    let mut b = tiny_bytes();
    // The first metadata key's length field.
    b[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let e = load_err(&b);
    assert!(e.contains("metadata key #0"), "{e}");
}

#[test]
fn truncated_anywhere() {
    let b = tiny_bytes();
    for cut in [0, 3, 10, 30, 200, 2000, b.len() / 2, b.len() - 1] {
        let e = load_err(&b[..cut]);
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
    }
}

#[test]
fn tensor_data_past_end_of_file() {
    let b = tiny_bytes();
    let e = load_err(&b[..b.len() - 100]);
    assert!(e.contains("runs past the end of the file"), "{e}");
}

#[test]
fn unknown_architecture() {
    let mut b = tiny_bytes();
    // "general.architecture" = "llama" → "gpt-j" would change lengths; swap for a 5-letter name.
    let pos = b.windows(5).position(|w| w == b"llama").unwrap();
    b[pos..pos + 5].copy_from_slice(b"mamba");
    let e = load_err(&b);
    assert!(e.contains("unknown architecture `mamba`"), "{e}");
}

#[test]
fn missing_file_and_missing_config() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(&dir.path().join("nope.gguf"), LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.gguf") && e.contains("no such file"), "{e}");
    let e = load(dir.path(), LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let e = load(dir.path(), LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );
}

/// A path that is not a regular file (a device) is named as such; a corrupt HF config says
/// its JSON error once.
#[test]
fn not_a_regular_file_and_bad_json() {
    if std::path::Path::new("/dev/null").exists() {
        let e = load(std::path::Path::new("/dev/null"), LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/null") && e.contains("not a regular file"),
            "{e}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{").unwrap();
    let e = load(dir.path(), LoadOptions::default()).unwrap_err();
    let chain: Vec<String> =
        std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .map(|e| e.to_string())
            .collect();
    let all = chain.join(": ");
    assert!(all.contains("config.json") && all.contains("EOF"), "{all}");
    assert_eq!(all.matches("EOF").count(), 1, "{all}");
}
