//! Writers: atomic file writes and a GGUF writer.
//!
//! Every file lmkit writes goes to a temp file in the same directory, is flushed and synced,
//! then renamed over the target, so a crash or kill leaves either the old file or the new one,
//! never a torn one.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::gguf::{TensorType, Value, DEFAULT_ALIGNMENT};
use crate::{Error, Result};

/// Writes a file atomically: `write` fills a buffered temp file, which is synced and renamed.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let f = File::create(&tmp)?;
        let mut w = BufWriter::new(f);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// A tensor to write: name, row-major shape, block type and its raw bytes.
pub struct GgufTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: TensorType,
    pub data: std::borrow::Cow<'a, [u8]>,
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => put_str(w, s),
        Value::Array(items) => {
            let ety = items.first().map(|i| i.type_code()).unwrap_or(4);
            w.write_all(&ety.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for i in items {
                if i.type_code() != ety {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "GGUF arrays must hold one type",
                    ));
                }
                put_value(w, i)?;
            }
            Ok(())
        }
    }
}

/// Writes a GGUF v3 file atomically. Tensor shapes are row-major; they are stored in GGML order.
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[GgufTensor]) -> Result<()> {
    for t in tensors {
        let elems: usize = t.shape.iter().product();
        let want = elems / t.dtype.block_size() * t.dtype.type_size();
        if t.data.len() != want {
            return Err(Error::Field {
                path: path.into(),
                field: t.name.clone(),
                why: format!(
                    "{} bytes of data, {:?} {:?} needs {want}",
                    t.data.len(),
                    t.dtype,
                    t.shape
                ),
            });
        }
    }
    let align = DEFAULT_ALIGNMENT;
    atomic_write(path, |w| {
        w.write_all(b"GGUF")?;
        w.write_all(&3u32.to_le_bytes())?;
        w.write_all(&(tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(metadata.len() as u64).to_le_bytes())?;
        let mut pos = 24usize;
        let mut counted = CountingWriter { inner: w, n: 0 };
        for (k, v) in metadata {
            put_str(&mut counted, k)?;
            counted.write_all(&v.type_code().to_le_bytes())?;
            put_value(&mut counted, v)?;
        }
        let mut offset = 0usize;
        for t in tensors {
            put_str(&mut counted, &t.name)?;
            counted.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for d in t.shape.iter().rev() {
                counted.write_all(&(*d as u64).to_le_bytes())?;
            }
            counted.write_all(&t.dtype.code().to_le_bytes())?;
            counted.write_all(&(offset as u64).to_le_bytes())?;
            offset = (offset + t.data.len()).div_ceil(align) * align;
        }
        pos += counted.n;
        let pad = pos.div_ceil(align) * align - pos;
        w.write_all(&vec![0u8; pad])?;
        for t in tensors {
            w.write_all(&t.data)?;
            let pad = t.data.len().div_ceil(align) * align - t.data.len();
            w.write_all(&vec![0u8; pad])?;
        }
        Ok(())
    })
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    n: usize,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
