//! Reading corpora as streams of records: text files (one record per non-blank line) and JSONL
//! (one record per line, its text in a named field), plain, gzip- (`.gz`) or
//! zstd-compressed (`.zst`, any number of frames), or folders of them (recursively, in name order). A record keeps its raw line, so a selection
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

/// A buffered reader of a file's bytes, decompressed by its name (`.gz`, `.zst`).
pub fn open(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let f = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let ext = path.extension().and_then(|e| e.to_str());
    let r: Box<dyn Read + Send> = match ext {
        Some("gz") => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Some("zst") => Box::new(
            crate::zst::Reader::new(BufReader::with_capacity(1 << 16, f))
                .map_err(|e| io(path, e))?,
        ),
        _ => Box::new(f),
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, r)))
}

/// Streams the records of `files` to `each` in order, in batches of up to `batch` (so the
/// caller can process a batch in parallel). Lines are read in order; JSONL lines are parsed in
/// parallel, a batch at a time. Returns what was read.
pub fn for_each_batch(
    files: &[PathBuf],
    layout: &Layout,
    batch: usize,
    each: &mut dyn FnMut(Vec<Record>) -> Result<()>,
) -> Result<ReadStats> {
    let mut stats = ReadStats::default();
    for f in files {
        if is_parquet(f) {
            parquet_batches(f, layout, &mut stats, each)?;
            continue;
        }
        let jsonl = is_jsonl(f);
        let mut r = open(f)?;
        let mut lines: Vec<(u64, String)> = Vec::with_capacity(batch);
        let mut no = 0u64;
        loop {
            let mut line = String::new();
            let n = r
                .read_line(&mut line)
                .map_err(|e| io(f, format!("line {}: {e}", no + 1)))?;
            if n > 0 {
                no += 1;
                stats.bytes += n as u64;
                let end = line.trim_end_matches(['\n', '\r']).len();
                line.truncate(end);
                if !line.trim().is_empty() {
                    lines.push((no, line));
                }
            }
            if lines.len() == batch || (n == 0 && !lines.is_empty()) {
                let recs = parse_batch(std::mem::take(&mut lines), jsonl, layout, f, &mut stats)?;
                stats.records += recs.len() as u64;
                each(recs)?;
            }
            if n == 0 {
                break;
            }
        }
    }
    Ok(stats)
}

/// Whether a file is Parquet (by its name).
pub fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
}

#[cfg(feature = "parquet")]
fn parquet_batches(
    f: &Path,
    layout: &Layout,
    stats: &mut ReadStats,
    each: &mut dyn FnMut(Vec<Record>) -> Result<()>,
) -> Result<()> {
    let mut records = 0u64;
    crate::parquet::for_each_batch(f, layout, stats, &mut |recs| {
        records += recs.len() as u64;
        each(recs)
    })?;
    stats.records += records;
    Ok(())
}

#[cfg(not(feature = "parquet"))]
fn parquet_batches(
    f: &Path,
    _: &Layout,
    _: &mut ReadStats,
    _: &mut dyn FnMut(Vec<Record>) -> Result<()>,
) -> Result<()> {
    Err(io(
        f,
        "Parquet support is not built in (lmkit-data's `parquet` feature)",
    ))
}

/// The records of a batch of `(line number, line)`: JSONL lines parsed in parallel, the first
/// malformed one an error (or each skipped and counted, with `skip_bad`).
fn parse_batch(
    lines: Vec<(u64, String)>,
    jsonl: bool,
    layout: &Layout,
    f: &Path,
    stats: &mut ReadStats,
) -> Result<Vec<Record>> {
    use rayon::prelude::*;
    if !jsonl {
        return Ok(lines
            .into_iter()
            .map(|(_, line)| Record {
                text: line.clone(),
                line,
            })
            .collect());
    }
    let parsed: Vec<std::result::Result<Record, (u64, String)>> = lines
        .into_par_iter()
        .map(|(no, line)| match json_text(&line, &layout.field) {
            Ok(text) => Ok(Record { line, text }),
            Err(why) => Err((no, why)),
        })
        .collect();
    let mut out = Vec::with_capacity(parsed.len());
    for p in parsed {
        match p {
            Ok(r) => out.push(r),
            Err(_) if layout.skip_bad => stats.skipped += 1,
            Err((no, why)) => {
                return Err(Error::Invalid {
                    what: format!("{}:{no}", f.display()),
                    why,
                })
            }
        }
    }
    Ok(out)
}

/// The string field `field` of the JSON object `line`, the other fields skipped unparsed.
fn json_text(line: &str, field: &str) -> std::result::Result<String, String> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    use std::borrow::Cow;

    #[derive(Debug)]
    enum Found {
        Text(String),
        NotString,
        Missing,
    }
    struct Field<'f>(&'f str);
    impl<'de> Visitor<'de> for Field<'_> {
        type Value = Found;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Found, A::Error> {
            let mut found = Found::Missing;
            while let Some(k) = m.next_key::<Cow<'de, str>>()? {
                if k == self.0 && matches!(found, Found::Missing) {
                    found = match m.next_value::<serde_json::Value>()? {
                        serde_json::Value::String(s) => Found::Text(s),
                        _ => Found::NotString,
                    };
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    impl<'de> DeserializeSeed<'de> for Field<'_> {
        type Value = Found;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Found, D::Error> {
            d.deserialize_map(self)
        }
    }
    let mut de = serde_json::Deserializer::from_str(line);
    let found = Field(field)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|_| v))
        .map_err(|e| format!("not a JSON object ({e})"))?;
    match found {
        Found::Text(s) => Ok(s),
        Found::NotString => Err(format!("field `{field}` is not a string")),
        Found::Missing => Err(format!("no field `{field}`")),
    }
}
