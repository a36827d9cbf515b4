#!/usr/bin/env bash
# Server throughput, lmkit serve vs llama.cpp's llama-server, side by side: the same GGUF, the
# same 16 slots, 2 threads, 127.0.0.1, a fixed number of chat requests of exactly MAX_TOKENS new
# tokens (ignore_eos) at 1, 4 and 16 concurrent clients (scripts/load_test.py).
#   LLAMA_SERVER=/path/to/llama-server scripts/bench_serve.sh MODEL.gguf [MAX_TOKENS] [REQS_PER_CLIENT]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
MAX=${2:-64}
PER=${3:-4}
: "${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}"
wait_up() { for _ in $(seq 1 600); do curl -sf "$1/health" >/dev/null && return; sleep 0.2; done; echo "no server at $1" >&2; exit 1; }
run() { # name url
  for c in 1 4 16; do
    n=$((c * PER))
    [ "$c" = 1 ] && n=$((PER * 2))
    python3 scripts/load_test.py "$2" --concurrency "$c" --requests "$n" --max-tokens "$MAX" --ignore-eos |
      python3 -c "import json,sys; d=json.load(sys.stdin); print('$1', d['concurrency'], d['requests'], d['status'], round(d['requests_per_sec'],2), round(d['output_tokens_per_sec'],1), round(d['latency_p50'],3), round(d['latency_p99'],3))"
  done
}
echo "server clients requests status req/s out_tok/s p50_s p99_s"
target/release/lmkit serve --port 8181 --threads 2 --max-batch 16 --model "$MODEL" 2>/dev/null &
P1=$!
wait_up http://127.0.0.1:8181
run lmkit http://127.0.0.1:8181
kill -TERM $P1; wait $P1 || true
"$LLAMA_SERVER" -m "$MODEL" --port 8182 --threads 2 --threads-batch 2 --parallel 16 -c 16384 --cont-batching >/dev/null 2>&1 &
P2=$!
wait_up http://127.0.0.1:8182
run llama-server http://127.0.0.1:8182
kill -TERM $P2; wait $P2 || true
