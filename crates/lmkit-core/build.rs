//! With the `cuda` feature, compiles `cuda/fused.cu` to PTX with nvcc (from `CUDA_ROOT`'s
//! `bin`, else the `PATH`), for `CUDA_COMPUTE_CAP` (default 80; the driver JIT-compiles PTX for
//! newer GPUs). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda/fused.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let nvcc = match std::env::var_os("CUDA_ROOT") {
        Some(root) => PathBuf::from(root).join("bin").join("nvcc"),
        None => PathBuf::from("nvcc"),
    };
    let mut cmd = Command::new(&nvcc);
    if let Some(root) = std::env::var_os("CUDA_ROOT") {
        cmd.arg("-I").arg(PathBuf::from(root).join("include"));
    }
    let status = cmd
        .args([
            "--ptx",
            "-O3",
            &format!("-arch=compute_{cap}"),
            "cuda/fused.cu",
            "-o",
        ])
        .arg(out.join("fused.ptx"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} failed on cuda/fused.cu ({s})", nvcc.display()),
        Err(e) => panic!(
            "cannot run {} ({e}): build with scripts/build-cuda, or set CUDA_ROOT",
            nvcc.display()
        ),
    }
}
