//! `lmkit tokenizers parity` on small declarations and the tiny model's tokenizer: the premium
//! is each language's tokens over English's on the shared articles, and bad input is named.

use std::path::Path;
use std::process::{Command, Output};

use lmkit_core::GgmlDType;
use lmkit_models::testing::write_tiny_gguf;
use lmkit_models::LlamaConfig;

fn lmkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(args)
        .output()
        .unwrap()
}

fn declaration(dir: &Path, code: &str, name: &str, articles: &[(u32, &str)]) {
    let body: String = articles
        .iter()
        .map(|(n, t)| {
            format!("<article data-number=\"{n}\"><h2>Article {n}</h2><p>{t}</p></article>\n")
        })
        .collect();
    std::fs::write(
        dir.join(format!("{code}.html")),
        format!("<html><head><title>{name}</title></head><body><h1>UDHR</h1>{body}</body></html>"),
    )
    .unwrap();
}

#[test]
fn premiums_are_token_ratios_on_shared_articles() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = d.join("tiny.gguf");
    write_tiny_gguf(&tok, &LlamaConfig::tiny(), 11, GgmlDType::F32).unwrap();
    declaration(
        d,
        "eng",
        "English",
        &[
            (1, "All human beings are born free."),
            (2, "Everyone is entitled."),
        ],
    );
    // Article 2 only: English is compared on article 2 alone.
    declaration(
        d,
        "dbl",
        "Doubled",
        &[(2, "Everyone is entitled. Everyone is entitled.")],
    );
    let out = d.join("out");
    let udhr = d.to_str().unwrap();
    let parity = |tok: &str, langs: &str, extra: &[&str]| {
        let mut args = vec![
            "tokenizers",
            "parity",
            "--udhr",
            udhr,
            "--tokenizers",
            tok,
            "--langs",
            langs,
        ];
        args.extend_from_slice(extra);
        lmkit(&args)
    };
    let tok = tok.to_str().unwrap();
    let o = parity(tok, "eng,dbl", &["--json", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cells = r["tokenizers"][0]["cells"].as_array().unwrap();
    assert_eq!(cells[0]["premium"], 1.0);
    let (t, e) = (
        cells[1]["tokens"].as_f64().unwrap(),
        cells[1]["english_tokens"].as_f64().unwrap(),
    );
    assert!((cells[1]["premium"].as_f64().unwrap() - t / e).abs() < 1e-12);
    // The doubled text costs about twice the tokens of the same English article.
    assert!((1.8..=2.2).contains(&(t / e)), "{t} / {e}");
    assert!(e < cells[0]["tokens"].as_f64().unwrap());
    assert!(out.join("parity.svg").is_file() && out.join("parity.json").is_file());
    // A language that is not there, and a tokenizer that is not there, are named.
    for (o, want) in [
        (parity(tok, "xyz", &[]), "`xyz`"),
        (parity("/no/such.gguf", "dbl", &[]), "/no/such.gguf"),
    ] {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && e.contains(want) && !e.contains("panicked"),
            "{e}"
        );
    }
}
