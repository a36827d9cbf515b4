//! `lmkit train`'s data: text files, JSONL (a text field, or chat `messages`), and folders of
//! them, tokenized into one stream with a target mask (chat trains on the assistant only).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lmkit::formats::chat::{ChatTemplate, Message};
use lmkit::formats::gguf::GgufFile;
use lmkit::formats::tokenizer::LoadedTokenizer;
use lmkit::train::sft;

/// One training document.
pub enum Doc {
    Text(String),
    /// A conversation: only the assistant's turns are targets.
    Chat(Vec<Message>),
}

/// Every file under `paths` (folders recursively, sorted), as documents: a `.jsonl` file gives
/// one per line, anything else is one text document. A JSONL line is a conversation if it has
/// `messages`, or the two fields of `pair` (a prompt and its completion, e.g. `prompt` and
/// `completion`, or `question` and `answer`: a user turn and the assistant's reply); else its
/// text `field`.
pub fn documents(paths: &[PathBuf], field: &str, pair: (&str, &str)) -> Result<Vec<Doc>> {
    let mut files = Vec::new();
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read folder {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, out)?;
            }
        } else if p.is_file() {
            out.push(p.to_path_buf());
        } else {
            bail!("{}: no such file or folder", p.display());
        }
        Ok(())
    }
    for p in paths {
        walk(p, &mut files)?;
    }
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("cannot read {} as UTF-8", f.display()))?;
        if f.extension().is_none_or(|e| e != "jsonl") {
            docs.push(Doc::Text(text));
            continue;
        }
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let at = || format!("{}:{}", f.display(), i + 1);
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}: bad JSON", at()))?;
            let (p, c) = (
                v.get(pair.0).and_then(|x| x.as_str()),
                v.get(pair.1).and_then(|x| x.as_str()),
            );
            if let (Some(p), Some(c)) = (p, c) {
                docs.push(Doc::Chat(vec![
                    Message::new("user", p),
                    Message::new("assistant", c),
                ]));
            } else if v.get("messages").is_some() {
                match sft::parse_messages(&v) {
                    Some(m) => docs.push(Doc::Chat(m)),
                    None => bail!(
                        "{}: `messages` must be a list of {{\"role\", \"content\"}} strings",
                        at()
                    ),
                }
            } else {
                match v.get(field).and_then(|s| s.as_str()) {
                    Some(s) => docs.push(Doc::Text(s.to_string())),
                    None => bail!("{}: no string field `{field}` (nor `messages`)", at()),
                }
            }
        }
    }
    Ok(docs)
}

/// Documents → one token stream (EOS after each text document) and, when there is chat data,
/// the target mask (text: every token; chat: the assistant's tokens).
pub fn tokenize(tok: &LoadedTokenizer, docs: &[Doc]) -> Result<(Vec<u32>, Option<Vec<u8>>)> {
    let chat = docs.iter().any(|d| matches!(d, Doc::Chat(_)));
    let template = match (&tok.chat_template, chat) {
        (_, false) => None,
        (Some(t), true) => {
            let name = |id: Option<u32>| {
                id.and_then(|i| tok.tokenizer.id_to_token(i))
                    .unwrap_or_default()
            };
            Some(ChatTemplate::new(
                t,
                &name(tok.special.bos),
                &name(tok.special.eos),
            )?)
        }
        (None, true) => Some(ChatTemplate::chatml()?),
    };
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for d in docs {
        match d {
            Doc::Text(t) if t.trim().is_empty() => {}
            Doc::Text(t) => {
                let v = tok.encode(t)?;
                mask.resize(mask.len() + v.len(), 1);
                ids.extend(v);
                if let Some(eos) = tok.special.eos {
                    ids.push(eos);
                    mask.push(1);
                }
            }
            Doc::Chat(m) => {
                let Some(template) = &template else { continue };
                let (v, mk) = sft::chat_tokens(tok, template, m)?;
                ids.extend(v);
                mask.extend(mk);
            }
        }
    }
    Ok((ids, chat.then_some(mask)))
}

/// A tokenizer from a GGUF file, an HF folder or a tokenizer.json (default: the default
/// model's).
pub fn load_tokenizer(path: Option<&Path>) -> Result<LoadedTokenizer> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => crate::common::fetch_default(false)?,
    };
    let tok = if path.extension().is_some_and(|e| e == "gguf") {
        LoadedTokenizer::from_gguf(&GgufFile::open(&path)?)?
    } else if path.is_dir() {
        LoadedTokenizer::from_tokenizer_json(&path.join("tokenizer.json"))?
    } else {
        LoadedTokenizer::from_tokenizer_json(&path)?
    };
    Ok(tok)
}
