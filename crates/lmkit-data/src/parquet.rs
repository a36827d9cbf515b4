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
