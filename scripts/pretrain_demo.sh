#!/usr/bin/env bash
# Pretraining from scratch on ~12.8 MB of real text (scripts/fetch_corpus.sh): a new 8,192-token
# BPE tokenizer, a ~12.6M-parameter Llama, held-out perplexity every 100 steps, the loss curve as
# an SVG. The numbers in docs/results.md ("Pretraining from scratch") come from this script.
#
# Usage: scripts/pretrain_demo.sh [OUT_DIR] [STEPS]     (default runs/pretrain, 600 steps)
#   LMKIT: the lmkit binary (default target/release/lmkit); THREADS (default 2)
set -euo pipefail

out="${1:-runs/pretrain}"
steps="${2:-600}"
lmkit="${LMKIT:-target/release/lmkit}"
corpus="$(scripts/fetch_corpus.sh)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

[ -f "$out/tok8k/tokenizer.json" ] ||
  "$lmkit" tokenizer train "$corpus/train" --vocab-size 8192 --out "$out/tok8k"

cat >"$out/run.toml" <<EOF
[model]
hidden_size = 384
intermediate_size = 1024
num_layers = 6
num_heads = 6
num_kv_heads = 2
max_position_embeddings = 256

[data]
train = ["$corpus/train"]
eval = ["$corpus/heldout"]
tokenizer = "$out/tok8k"
seq_len = 256

[train]
steps = $steps
batch = 8
lr = 2e-3
min_lr = 2e-4
warmup = 30
eval_every = 100
eval_sequences = 64
checkpoint_every = 100
keep = 2
seed = 1
EOF

"$lmkit" train --config "$out/run.toml" --out "$out/run" -t "${THREADS:-2}" --json
"$lmkit" plot "$out/run"
