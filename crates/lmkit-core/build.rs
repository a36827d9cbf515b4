//! With the `cuda` feature, compiles `cuda/fused.cu`, `cuda/decode.cu` and `cuda/train.cu` to
//! PTX with nvcc (from `CUDA_ROOT`'s `bin`, else the `PATH`), for `CUDA_COMPUTE_CAP` (default
//! 80; the driver JIT-compiles PTX for newer GPUs). With `cuda-emu`, compiles `cuda/decode.cu`,
//! `cuda/train.cu` and `cuda/fused.cu` (but for its one atomic kernel) as C++ together with
//! the CPU emulator of `cuda/emu/` (the tests run the kernels there). Without either feature
//! it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    println!("cargo:rerun-if-env-changed=LMKIT_EMU_ASAN");
    if std::env::var_os("CARGO_FEATURE_CUDA_EMU").is_some() {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++17")
            .opt_level(2)
            .flag_if_supported("-Wno-unknown-pragmas")
            .flag_if_supported("-Wno-unused-function")
            .file("cuda/emu/emu.cpp")
            .file("cuda/emu/decode_emu.cpp")
            .file("cuda/emu/train_emu.cpp")
            .file("cuda/emu/fused_emu.cpp");
        // LMKIT_EMU_ASAN=1: the kernels under AddressSanitizer (scripts/emu-asan), so that an
        // access past a tensor's buffer fails the test that made it.
        if std::env::var_os("LMKIT_EMU_ASAN").is_some_and(|v| v == "1") {
            b.flag("-fsanitize=address").flag("-fno-omit-frame-pointer");
            println!("cargo:rustc-link-lib=dylib=asan");
        }
        b.compile("lmkit_cuda_emu");
    }
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
    for name in ["fused", "decode", "train"] {
        let mut cmd = Command::new(&nvcc);
        if let Some(root) = std::env::var_os("CUDA_ROOT") {
            cmd.arg("-I").arg(PathBuf::from(root).join("include"));
        }
        let status = cmd
            .args([
                "--ptx",
                "-O3",
                &format!("-arch=compute_{cap}"),
                &format!("cuda/{name}.cu"),
                "-o",
            ])
            .arg(out.join(format!("{name}.ptx")))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{} failed on cuda/{name}.cu ({s})", nvcc.display()),
            Err(e) => panic!(
                "cannot run {} ({e}): build with scripts/build-cuda, or set CUDA_ROOT",
                nvcc.display()
            ),
        }
    }
}
