//! Reading corpora as streams of records: text files (one record per non-blank line) and JSONL
//! (one record per line, its text in a named field), plain, gzip- (`.gz`) or
//! zstd-compressed (`.zst`, single-frame), or folders of them (recursively, in name order). A record keeps its raw line, so a selection
//! can be written back in the input's own layout with every field.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One record: where it came from, its raw line, and its text.
pub struct Record {
    pub line: String,
    pub text: String,
}

/// How records are read.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The JSONL field holding the text.
    pub field: String,
    /// Skip malformed JSONL lines (counted) instead of failing.
    pub skip_bad: bool,
}

/// Counts of what a pass read.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ReadStats {
    pub records: u64,
    pub skipped: u64,
    pub bytes: u64,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid {
        what: path.display().to_string(),
        why: e.to_string(),
    }
}

/// Every file under `paths` (folders recursively, sorted).
pub fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, out)?;
            }
            Ok(())
        } else if p.is_file() {
            out.push(p.to_path_buf());
            Ok(())
        } else {
            Err(io(p, "no such file or folder"))
        }
    }
    let mut out = Vec::new();
    for p in paths {
        walk(p, &mut out)?;
    }
    Ok(out)
}

/// Whether a file holds JSONL (by its name, ignoring a `.gz` or `.zst`).
pub fn is_jsonl(path: &Path) -> bool {
    let name = path.to_string_lossy();
    let name = name
        .strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".zst"))
        .unwrap_or(&name);
    name.ends_with(".jsonl")
}

fn open(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let f = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let ext = path.extension().and_then(|e| e.to_str());
    let r: Box<dyn Read + Send> = match ext {
        Some("gz") => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Some("zst") => Box::new(
            ruzstd::decoding::StreamingDecoder::new(f)
                .map_err(|e| io(path, format!("not a zstd file: {e}")))?,
        ),
        _ => Box::new(f),
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, r)))
}

/// Streams the records of `files` to `each` in order, in batches of up to `batch` (so the
/// caller can process a batch in parallel). Returns what was read.
pub fn for_each_batch(
    files: &[PathBuf],
    layout: &Layout,
    batch: usize,
    each: &mut dyn FnMut(Vec<Record>) -> Result<()>,
) -> Result<ReadStats> {
    let mut stats = ReadStats::default();
    let mut buf = Vec::with_capacity(batch);
    for f in files {
        let jsonl = is_jsonl(f);
        let mut r = open(f)?;
        let mut line = String::new();
        let mut no = 0u64;
        loop {
            line.clear();
            let n = r
                .read_line(&mut line)
                .map_err(|e| io(f, format!("line {}: {e}", no + 1)))?;
            if n == 0 {
                break;
            }
            no += 1;
            stats.bytes += n as u64;
            let raw = line.trim_end_matches(['\n', '\r']);
            if raw.trim().is_empty() {
                continue;
            }
            let text = if jsonl {
                match json_text(raw, &layout.field) {
                    Ok(t) => t,
                    Err(_) if layout.skip_bad => {
                        stats.skipped += 1;
                        continue;
                    }
                    Err(why) => {
                        return Err(Error::Invalid {
                            what: format!("{}:{no}", f.display()),
                            why,
                        })
                    }
                }
            } else {
                raw.to_string()
            };
            stats.records += 1;
            buf.push(Record {
                line: raw.to_string(),
                text,
            });
            if buf.len() == batch {
                each(std::mem::replace(&mut buf, Vec::with_capacity(batch)))?;
            }
        }
    }
    if !buf.is_empty() {
        each(buf)?;
    }
    Ok(stats)
}

fn json_text(line: &str, field: &str) -> std::result::Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    match v.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("field `{field}` is not a string")),
        None => Err(format!("no field `{field}`")),
    }
}
