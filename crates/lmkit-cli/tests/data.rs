//! `lmkit data select` / `kl` on small pools: target-like records are chosen whole, in the
//! pool's layout (JSONL fields kept, gzip in and out), and bad input is a clear error that
//! leaves no output behind.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

fn lmkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(args)
        .output()
        .unwrap()
}

/// `lmkit data select` of 20 records of at least 5 words, plus `extra`.
fn select(target: &Path, raw: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "data",
        "select",
        "--target",
        target.to_str().unwrap(),
        "--raw",
        raw.to_str().unwrap(),
        "--n",
        "20",
        "--min-length",
        "5",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lmkit(&args)
}

fn gz(path: &Path, text: &str) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    e.write_all(text.as_bytes()).unwrap();
    e.finish().unwrap();
}

fn gunzip(path: &Path) -> String {
    let mut s = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()),
        &mut s,
    )
    .unwrap();
    s
}

#[test]
fn selects_target_like_records_whole() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.txt");
    let t: String = (0..50)
        .map(|i| format!("the cat sat on the mat number {i} and the dog ran to the park\n"))
        .collect();
    std::fs::write(&target, t).unwrap();
    // A pool: 20 cat-and-dog records among 200 about markets, with an extra field each.
    let mut pool = String::new();
    for i in 0..220 {
        let text = if i % 11 == 0 {
            format!("a cat and a dog sat on the mat in the park {i}")
        } else {
            format!("stock markets fell as interest rates rose in quarter {i}")
        };
        pool.push_str(&format!("{{\"id\": {i}, \"text\": \"{text}\"}}\n"));
    }
    let raw = dir.path().join("pool.jsonl.gz");
    gz(&raw, &pool);
    let out = dir.path().join("sel.jsonl.gz");
    let o = select(&target, &raw, &out, &["--top-k", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["raw_records"].as_u64(), r["selected"].as_u64()),
        (Some(220), Some(20))
    );
    assert!(r["kl_reduction"].as_f64().unwrap() > 0.0, "{r}");
    let lines: Vec<serde_json::Value> = gunzip(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<u64> = lines.iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (0..220).step_by(11).collect::<Vec<u64>>());
    // kl on the written selection agrees with the report.
    let o = lmkit(&[
        "data",
        "kl",
        "--target",
        target.to_str().unwrap(),
        "--raw",
        raw.to_str().unwrap(),
        "--selected",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let k: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (a, b) = (
        k["kl_reduction"].as_f64().unwrap(),
        r["kl_reduction"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    // Sampling (not top-k) with a seed is reproducible.
    let run = |seed: &str, name: &str| {
        let p = dir.path().join(name);
        let o = select(&target, &raw, &p, &["--seed", seed]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(&p).unwrap()
    };
    assert_eq!(run("7", "a.jsonl"), run("7", "b.jsonl"));
    // The same pool zstd-compressed gives the same top-k selection.
    let zst = dir.path().join("pool.jsonl.zst");
    let packed = ruzstd::encoding::compress_to_vec(
        pool.as_bytes(),
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    std::fs::write(&zst, packed).unwrap();
    let plain = dir.path().join("z.jsonl");
    let o = select(&target, &zst, &plain, &["--top-k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), gunzip(&out));
}

/// Token n-grams instead of words (a tokenizer trained here), and zstd output in several frames
/// that lmkit reads back.
#[test]
fn tokenizer_features_and_zstd_output() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.txt");
    let t: String = (0..50)
        .map(|i| format!("The cat sat on the mat number {i} and the dog ran to the park\n"))
        .collect();
    std::fs::write(&target, &t).unwrap();
    let mut pool = String::new();
    for i in 0..220 {
        let text = if i % 11 == 0 {
            format!("A cat and a dog sat on the mat in the park {i}")
        } else {
            format!("Stock markets fell as interest rates rose in quarter {i}")
        };
        pool.push_str(&format!("{{\"id\": {i}, \"text\": \"{text}\"}}\n"));
    }
    let raw = dir.path().join("pool.jsonl");
    std::fs::write(&raw, &pool).unwrap();
    let tok = dir.path().join("tok");
    let o = lmkit(&[
        "tokenizer",
        "train",
        target.to_str().unwrap(),
        raw.to_str().unwrap(),
        "--vocab-size",
        "400",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("sel.jsonl.zst");
    let o = select(
        &target,
        &raw,
        &out,
        &["--top-k", "--json", "--tokenizer", tok.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["features"]["tokenizer"], tok.to_str().unwrap(), "{r}");
    assert!(r["kl_reduction"].as_f64().unwrap() > 0.0, "{r}");
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut ruzstd::decoding::StreamingDecoder::new(std::fs::File::open(&out).unwrap()).unwrap(),
        &mut text,
    )
    .unwrap();
    let ids: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(ids, (0..220).step_by(11).collect::<Vec<u64>>());
    // The .zst selection is read back (and scores as the report said).
    let o = lmkit(&[
        "data",
        "kl",
        "--target",
        target.to_str().unwrap(),
        "--raw",
        raw.to_str().unwrap(),
        "--selected",
        out.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let k: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (a, b) = (
        k["kl_reduction"].as_f64().unwrap(),
        r["kl_reduction"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    // Token features differ from word features (case is kept, pieces are sub-words).
    let words = dir.path().join("w.jsonl");
    let o = select(&target, &raw, &words, &["--top-k", "--json"]);
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_ne!(w["kl_target_raw"], r["kl_target_raw"]);
    // A missing tokenizer is named.
    let o = select(
        &target,
        &raw,
        &words,
        &["--tokenizer", "nope/tokenizer.json"],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("nope"), "{e}");
}

/// A Parquet pool (written by pyarrow: scripts/fixtures/make_parquet_fixture.py) gives a
/// Parquet selection with every column of the chosen rows; a null text is a malformed record.
#[test]
fn parquet_pool_gives_a_parquet_selection() {
    use arrow_array::{Array, Int64Array};
    let dir = tempfile::tempdir().unwrap();
    let pool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parquet");
    let target = dir.path().join("target.txt");
    let t: String = (0..50)
        .map(|i| format!("the cat sat on the mat number {i} and the dog ran to the park\n"))
        .collect();
    std::fs::write(&target, t).unwrap();
    let out = dir.path().join("sel.parquet");
    // Row 8 of the first file (id 7) has a null text: an error naming it, unless skipped.
    let o = select(&target, &pool, &out, &["--top-k"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("train-00000-of-00002.parquet row 8"),
        "{e}"
    );
    assert!(!out.exists());
    let o = select(&target, &pool, &out, &["--top-k", "--skip-bad", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["raw_records"].as_u64(), r["skipped_lines"].as_u64()),
        (Some(219), Some(1))
    );
    let f = std::fs::File::open(&out).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let schema = arrow_array::RecordBatchReader::schema(&reader);
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["id", "text", "tags", "meta"]);
    let mut ids = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let col = b.column_by_name("id").unwrap();
        let a = col.as_any().downcast_ref::<Int64Array>().unwrap();
        ids.extend(a.iter().map(|v| v.unwrap()));
        assert_eq!(b.column_by_name("meta").unwrap().null_count(), 0);
    }
    assert_eq!(ids, (0..220).step_by(11).collect::<Vec<i64>>());
    // The selection reads back as a corpus and scores as reported.
    let o = lmkit(&[
        "data",
        "kl",
        "--target",
        target.to_str().unwrap(),
        "--raw",
        pool.to_str().unwrap(),
        "--selected",
        out.to_str().unwrap(),
        "--skip-bad",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let k: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (a, b) = (
        k["kl_reduction"].as_f64().unwrap(),
        r["kl_reduction"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    // A Parquet pool is not written as JSONL; a missing column is named.
    let o = select(&target, &pool, &dir.path().join("s.jsonl"), &["--skip-bad"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("name the output *.parquet"),
        "{e}"
    );
    let o = select(&target, &pool, &out, &["--field", "body"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("no column `body`") && e.contains("id, text"),
        "{e}"
    );
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t.txt");
    std::fs::write(&target, "the cat sat on the mat\n").unwrap();
    let raw = dir.path().join("raw.jsonl");
    std::fs::write(
        &raw,
        "{\"text\": \"the cat ran\"}\n{\"text\": \"a dog sat\"}\n{oops\n",
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let sel = |t: &Path, r: &Path, n: &str, extra: &[&str]| {
        let mut args = vec![
            "data",
            "select",
            "--target",
            t.to_str().unwrap(),
            "--raw",
            r.to_str().unwrap(),
            "--n",
            n,
            "--min-length",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = lmkit(&args);
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!e.contains("panicked"), "{e}");
        (o.status.code(), e)
    };
    let (code, e) = sel(&target, &raw, "1", &[]);
    assert_eq!(code, Some(1));
    assert!(e.contains("raw.jsonl:3"), "{e}");
    assert!(!out.exists());
    // Skipped and counted on request.
    let (code, e) = sel(&target, &raw, "1", &["--skip-bad"]);
    assert_eq!(code, Some(0), "{e}");
    std::fs::remove_file(&out).unwrap();
    let (_, e) = sel(&target, &raw, "5", &["--skip-bad"]);
    assert!(e.contains("larger than the raw pool"), "{e}");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let (_, e) = sel(&empty, &raw, "1", &["--skip-bad"]);
    assert!(e.contains("target is empty"), "{e}");
    let (_, e) = sel(&target, &dir.path().join("missing.jsonl"), "1", &[]);
    assert!(e.contains("missing.jsonl"), "{e}");
    let other = dir.path().join("other.jsonl");
    std::fs::write(&other, "{\"body\": \"the cat\"}\n").unwrap();
    let (_, e) = sel(&target, &other, "1", &[]);
    assert!(e.contains("no field `text`"), "{e}");
    let far = dir.path().join("far.txt");
    std::fs::write(&far, "zebra quokka\n").unwrap();
    let (_, e) = sel(
        &far,
        &raw,
        "1",
        &["--skip-bad", "--ngrams", "1", "--buckets", "1000000"],
    );
    assert!(e.contains("share no n-gram"), "{e}");
    assert!(!out.exists());
}
