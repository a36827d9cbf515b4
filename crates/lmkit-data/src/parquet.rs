//! Parquet corpora (the layout of HF datasets: one row per record, the text in a string
//! column), read as record streams and written back whole: a selection of a Parquet pool is a
//! Parquet file with the pool's schema and every column of the selected rows.
//!
//! Rows whose text is null are malformed records: an error naming the file and row, or skipped
//! and counted with `skip_bad`, as malformed JSONL lines are.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow_array::{
    Array, LargeStringArray, RecordBatch, StringArray, StringViewArray, UInt32Array,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::corpus::{is_parquet, Layout, ReadStats, Record};
use crate::{Error, Result};

/// Rows per batch read from a file.
const ROWS: usize = 8192;

fn err(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Invalid {
        what: path.display().to_string(),
        why: why.to_string(),
    }
}

/// The texts of a batch's column `field` (null rows are `None`).
fn texts(path: &Path, batch: &RecordBatch, field: &str) -> Result<Vec<Option<String>>> {
    let Some(col) = batch.column_by_name(field) else {
        let names: Vec<String> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        return Err(err(
            path,
            format!("no column `{field}` (columns: {})", names.join(", ")),
        ));
    };
    let any = col.as_any();
    let out = if let Some(a) = any.downcast_ref::<StringArray>() {
        a.iter().map(|v| v.map(String::from)).collect()
    } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        a.iter().map(|v| v.map(String::from)).collect()
    } else if let Some(a) = any.downcast_ref::<StringViewArray>() {
        a.iter().map(|v| v.map(String::from)).collect()
    } else {
        return Err(err(
            path,
            format!("column `{field}` is {}, not strings", col.data_type()),
        ));
    };
    Ok(out)
}

/// What [`scan`] hands on per batch: the arrow batch, its valid records, each one's row.
type BatchFn<'a> = dyn FnMut(&RecordBatch, Vec<Record>, Vec<u32>) -> Result<()> + 'a;

/// Reads `path` batch by batch: `each(batch, records, rows)` gets the arrow batch, its valid
/// records and each record's row in the batch.
fn scan(path: &Path, layout: &Layout, stats: &mut ReadStats, each: &mut BatchFn) -> Result<()> {
    let f = File::open(path).map_err(|e| err(path, e))?;
    stats.bytes += f.metadata().map(|m| m.len()).unwrap_or(0);
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.with_batch_size(ROWS).build())
        .map_err(|e| err(path, format!("not a readable Parquet file: {e}")))?;
    let mut first_row = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| err(path, e))?;
        let texts = texts(path, &batch, &layout.field)?;
        let (mut recs, mut rows) = (Vec::with_capacity(texts.len()), Vec::new());
        for (i, t) in texts.into_iter().enumerate() {
            match t {
                Some(text) => {
                    recs.push(Record {
                        line: String::new(),
                        text,
                    });
                    rows.push(i as u32);
                }
                None if layout.skip_bad => stats.skipped += 1,
                None => {
                    return Err(Error::Invalid {
                        what: format!("{} row {}", path.display(), first_row + i as u64 + 1),
                        why: format!("column `{}` is null", layout.field),
                    })
                }
            }
        }
        first_row += batch.num_rows() as u64;
        each(&batch, recs, rows)?;
    }
    Ok(())
}

/// Streams the records of one Parquet file to `each`, a batch at a time (their `line` is
/// empty: a row is written back by [`write_selected`]).
pub fn for_each_batch(
    path: &Path,
    layout: &Layout,
    stats: &mut ReadStats,
    each: &mut dyn FnMut(Vec<Record>) -> Result<()>,
) -> Result<()> {
    scan(path, layout, stats, &mut |_, recs, _| each(recs))
}

