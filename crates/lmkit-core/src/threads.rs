//! The CPU thread count, set once per process.
//!
//! candle's CPU matmul and quantized kernels size their work by `RAYON_NUM_THREADS`, and lmkit's
//! own parallel loops run on rayon's global pool; [`set_threads`] sets both, so `--threads N`
//! means N worker threads everywhere.

use crate::{Error, Result};

/// Runs `f` on a pool of `n` worker threads (and sets [`set_threads`]). Work started from inside
/// the pool runs its parallel loops without handing off to another thread and back, which
/// matters for decoding: a token makes hundreds of small parallel calls, and from outside a pool
/// each one costs two context switches.
pub fn install<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    set_threads(n)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| Error::Invalid {
            what: "threads".into(),
            why: format!("cannot start {n} worker threads: {e}"),
        })?;
    Ok(pool.install(f))
}

/// Sets the number of CPU worker threads for this process. Call it once, early, before any
/// tensor work (later calls keep the first pool and only update the environment).
pub fn set_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Invalid {
            what: "threads".into(),
            why: "must be at least 1".into(),
        });
    }
    // SAFETY-free: edition 2021 `set_var`; called before worker threads start.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
    {
        tracing::debug!("rayon global pool already built: {e}");
    }
    Ok(())
}

/// The number of worker threads in use.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// A sensible default: the number of physical cores the OS reports (at least 1).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
