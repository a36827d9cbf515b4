//! GGUF reader: typed metadata and tensor index, validated up front, tensor data memory-mapped.
//!
//! Layout (GGUF v2/v3, little-endian): magic `GGUF`, version u32, tensor count u64, metadata
//! count u64, metadata key/value pairs, tensor infos (name, dims, type, offset), padding to
//! `general.alignment` (default 32), then tensor data. Every count, length and offset is checked
//! against the file size before use, so a truncated or corrupt file is an error that names the
//! file and the field, never a panic or a huge allocation.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::{Error, Result};

pub const MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type as u64 (negative values are `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(v) => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// GGUF type code of this value.
    pub fn type_code(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    /// Short display for `info` (arrays are summarized).
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 60 => format!("{:?}…", &s[..s.floor_char_boundary(60)]),
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} items]", a.len()),
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            v => v.as_i64().map(|x| x.to_string()).unwrap_or_default(),
        }
    }
}

/// First GGUF type code of lmkit's own tensor types: `LB2`, `LB3`, `LB4` are
/// `LOWBIT_CODE + 2..=4` (low-bit codes, see `lmkit_kernels::lowbit` and docs/formats.md).
pub const LOWBIT_CODE: u32 = 1000;

/// A tensor's storage type: a GGML type or one of lmkit's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorType {
    Ggml(GgmlDType),
    /// 2-, 3- or 4-bit codes in blocks of 32 (`4·bits` bytes per block).
    LowBit(u8),
}

impl From<GgmlDType> for TensorType {
    fn from(t: GgmlDType) -> Self {
        TensorType::Ggml(t)
    }
}

impl TensorType {
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            c if (LOWBIT_CODE + 2..=LOWBIT_CODE + 4).contains(&c) => {
                Some(TensorType::LowBit((c - LOWBIT_CODE) as u8))
            }
            c => ggml_dtype(c).map(TensorType::Ggml),
        }
    }

    pub fn code(self) -> u32 {
        match self {
            TensorType::Ggml(t) => ggml_code(t),
            TensorType::LowBit(b) => LOWBIT_CODE + u32::from(b),
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            TensorType::Ggml(t) => t.block_size(),
            TensorType::LowBit(_) => 32,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            TensorType::Ggml(t) => t.type_size(),
            TensorType::LowBit(b) => 4 * b as usize,
        }
    }

    /// The GGML type, if it is one.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            TensorType::Ggml(t) => Some(t),
            TensorType::LowBit(_) => None,
        }
    }

    /// `F32`, `Q4_1`, `LB2`, ...
    pub fn name(self) -> String {
        match self {
            TensorType::Ggml(t) => lmkit_core::linear::ggml_type_name(t).into(),
            TensorType::LowBit(b) => format!("LB{b}"),
        }
    }
}

/// GGML tensor type codes lmkit knows, with block geometry.
pub fn ggml_dtype(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The GGML type code of a candle block type.
pub fn ggml_code(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// One entry of the tensor index.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<usize>,
    pub dtype: TensorType,
    /// Offset from the start of the data section.
    pub offset: usize,
    pub size_in_bytes: usize,
}

impl TensorInfo {
    /// Row-major shape (outermost first), as candle and HF write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    pub alignment: usize,
    data_offset: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::corrupt(
                self.path,
                format!(
                    "truncated: {what} needs {n} bytes at offset {} but the file has {} bytes",
                    self.pos,
                    self.buf.len()
                ),
            )),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// A count that must fit in the rest of the file at `min_bytes` per item.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let max = (self.remaining() / min_bytes.max(1)) as u64;
        if n > max {
            return Err(Error::corrupt(
                self.path,
                format!(
                    "{what} is {n}, more than the {} bytes left at offset {} can hold (truncated or corrupt file)",
                    self.remaining(),
                    self.pos
                ),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::corrupt(
                self.path,
                format!("{what} at offset {} is not UTF-8", self.pos - n),
            )
        })
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(key)?[0]),
            1 => Value::I8(self.arr::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => match self.arr::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::corrupt(
                        self.path,
                        format!("metadata `{key}`: bool byte {b} is not 0 or 1"),
                    ))
                }
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(Error::corrupt(
                        self.path,
                        format!("metadata `{key}`: arrays nested too deep"),
                    ));
                }
                let ety = self.u32(key)?;
                let n = self.count(&format!("metadata `{key}` array length"), 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(ety, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(key)?)),
            t => {
                return Err(Error::corrupt(
                    self.path,
                    format!("metadata `{key}`: unknown value type {t}"),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Opens, parses and validates a GGUF file (header, metadata, tensor index, data bounds).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            return Err(Error::corrupt(&path, "is a directory, not a GGUF file"));
        }
        if !meta.is_file() {
            return Err(Error::corrupt(
                &path,
                "is not a regular file (a device or a pipe?)",
            ));
        }
        // SAFETY: the map is read-only; lmkit never writes a file it has mapped (writers use a
        // temp file and rename), so the bytes stay valid for the life of the map.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: memmap2::Mmap) -> Result<Self> {
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path: &path,
        };
        let magic = c.arr::<4>("magic")?;
        if magic != MAGIC {
            return Err(Error::corrupt(
                &path,
                format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::Unsupported {
                path: path.clone(),
                why: format!("GGUF version {version} (supported: 2, 3)"),
            });
        }
        // A tensor info takes at least 8 (name len) + 4 + 4 + 8 bytes; a kv at least 8 + 4 + 1.
        let n_tensors = c.count("tensor count", 24)?;
        let n_kv = c.count("metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => {
                    return Err(Error::Field {
                        path,
                        field: "general.alignment".into(),
                        why: format!("{v:?} is not a power of two"),
                    })
                }
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut index = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::corrupt(
                    &path,
                    format!("tensor `{name}`: {n_dims} dimensions (expected 1 to 4)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = c.u64(&name)?;
                dims.push(usize::try_from(d).map_err(|_| {
                    Error::corrupt(&path, format!("tensor `{name}`: dimension {d} too large"))
                })?);
            }
            let code = c.u32(&name)?;
            let dtype = TensorType::from_code(code).ok_or_else(|| Error::Unsupported {
                path: path.clone(),
                why: format!("tensor `{name}` has GGML type {code}, which lmkit cannot read"),
            })?;
            let offset = c.u64(&name)?;
            let elems = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::corrupt(&path, format!("tensor `{name}`: size overflows")))?;
            let bs = dtype.block_size();
            if dims[0] % bs != 0 {
                return Err(Error::corrupt(
                    &path,
                    format!(
                        "tensor `{name}`: row length {} is not a multiple of the {:?} block size {bs}",
                        dims[0], dtype
                    ),
                ));
            }
            let size_in_bytes = elems / bs * dtype.type_size();
            if !(offset as usize).is_multiple_of(alignment) {
                return Err(Error::corrupt(
                    &path,
                    format!("tensor `{name}`: offset {offset} is not aligned to {alignment}"),
                ));
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::corrupt(
                    &path,
                    format!("tensor `{name}` appears twice"),
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                dtype,
                offset: offset as usize,
                size_in_bytes,
            });
        }
        let data_offset = c.pos.div_ceil(alignment) * alignment;
        let file_len = mmap.len();
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size_in_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(Error::corrupt(
                        &path,
                        format!(
                            "tensor `{}` data ({} bytes at offset {}) runs past the end of the file ({} bytes): the file is truncated",
                            t.name,
                            t.size_in_bytes,
                            data_offset.saturating_add(t.offset),
                            file_len
                        ),
                    ))
                }
            }
        }
        Ok(Self {
            path,
            mmap,
            version,
            metadata,
            tensors,
            index,
            alignment,
            data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str) -> Error {
        Error::Missing {
            path: self.path.clone(),
            what: format!("metadata key `{key}`"),
        }
    }
    fn bad(&self, key: &str, why: &str) -> Error {
        Error::Field {
            path: self.path.clone(),
            field: key.into(),
            why: why.into(),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_str().ok_or_else(|| self.bad(key, "expected a string"))
    }
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_u64()
            .ok_or_else(|| self.bad(key, "expected a non-negative integer"))
    }
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_f64().ok_or_else(|| self.bad(key, "expected a number"))
    }
    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_array()
            .ok_or_else(|| self.bad(key, "expected an array"))
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_offset + info.offset;
        &self.mmap[start..start + info.size_in_bytes]
    }

    /// Tells the OS the mapped pages of a tensor are no longer needed (after its data has been
    /// copied into a model), so loading does not hold the file and the model in memory at once.
    pub fn release(&self, info: &TensorInfo) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let start = self.data_offset + info.offset;
            let aligned = start / PAGE * PAGE;
            let len = start + info.size_in_bytes - aligned;
            // SAFETY: the map is a read-only file mapping; MADV_DONTNEED only drops resident
            // pages, which the kernel re-reads from the file if they are touched again.
            let r = unsafe {
                self.mmap
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, aligned, len)
            };
            if let Err(e) = r {
                tracing::debug!("madvise for `{}`: {e}", info.name);
            }
        }
        #[cfg(not(unix))]
        let _ = info;
    }

    fn info_or_missing(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name).ok_or_else(|| Error::Missing {
            path: self.path.clone(),
            what: format!("tensor `{name}`"),
        })
    }

    /// A tensor as a candle `QTensor` in its stored type, row-major shape.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let info = self.info_or_missing(name)?;
        let dtype = info.dtype.ggml().ok_or_else(|| Error::Unsupported {
            path: self.path.clone(),
            why: format!(
                "tensor `{name}` is lmkit's {} type, not a GGML block type",
                info.dtype.name()
            ),
        })?;
        qtensor_from_ggml(dtype, self.tensor_bytes(info), info.shape(), device).map_err(|source| {
            Error::Tensor {
                path: self.path.clone(),
                tensor: name.into(),
                err: Box::new(source),
            }
        })
    }

    /// A tensor dequantized to f32, row-major shape.
    pub fn tensor_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let q = self.qtensor(name, device)?;
        q.dequantize(device).map_err(|source| Error::Tensor {
            path: self.path.clone(),
            tensor: name.into(),
            err: Box::new(source),
        })
    }

    /// Total bytes of tensor data.
    pub fn tensor_data_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.size_in_bytes).sum()
    }
}
