//! `lmkit train`'s data: text files, JSONL (a text field, or chat `messages`), and folders of
//! them, tokenized as a stream into a token file (`lmkit_train::tokens`) with a target mask
//! (chat trains on the assistant only). Memory stays bounded by one document or one piece of
//! a text file, whatever the corpus size; the token file is memory-mapped for training and
//! reused on `--resume` when the sources and tokenizer are unchanged.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lmkit::formats::chat::{ChatTemplate, Message};
use lmkit::formats::gguf::GgufFile;
use lmkit::formats::tokenizer::LoadedTokenizer;
use lmkit::train::sft;
use lmkit::train::tokens::{Sink, Tokens};
use serde::{Deserialize, Serialize};

/// Text files are tokenized in pieces of about this many bytes, cut after a line end (a single
/// line is never cut, so a file without line breaks is read whole). Tokenizing pieces apart can
/// differ from tokenizing the whole file at the cuts (e.g. a `\n\n` pair split in two), once
/// per megabyte.
const PIECE: usize = 1 << 20;

/// One training document.
pub enum Doc {
    /// Text; `end` is true for a document's last piece (EOS follows it).
    Text { text: String, end: bool },
    /// A conversation: only the assistant's turns are targets.
    Chat(Vec<Message>),
}

/// How JSONL lines are read.
pub struct Fields<'a> {
    /// The text field.
    pub text: &'a str,
    /// A prompt and its completion (a user turn and the assistant's reply).
    pub pair: (&'a str, &'a str),
}

/// Every file under `paths` (folders recursively, sorted): the library's walker.
pub fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    Ok(lmkit::data::corpus::files(paths)?)
}

/// Streams the documents of `files` to `each`: a `.jsonl` file gives one per line, a Parquet
/// file one per row (its `fields.text` column), anything else is one text document (handed over
/// in pieces); `.gz` and `.zst` files are decompressed. A JSONL line is a conversation if it has
/// `messages`, or both fields of `fields.pair`; else its `fields.text`.
pub fn for_each_document(
    files: &[PathBuf],
    fields: &Fields,
    each: &mut dyn FnMut(Doc) -> Result<()>,
) -> Result<()> {
    for f in files {
        if lmkit::data::corpus::is_parquet(f) {
            let layout = lmkit::data::corpus::Layout {
                field: fields.text.to_string(),
                skip_bad: false,
            };
            lmkit::data::corpus::for_each_batch(
                std::slice::from_ref(f),
                &layout,
                1024,
                &mut |b| {
                    for r in b {
                        each(Doc::Text {
                            text: r.text,
                            end: true,
                        })
                        .map_err(|e| lmkit::data::Error::Invalid {
                            what: f.display().to_string(),
                            why: format!("{e:#}"),
                        })?;
                    }
                    Ok(())
                },
            )?;
            continue;
        }
        let mut r = lmkit::data::corpus::open(f)?;
        let jsonl = lmkit::data::corpus::is_jsonl(f);
        let mut buf = String::new();
        let mut line_no = 0;
        loop {
            let start = buf.len();
            let n = r
                .read_line(&mut buf)
                .with_context(|| format!("cannot read {} as UTF-8", f.display()))?;
            line_no += 1;
            if jsonl {
                if n == 0 {
                    break;
                }
                if !buf.trim().is_empty() {
                    let at = format!("{}:{line_no}", f.display());
                    each(json_document(&buf, fields, &at)?)?;
                }
                buf.clear();
                continue;
            }
            let eof = n == 0;
            // A text piece ends at the file's end, or after a line once PIECE bytes are in.
            if eof || (buf.len() >= PIECE && start > 0) {
                let text = std::mem::take(&mut buf);
                each(Doc::Text { text, end: eof })?;
            }
            if eof {
                break;
            }
        }
    }
    Ok(())
}

