#!/usr/bin/env bash
# Side-by-side speed: `lmkit bench` and llama.cpp's `llama-bench` on the same GGUF files, same
# threads, pp512 and tg128, run one after the other on a quiet machine.
#
#   LLAMA_BENCH=/path/to/llama-bench scripts/bench_vs_llamacpp.sh MODEL.gguf [MODEL.gguf ...]
#
# Env: THREADS (default 2), REPS (default 5). Prints one JSON line per tool and model; ratios are
# computed by the caller (docs/benchmarks.md shows them).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
reps=${REPS:-5}
cargo build --release -q -p lmkit-cli
for m in "$@"; do
  echo "## $m"
  ./target/release/lmkit bench --model "$m" --threads "$threads" -p 512 -n 128 --reps "$reps" --json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"tool":"lmkit","model":d["model"],**{r["test"]:[round(r["tokens_per_sec_mean"],2),round(r["tokens_per_sec_sd"],2)] for r in d["results"]}}))'
  "${LLAMA_BENCH:?set LLAMA_BENCH to the llama-bench binary}" -m "$m" -t "$threads" -p 512 -n 128 -r "$reps" -o json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"tool":"llama.cpp","model":d[0]["model_filename"],**{("pp%d"%r["n_prompt"] if r["n_prompt"] else "tg%d"%r["n_gen"]):[round(r["avg_ts"],2),round(r["stddev_ts"],2)] for r in d}}))'
done
