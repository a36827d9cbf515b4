//! Token streams for training, in memory or in a memory-mapped token file, so a corpus larger
//! than RAM trains with memory bounded by a batch (the kernel pages the file in and out).
//!
//! Each token is a little-endian `u32`: the id in bits 0–30, and bit 31 set when the token is
//! context only, not a training target (chat data trains on the assistant's tokens). A token
//! file is a 16-byte header (`LMKTOK01`, then a `u32` of flags: bit 0 = the stream has a
//! target mask; then 4 zero bytes) followed by the tokens. Files are written atomically.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"LMKTOK01";
const HEADER: usize = 16;
/// Bit 31: "context only".
const CONTEXT: u32 = 1 << 31;

enum Source {
    Owned(Vec<u32>),
    Mapped(memmap2::Mmap),
}

/// A range of a token stream (cheap to clone and split).
#[derive(Clone)]
pub struct Tokens {
    src: Arc<Source>,
    start: usize,
    end: usize,
    masked: bool,
}

impl Tokens {
    /// Tokens in memory; `mask[i] == 0` marks token `i` as context only.
    pub fn from_vec(mut ids: Vec<u32>, mask: Option<&[u8]>) -> Result<Self> {
        if let Some(id) = ids.iter().find(|&&t| t & CONTEXT != 0) {
            return Err(Error::Data(format!(
                "token id {id} does not fit in 31 bits"
            )));
        }
        if let Some(m) = mask {
            if m.len() != ids.len() {
                return Err(Error::Data(format!(
                    "{} mask entries for {} tokens",
                    m.len(),
                    ids.len()
                )));
            }
            for (t, &k) in ids.iter_mut().zip(m) {
                if k == 0 {
                    *t |= CONTEXT;
                }
            }
        }
        let end = ids.len();
        Ok(Self {
            src: Arc::new(Source::Owned(ids)),
            start: 0,
            end,
            masked: mask.is_some(),
        })
    }

    /// Writes a token file atomically: `fill` pushes tokens into the sink (the stream is
    /// marked masked when some token is context only). Returns the count. An error from `fill`
    /// leaves no file and comes back as [`Error::Data`].
    pub fn write(path: &Path, fill: impl FnOnce(&mut Sink) -> FillResult) -> Result<u64> {
        let mut count = 0;
        let mut failure = None;
        lmkit_formats::write::atomic_write(path, |w| {
            w.write_all(MAGIC)?;
            w.write_all(&[0; 8])?;
            let mut sink = Sink {
                w,
                count: 0,
                context: false,
                error: None,
            };
            let r = fill(&mut sink);
            let (n, masked) = (sink.count, sink.context);
            if let Some(e) = sink.error.take() {
                return Err(e);
            }
            if let Err(e) = r {
                failure = Some(Error::Data(format!("{}: {e}", path.display())));
                return Err(std::io::Error::other("token file not finished"));
            }
            count = n;
            // The flags, now that the whole stream has been seen.
            w.seek(SeekFrom::Start(MAGIC.len() as u64))?;
            w.write_all(&u32::from(masked).to_le_bytes())?;
            w.seek(SeekFrom::End(0))?;
            Ok(())
        })
        .map_err(|e| failure.take().unwrap_or(e.into()))?;
        Ok(count)
    }