fn json_document(line: &str, fields: &Fields, at: &str) -> Result<Doc> {
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("{at}: bad JSON"))?;
    let (p, c) = (
        v.get(fields.pair.0).and_then(|x| x.as_str()),
        v.get(fields.pair.1).and_then(|x| x.as_str()),
    );
    if let (Some(p), Some(c)) = (p, c) {
        return Ok(Doc::Chat(vec![
            Message::new("user", p),
            Message::new("assistant", c),
        ]));
    }
    if v.get("messages").is_some() {
        return match sft::parse_messages(&v) {
            Some(m) => {
                // The roles chat templates know; another is a typo that would train on nothing.
                const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];
                if let Some((i, bad)) = m
                    .iter()
                    .enumerate()
                    .find(|(_, x)| !ROLES.contains(&x.role.as_str()))
                {
                    bail!(
                        "{at}: message {i} has role `{}`; expected one of {}",
                        bad.role,
                        ROLES.join(", ")
                    );
                }
                Ok(Doc::Chat(m))
            }
            None => bail!("{at}: `messages` must be a list of {{\"role\", \"content\"}} strings"),
        };
    }
    match v.get(fields.text).and_then(|s| s.as_str()) {
        Some(s) => Ok(Doc::Text {
            text: s.to_string(),
            end: true,
        }),
        None => bail!("{at}: no string field `{}` (nor `messages`)", fields.text),
    }
}

/// Tokenizes documents into a sink: EOS after each text document; chat rendered with the
/// model's template (ChatML without one), context-only except the assistant's tokens.
pub struct Tokenizing<'a> {
    tok: &'a LoadedTokenizer,
    template: Option<ChatTemplate>,
    /// The current text document has non-blank text (blank documents get no EOS).
    started: bool,
}

impl<'a> Tokenizing<'a> {
    pub fn new(tok: &'a LoadedTokenizer) -> Self {
        Self {
            tok,
            template: None,
            started: false,
        }
    }