/// Writes the records with these indices (ascending, numbered as `corpus::for_each_batch`
/// numbers them) of the Parquet files `files` to `out` as one Parquet file with their schema
/// (zstd-compressed); `seen(record)` sees each selected record. Every file must have the same
/// schema.
pub fn write_selected<W: Write + Send>(
    files: &[PathBuf],
    layout: &Layout,
    indices: &[u64],
    out: W,
    seen: &mut dyn FnMut(&Record),
) -> Result<W> {
    let mut writer: Option<ArrowWriter<W>> = None;
    let mut schema = None;
    let mut out = Some(out);
    let (mut next, mut at) = (0u64, 0usize);
    let mut stats = ReadStats::default();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    for f in files {
        if !is_parquet(f) {
            return Err(err(
                f,
                "not Parquet: a Parquet output needs a pool of Parquet files",
            ));
        }
        scan(f, layout, &mut stats, &mut |batch, recs, rows| {
            let mut take = Vec::new();
            for (r, row) in recs.iter().zip(rows) {
                if at < indices.len() && indices[at] == next {
                    seen(r);
                    take.push(row);
                    at += 1;
                }
                next += 1;
            }
            if take.is_empty() {
                return Ok(());
            }
            let picked = arrow_select::take::take_record_batch(batch, &UInt32Array::from(take))
                .map_err(|e| err(f, e))?;
            if writer.is_none() {
                let Some(o) = out.take() else {
                    return Err(err(f, "the output is gone"));
                };
                let w = ArrowWriter::try_new(o, batch.schema(), Some(props.clone()))
                    .map_err(|e| err(f, e))?;
                writer = Some(w);
                schema = Some(batch.schema());
            }
            if let Some(w) = writer.as_mut() {
                if schema
                    .as_ref()
                    .is_some_and(|s| s.fields() != batch.schema().fields())
                {
                    return Err(err(
                        f,
                        "its schema differs from the first file's: select from one dataset at a time",
                    ));
                }
                w.write(&picked).map_err(|e| err(f, e))?;
            }
            Ok(())
        })?;
    }
    match (writer, out) {
        (Some(w), _) => w.into_inner().map_err(|e| err(Path::new("output"), e)),
        // Nothing selected: an empty file with the first file's schema.
        (None, Some(o)) => {
            let Some(f) = files.first() else {
                return Err(err(Path::new("output"), "no input files"));
            };
            let schema =
                ParquetRecordBatchReaderBuilder::try_new(File::open(f).map_err(|e| err(f, e))?)
                    .map_err(|e| err(f, e))?
                    .schema()
                    .clone();
            let w = ArrowWriter::try_new(o, schema, Some(props))
                .map_err(|e| err(Path::new("output"), e))?;
            w.into_inner().map_err(|e| err(Path::new("output"), e))
        }
        (None, None) => Err(err(Path::new("output"), "the output is gone")),
    }
}

/// Every row of a table file as a JSON object, column by column: a Parquet file, or an Arrow
/// IPC stream or file (`.arrow`, as HF `datasets` caches and `save_to_disk` write them).
/// Strings, numbers, booleans, nulls, lists and structs map to their JSON forms; columns of
/// other types read as nulls.
pub fn rows(path: &Path) -> Result<Vec<serde_json::Value>> {
    let batches: Vec<RecordBatch> = if is_parquet(path) {
        let f = File::open(path).map_err(|e| err(path, e))?;
        ParquetRecordBatchReaderBuilder::try_new(f)
            .and_then(|b| b.build())
            .map_err(|e| err(path, format!("not a readable Parquet file: {e}")))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| err(path, e))?
    } else {
        let bytes = std::fs::read(path).map_err(|e| err(path, e))?;
        // An IPC file starts with "ARROW1"; a stream with a continuation marker.
        if bytes.starts_with(b"ARROW1") {
            arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None)
                .map_err(|e| err(path, format!("not an Arrow file: {e}")))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| err(path, e))?
        } else {
            arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
                .map_err(|e| err(path, format!("not an Arrow stream: {e}")))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| err(path, e))?
        }
    };
    let mut out = Vec::new();
    for b in &batches {
        let schema = b.schema();
        let mut cols = Vec::with_capacity(b.num_columns());
        for (f, c) in schema.fields().iter().zip(b.columns()) {
            cols.push((f.name().clone(), json_column(path, f.name(), c.as_ref())?));
        }
        for i in 0..b.num_rows() {
            let mut row = serde_json::Map::with_capacity(cols.len());
            for (name, vals) in &cols {
                row.insert(name.clone(), vals[i].clone());
            }
            out.push(serde_json::Value::Object(row));
        }
    }
    Ok(out)
}

