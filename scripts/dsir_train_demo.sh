#!/usr/bin/env bash
# Does DSIR help a model? From the 1M-document pool of scripts/dsir_pool.py, select N documents
# like WikiText-2 valid with DSIR, and N uniformly at random (same length filter); train the
# same small Llama from scratch on each (same tokenizer, steps, seed); report each model's
# perplexity on WikiText-2 test, the target domain's held-out text. docs/results.md quotes it.
#
#   scripts/dsir_train_demo.sh [OUT_DIR] [N] [STEPS]     (defaults runs/dsir-demo, 50000, 400)
#   LMKIT (default target/release/lmkit), PYTHON (for the pool script), THREADS (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/dsir-demo}"
n="${2:-50000}"
steps="${3:-400}"
lmkit="${LMKIT:-target/release/lmkit}"
dir="${DSIR_DIR:-$HOME/.cache/lmkit/dsir}"
[ -f "$dir/pool.jsonl" ] || "${PYTHON:-python3}" scripts/dsir_pool.py "$dir"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
sel() { "$lmkit" data select --target "$dir/target.jsonl" --raw "$dir/pool.jsonl" --n "$n" \
  --min-length 10 --seed 0 --out "$out/$1.jsonl" --json "${@:2}" >"$out/$1-select.json"; }
[ -f "$out/dsir.jsonl" ] || sel dsir
[ -f "$out/random.jsonl" ] || sel random --random
test_txt=../shared/data/wikitext-2/test.txt
for who in dsir random; do
  cat >"$out/$who.toml" <<TOML
[model]
hidden_size = 256
intermediate_size = 688
num_layers = 4
num_heads = 4
num_kv_heads = 2
max_position_embeddings = 128
[data]
train = ["$out/$who.jsonl"]
seq_len = 128
eval_fraction = 0.0
[train]
steps = $steps
batch = 8
lr = 2e-3
min_lr = 2e-4
warmup = 20
seed = 1
TOML
  [ -d "$out/$who/final" ] ||
    "$lmkit" train --config "$out/$who.toml" --out "$out/$who" -t "${THREADS:-2}" >"$out/$who-train.log" 2>&1
  "$lmkit" ppl "$test_txt" --model "$out/$who/final" --ctx 128 -t "${THREADS:-2}" --json >"$out/$who-ppl.json"
done
"${PYTHON:-python3}" - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for who in ["dsir", "random"]:
    s = json.load(open(f"{out}/{who}-select.json"))
    p = json.load(open(f"{out}/{who}-ppl.json"))
    print(f"{who:>6}: {s['selected']} documents, KL reduction {s['kl_reduction']:.3f}; "
          f"WikiText-2 test perplexity {p['ppl']:.2f} ± {p['ppl_stderr']:.2f} "
          f"({p['scored_tokens']} tokens)")
PY
