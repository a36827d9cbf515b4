#!/usr/bin/env bash
# DoReMi at small scale: five real domains from the pool of scripts/dsir_pool.py (Wikipedia,
# Bible, Python code, benchmark questions, GSM8K), each capped and split into training text
# and held-out text. Then, with one config and seed:
#   1. the reference: a small Llama trained on the uniform mixture (also the baseline);
#   2. the proxy: the same shape trained against the reference by Group DRO
#      (`lmkit train --doremi-reference`), which writes the learned domain weights;
#   3. the main run: the same shape and steps on the reweighted mixture;
# and the held-out perplexity of the baseline and the main run on every domain (average and
# worst). docs/results.md quotes it.
#
#   scripts/doremi_demo.sh [OUT_DIR] [STEPS]      (defaults runs/doremi-demo, 200)
#   LMKIT (default target/release/lmkit), PYTHON, THREADS (default 2), ETA (DoReMi's step
#   size, default 1 as in the paper)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/doremi-demo}"
steps="${2:-200}"
lmkit="${LMKIT:-target/release/lmkit}"
py="${PYTHON:-python3}"
dir="${DSIR_DIR:-$HOME/.cache/lmkit/dsir}"
[ -f "$dir/pool.jsonl" ] || "$py" scripts/dsir_pool.py "$dir"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
"$py" - "$dir/pool.jsonl" "$out" <<'PY'
import json, sys, random
pool, out = sys.argv[1], sys.argv[2]
groups = {"wiki": ["wiki"], "bible": ["kjv", "web"], "code": ["code"], "bench": ["bench"],
          "gsm8k": ["gsm8k"]}
cap = 2_000_000  # characters of training text per domain
docs = {g: [] for g in groups}
for line in open(pool):
    r = json.loads(line)
    src = r["source"].split(":")[0]
    for g, members in groups.items():
        if src in members:
            docs[g].append(r["text"])
for g, ds in docs.items():
    random.Random(0).shuffle(ds)
    held = ds[: max(50, len(ds) // 50)]
    train, size = [], 0
    for d in ds[len(held):]:
        if size > cap:
            break
        train.append(d)
        size += len(d)
    with open(f"{out}/{g}.train.jsonl", "w") as f:
        for d in train:
            f.write(json.dumps({"text": d}) + "\n")
    with open(f"{out}/{g}.heldout.txt", "w") as f:
        f.write("\n".join(held[:2000]) + "\n")
    print(f"{g}: {len(train)} training documents ({size} chars), {min(len(held), 2000)} held out")
PY
config() { # name extra-data-lines
  cat >"$out/$1.toml" <<TOML
[model]
hidden_size = 256
intermediate_size = 688
num_layers = 4
num_heads = 4
num_kv_heads = 2
max_position_embeddings = 128
[data]
seq_len = 128
$2
[data.domains]
wiki = ["wiki.train.jsonl"]
bible = ["bible.train.jsonl"]
code = ["code.train.jsonl"]
bench = ["bench.train.jsonl"]
gsm8k = ["gsm8k.train.jsonl"]
[train]
steps = $steps
batch = 8
lr = 2e-3
min_lr = 2e-4
warmup = 20
seed = 1
TOML
}
T=(-t "${THREADS:-2}")
config uniform ""
[ -d "$out/uniform/final" ] || "$lmkit" train --config "$out/uniform.toml" --out "$out/uniform" "${T[@]}" 2>"$out/uniform.log"
[ -f "$out/proxy/domain_weights.json" ] || "$lmkit" train --config "$out/uniform.toml" --out "$out/proxy" \
  --doremi-reference "$out/uniform/final" --doremi-eta "${ETA:-1}" "${T[@]}" 2>"$out/proxy.log"
config doremi 'weights_from = "proxy/domain_weights.json"'
[ -d "$out/doremi/final" ] || "$lmkit" train --config "$out/doremi.toml" --out "$out/doremi" "${T[@]}" 2>"$out/doremi.log"
for run in uniform doremi; do
  for g in wiki bible code bench gsm8k; do
    "$lmkit" ppl "$out/$g.heldout.txt" --model "$out/$run/final" --ctx 128 --max-windows 200 \
      "${T[@]}" --json >"$out/ppl-$run-$g.json"
  done
done
"$py" - "$out" <<'PY'
import json, sys
out = sys.argv[1]
doms = ["wiki", "bible", "code", "bench", "gsm8k"]
w = json.load(open(f"{out}/proxy/domain_weights.json"))["average"]
print("DoReMi weights: " + ", ".join(f"{d} {w[d]:.3f}" for d in doms))
for run in ["uniform", "doremi"]:
    p = {d: json.load(open(f"{out}/ppl-{run}-{d}.json"))["ppl"] for d in doms}
    avg = sum(p.values()) / len(p)
    worst = max(p.values())
    print(f"{run:>8}: " + "  ".join(f"{d} {p[d]:.1f}" for d in doms)
          + f"  | average {avg:.1f}, worst {worst:.1f}")
PY