/// A list column's values as JSON arrays (either offset width).
fn list_column<O: arrow_array::OffsetSizeTrait>(
    path: &Path,
    name: &str,
    l: &arrow_array::GenericListArray<O>,
) -> Result<Vec<serde_json::Value>> {
    let inner = json_column(path, name, l.values().as_ref())?;
    let offs = l.value_offsets();
    Ok((0..l.len())
        .map(|i| match l.is_null(i) {
            true => serde_json::Value::Null,
            false => {
                serde_json::Value::Array(inner[offs[i].as_usize()..offs[i + 1].as_usize()].to_vec())
            }
        })
        .collect())
}

/// One column's values as JSON.
fn json_column(path: &Path, name: &str, col: &dyn Array) -> Result<Vec<serde_json::Value>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    use arrow_schema::DataType as D;
    use serde_json::Value as J;
    let n = col.len();
    let num = |v: Option<f64>| {
        v.and_then(serde_json::Number::from_f64)
            .map_or(J::Null, J::Number)
    };
    let mut vals: Vec<J> = match col.data_type() {
        D::Null => vec![J::Null; n],
        D::Boolean => col
            .as_boolean()
            .iter()
            .map(|v| v.map_or(J::Null, J::Bool))
            .collect(),
        D::Utf8 => col
            .as_string::<i32>()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::LargeUtf8 => col
            .as_string::<i64>()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::Utf8View => col
            .as_string_view()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::Int8 => col
            .as_primitive::<Int8Type>()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::Int16 => col
            .as_primitive::<Int16Type>()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::Int32 => col
            .as_primitive::<Int32Type>()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::Int64 => col
            .as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::UInt8 => col
            .as_primitive::<UInt8Type>()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::UInt16 => col
            .as_primitive::<UInt16Type>()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::UInt32 => col
            .as_primitive::<UInt32Type>()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::UInt64 => col
            .as_primitive::<UInt64Type>()
            .iter()
            .map(|v| v.map_or(J::Null, J::from))
            .collect(),
        D::Float32 => col
            .as_primitive::<Float32Type>()
            .iter()
            .map(|v| num(v.map(f64::from)))
            .collect(),
        D::Float64 => col.as_primitive::<Float64Type>().iter().map(num).collect(),
        D::List(_) => list_column(path, name, col.as_list::<i32>())?,
        D::LargeList(_) => list_column(path, name, col.as_list::<i64>())?,
        D::Struct(fields) => {
            let s = col.as_struct();
            let mut parts = Vec::with_capacity(fields.len());
            for (f, c) in fields.iter().zip(s.columns()) {
                parts.push((f.name().clone(), json_column(path, f.name(), c.as_ref())?));
            }
            (0..n)
                .map(|i| {
                    if s.is_null(i) {
                        return J::Null;
                    }
                    J::Object(
                        parts
                            .iter()
                            .map(|(k, v)| (k.clone(), v[i].clone()))
                            .collect(),
                    )
                })
                .collect()
        }
        other => {
            return Err(err(
                path,
                format!("column `{name}` has type {other}, which lmkit does not read"),
            ))
        }
    };
    // Nulls the typed iterators above did not see (a list's or struct's children are exact).
    for (i, v) in vals.iter_mut().enumerate() {
        if col.is_null(i) {
            *v = J::Null;
        }
    }
    Ok(vals)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pyarrow-written fixture (scripts/fixtures/make_parquet_fixture.py) as JSON rows.
    #[test]
    fn rows_of_a_pyarrow_file_keep_lists_structs_and_nulls() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parquet");
        let r = rows(&dir.join("train-00000-of-00002.parquet")).unwrap();
        assert_eq!(r.len(), 120);
        assert_eq!(
            r[0],
            serde_json::json!({"id": 0, "text": "a cat and a dog sat on the mat in the park 0",
                "tags": ["t0", "x"], "meta": {"source": "cats", "len": 44}})
        );
        assert_eq!(r[7]["text"], serde_json::Value::Null);
        assert_eq!(r[7]["meta"]["source"], "markets");
        let e = rows(&dir.join("missing.parquet")).unwrap_err().to_string();
        assert!(e.contains("missing.parquet"), "{e}");
    }
}