    /// Opens a token file (memory-mapped).
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |why: String| Error::Data(format!("token file {}: {why}", path.display()));
        if cfg!(target_endian = "big") {
            return Err(bad("token files are little-endian; this CPU is not".into()));
        }
        let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        // SAFETY: the file is lmkit's own, written once by an atomic rename and never modified
        // in place; a concurrent truncation by another program is outside this contract.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| bad(e.to_string()))?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad("not an lmkit token file (bad header)".into()));
        }
        if !(map.len() - HEADER).is_multiple_of(4) {
            return Err(bad("truncated (not a whole number of tokens)".into()));
        }
        let masked = map[8] & 1 == 1;
        let end = (map.len() - HEADER) / 4;
        Ok(Self {
            src: Arc::new(Source::Mapped(map)),
            start: 0,
            end,
            masked,
        })
    }

    /// The packed values (id | context bit).
    pub fn packed(&self) -> &[u32] {
        let all: &[u32] = match &*self.src {
            Source::Owned(v) => v,
            Source::Mapped(m) => {
                // SAFETY: a mapping is page-aligned, the header is 16 bytes, and every bit
                // pattern is a valid u32; `open` checked the length is header + 4·n.
                let (pre, mid, _) = unsafe { m[HEADER..].align_to::<u32>() };
                debug_assert!(pre.is_empty());
                mid
            }
        };
        &all[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Whether some tokens may be context only (chat data).
    pub fn masked(&self) -> bool {
        self.masked
    }

    /// `[..at]` and `[at..]`.
    pub fn split_at(&self, at: usize) -> (Tokens, Tokens) {
        let mid = self.start + at.min(self.len());
        let a = Tokens {
            end: mid,
            ..self.clone()
        };
        let b = Tokens {
            start: mid,
            ..self.clone()
        };
        (a, b)
    }

    /// Token `i`'s id.
    pub fn id(v: u32) -> u32 {
        v & !CONTEXT
    }

    /// Whether a packed value is a training target.
    pub fn is_target(v: u32) -> bool {
        v & CONTEXT == 0
    }
}

/// What a [`Tokens::write`] fill returns: any error (a tokenizer's, a reader's).
pub type FillResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Where [`Tokens::write`] sends tokens.
pub struct Sink<'a> {
    w: &'a mut std::io::BufWriter<std::fs::File>,
    count: u64,
    context: bool,
    error: Option<std::io::Error>,
}

impl Sink<'_> {
    /// Appends tokens; `target` false marks them context only.
    pub fn push(&mut self, ids: &[u32], target: bool) -> Result<()> {
        for &t in ids {
            if t & CONTEXT != 0 {
                return Err(Error::Data(format!("token id {t} does not fit in 31 bits")));
            }
            let v = if target { t } else { t | CONTEXT };
            if let Err(e) = self.w.write_all(&v.to_le_bytes()) {
                let msg = e.to_string();
                self.error = Some(e);
                return Err(Error::Data(format!("cannot write tokens: {msg}")));
            }
        }
        self.count += ids.len() as u64;
        self.context |= !target && !ids.is_empty();
        Ok(())
    }

    /// Tokens written so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_reads_back_what_was_written() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Data(e.to_string()))?;
        let path = dir.path().join("t.tokens");
        let n = Tokens::write(&path, |s| {
            s.push(&[5, 6, 7], false)?;
            Ok(s.push(&[8, 9], true)?)
        })?;
        assert_eq!(n, 5);
        let t = Tokens::open(&path)?;
        assert!(t.masked());
        let ids: Vec<u32> = t.packed().iter().map(|&v| Tokens::id(v)).collect();
        let tg: Vec<bool> = t.packed().iter().map(|&v| Tokens::is_target(v)).collect();
        assert_eq!(ids, [5, 6, 7, 8, 9]);
        assert_eq!(tg, [false, false, false, true, true]);
        let (a, b) = t.split_at(2);
        assert_eq!((a.len(), b.len(), Tokens::id(b.packed()[0])), (2, 3, 7));
        // The same stream in memory packs the same way.
        let m = Tokens::from_vec(vec![5, 6, 7, 8, 9], Some(&[0, 0, 0, 1, 1]))?;
        assert_eq!(m.packed(), t.packed());
        Ok(())
    }

    #[test]
    fn bad_files_are_clear_errors() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Data(e.to_string()))?;
        let path = dir.path().join("bad.tokens");
        std::fs::write(&path, b"not tokens at all").map_err(|e| Error::Data(e.to_string()))?;
        let e = Tokens::open(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("bad.tokens") && e.contains("header"), "{e}");
        let mut bytes = MAGIC.to_vec();
        bytes.extend([0u8; 8]);
        bytes.extend([1u8, 2, 3]);
        std::fs::write(&path, bytes).map_err(|e| Error::Data(e.to_string()))?;
        let e = Tokens::open(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("truncated"), "{e}");
        // A fill that fails leaves no file behind.
        let gone = dir.path().join("gone.tokens");
        let r = Tokens::write(&gone, |s| {
            s.push(&[1], true)?;
            Err("stop".into())
        });
        assert!(r.is_err() && !gone.exists());
        // Text only: not masked.
        Tokens::write(&gone, |s| Ok(s.push(&[1, 2], true)?))?;
        assert!(!Tokens::open(&gone)?.masked());
        assert!(Tokens::from_vec(vec![u32::MAX], None).is_err());
        Ok(())
    }
}