    pub fn push(&mut self, sink: &mut Sink, d: Doc) -> Result<()> {
        let tok = self.tok;
        match d {
            Doc::Text { text, end } => {
                if !text.trim().is_empty() {
                    sink.push(&tok.encode(&text)?, true)?;
                    self.started = true;
                }
                if let (true, true, Some(eos)) = (end, self.started, tok.special.eos) {
                    sink.push(&[eos], true)?;
                }
                if end {
                    self.started = false;
                }
            }
            Doc::Chat(m) => {
                if self.template.is_none() {
                    self.template = Some(match &tok.chat_template {
                        Some(t) => {
                            let name = |id: Option<u32>| {
                                id.and_then(|i| tok.tokenizer.id_to_token(i))
                                    .unwrap_or_default()
                            };
                            ChatTemplate::new(t, &name(tok.special.bos), &name(tok.special.eos))?
                        }
                        None => ChatTemplate::chatml()?,
                    });
                }
                if let Some(template) = &self.template {
                    let (v, mk) = sft::chat_tokens(tok, template, &m)?;
                    // Runs of equal mask values go out together.
                    let mut i = 0;
                    while i < v.len() {
                        let j = (i..v.len()).find(|&j| mk[j] != mk[i]).unwrap_or(v.len());
                        sink.push(&v[i..j], mk[i] != 0)?;
                        i = j;
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a token file was made from: reused only when all of it matches.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Manifest {
    sources: Vec<(PathBuf, u64, u128)>,
    text_field: String,
    pair: (String, String),
    tokenizer: String,
}

/// The token stream of `paths` in the token file `out` (written, or reused when its manifest
/// `out.json` matches), with a progress bar over the input bytes.
pub fn token_file(
    tok: &LoadedTokenizer,
    paths: &[PathBuf],
    fields: &Fields,
    out: &Path,
) -> Result<Tokens> {
    let files = files(paths)?;
    let mut sources = Vec::with_capacity(files.len());
    let mut total = 0u64;
    for f in &files {
        let md = std::fs::metadata(f).with_context(|| format!("cannot read {}", f.display()))?;
        let modified = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        total += md.len();
        sources.push((
            std::fs::canonicalize(f).unwrap_or(f.clone()),
            md.len(),
            modified,
        ));
    }
    let manifest = Manifest {
        sources,
        text_field: fields.text.to_string(),
        pair: (fields.pair.0.to_string(), fields.pair.1.to_string()),
        tokenizer: tokenizer_fingerprint(tok),
    };
    let manifest_path = out.with_extension("json");
    let same = std::fs::read(&manifest_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
        .is_some_and(|m| m == manifest);
    if same && out.is_file() {
        if let Ok(t) = Tokens::open(out) {
            tracing::info!("reusing the token file {}", out.display());
            return Ok(t);
        }
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // The manifest goes first: a kill between the token file and its manifest must not leave
    // an old manifest vouching for new tokens.
    let _ = std::fs::remove_file(&manifest_path);
    let bar = crate::common::byte_bar(total, "tokenizing");
    let mut t = Tokenizing::new(tok);
    Tokens::write(out, |sink| {
        for_each_document(&files, fields, &mut |d| {
            if let Doc::Text { text, .. } = &d {
                bar.inc(text.len() as u64);
            }
            t.push(sink, d)
        })
        .map_err(|e| format!("{e:#}").into())
    })?;
    bar.finish_and_clear();
    let json = serde_json::to_vec_pretty(&manifest)?;
    lmkit::formats::write::atomic_write(&manifest_path, |w| std::io::Write::write_all(w, &json))?;
    Ok(Tokens::open(out)?)
}

/// Identifies a tokenizer's vocabulary and rules (a hash of its serialized form).
fn tokenizer_fingerprint(tok: &LoadedTokenizer) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    // The token-file format, the vocabulary and rules, and what chat rendering and EOS
    // placement depend on.
    h.update(b"lmkit-tokens-v1\0");
    h.update(
        tok.tokenizer
            .to_string(false)
            .unwrap_or_default()
            .as_bytes(),
    );
    h.update(tok.chat_template.as_deref().unwrap_or("").as_bytes());
    h.update(format!("{:?}", tok.special).as_bytes());
    let h = h.finalize();
    h.iter().take(16).map(|b| format!("{b:02x}")).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A text file larger than a piece arrives in pieces cut after line ends, which put back
    /// together give the file; only the last piece ends the document. JSONL gives one document
    /// per line, and a bad line names its file and line.
    #[test]
    fn streams_text_in_pieces_and_jsonl_by_line() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let text: String = (0..100_000)
            .map(|i| format!("line {i} of a long text file\n"))
            .collect();
        assert!(text.len() > 2 * PIECE);
        let txt = dir.path().join("big.txt");
        std::fs::write(&txt, &text)?;
        let jsonl = dir.path().join("d.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\": \"a\"}\n\n{\"prompt\": \"q\", \"completion\": \"r\"}\n",
        )?;
        let fields = Fields {
            text: "text",
            pair: ("prompt", "completion"),
        };
        let (mut pieces, mut chats) = (Vec::new(), 0);
        for_each_document(&[txt.clone(), jsonl.clone()], &fields, &mut |d| {
            match d {
                Doc::Text { text, end } => pieces.push((text, end)),
                Doc::Chat(_) => chats += 1,
            }
            Ok(())
        })?;
        // The big file's pieces, then the JSONL text line.
        let (big, rest) = pieces.split_at(pieces.len() - 1);
        assert!(big.len() >= 3, "{} pieces", big.len());
        assert!(big.iter().all(|(t, _)| t.ends_with('\n')));
        assert_eq!(
            big.iter().map(|(t, _)| t.as_str()).collect::<String>(),
            text
        );
        let ends: Vec<bool> = big.iter().map(|(_, e)| *e).collect();
        assert!(ends[..ends.len() - 1].iter().all(|e| !e) && ends[ends.len() - 1]);
        assert_eq!((rest[0].0.as_str(), rest[0].1, chats), ("a", true, 1));
        std::fs::write(&jsonl, "{\"text\": \"a\"}\n{oops\n")?;
        let e = for_each_document(&[jsonl], &fields, &mut |_| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("d.jsonl:2"), "{e:#}");
        Ok(())
    }
}
