#!/usr/bin/env bash
# Reliability of `lmkit serve` under load: a warm-up round, then twice 1,000 chat requests from
# 16 concurrent clients with 10% of them hanging up mid-stream, then the bad inputs an API meets.
# Prints the status counts, the server's queue/slot gauges and its RSS before and after.
#   scripts/serve_reliability.sh [PORT] [MODEL]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:-8097}
MODEL=${2:-}
BIN=target/release/lmkit
URL=http://127.0.0.1:$PORT
tmp=$(mktemp -d)
$BIN serve --port "$PORT" --max-batch 16 --max-queue 64 ${MODEL:+--model "$MODEL"} 2>"$tmp/serve.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 1 600); do curl -sf "$URL/health" >/dev/null && break; sleep 0.2; done
rss() { awk '/VmRSS/ {print $2 / 1024 " MB"}' /proc/$PID/status; }
gauge() { curl -s "$URL/metrics" | awk -v n="$1" '$1 == n {print $2}'; }

python3 scripts/load_test.py "$URL" --concurrency 16 --requests 32 --max-tokens 32 >/dev/null
echo "RSS after warm-up: $(rss)"
for round in 1 2; do
  python3 scripts/load_test.py "$URL" --concurrency 16 --requests 1000 --max-tokens 32 \
    --temperature 0.8 --cancel 0.1
  sleep 1
  echo "queue depth: $(gauge lmkit_queue_depth), active sequences: $(gauge lmkit_active_sequences), cancelled: $(gauge lmkit_sequences_cancelled_total), KV bytes held: $(gauge lmkit_kv_cache_bytes)"
  echo "RSS after round $round of 1,000 requests: $(rss)"
done

post() { curl -s -o $tmp/body.json -w "%{http_code}" "$URL/v1/chat/completions" -H 'content-type: application/json' "$@"; }
msg='"messages": [{"role": "user", "content": "hi"}]'
echo "malformed JSON:      $(post -d '{"model": "x", ')  $(head -c 120 $tmp/body.json)"
echo "unknown field:       $(post -d "{\"model\": \"x\", $msg, \"frobnicate\": 1}")  $(head -c 120 $tmp/body.json)"
echo "wrong type:          $(post -d "{\"model\": \"x\", $msg, \"max_tokens\": \"ten\"}")  $(head -c 120 $tmp/body.json)"
echo "empty messages:      $(post -d '{"model": "x", "messages": []}')  $(head -c 120 $tmp/body.json)"
long=$(python3 -c 'print("word " * 9000)')
echo "prompt > context:    $(post -d "{\"model\": \"x\", \"messages\": [{\"role\": \"user\", \"content\": \"$long\"}]}")  $(head -c 120 $tmp/body.json)"
echo "max_tokens 0:        $(post -d "{\"model\": \"x\", $msg, \"max_tokens\": 0}")  $(head -c 120 $tmp/body.json)"
echo "max_tokens 1e9:      $(post -d "{\"model\": \"x\", $msg, \"max_tokens\": 1000000000}")  $(head -c 120 $tmp/body.json)"
python3 -c 'print("{\"model\": \"x\", \"messages\": [{\"role\": \"user\", \"content\": \"" + "a" * 10_000_000 + "\"}]}")' > $tmp/big.json
echo "10 MB body:          $(post --data-binary @$tmp/big.json)  $(head -c 120 $tmp/body.json)"
echo "still serving:       $(post -d "{\"model\": \"x\", $msg, \"max_tokens\": 4}")"
echo "RSS at the end: $(rss)"
kill -TERM $PID
wait $PID && echo "SIGTERM: clean exit"
