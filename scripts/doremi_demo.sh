#!/usr/bin/env bash
# DoReMi at small scale: five real domains from the pool of scripts/dsir_pool.py (Wikipedia,
# Bible, Python code, benchmark questions, GSM8K), each capped and split into training text
# and held-out text, and a BPE tokenizer of 8,192 tokens trained on the training text (so the
# output layer does not dominate a small model's compute). Then:
#   1. `lmkit data doremi`: the reference (a small Llama trained on the uniform mixture) and the
#      proxy (the same shape, trained against the reference by Group DRO), which writes the
#      learned domain weights and their plot;
#   2. for every seed in SEEDS: the baseline on the uniform mixture and the main run on the
#      reweighted mixture, the same shape and steps;
# and the held-out perplexity of every baseline and main run on every domain (mean over the
# seeds; the average and the worst domain). docs/results.md quotes it.
#
#   scripts/doremi_demo.sh [OUT_DIR] [STEPS]      (defaults runs/doremi-demo, 1000)
#   LMKIT (default target/release/lmkit), PYTHON, THREADS (default 2), ETA (DoReMi's step
#   size, default 1 as in the paper), UPDATE_EVERY (batches pooled per weight update, default
#   1 as in the paper), ROUNDS (iterated DoReMi: up to this many rounds, default 1), SEEDS
#   (default "1 2 3"), MIXTURES (more fixed mixtures to train and score beside the two, e.g.
#   "hand=0.27,0.25,0.29,0.1,0.09": NAME=weights of wiki, bible, code, bench, gsm8k)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/doremi-demo}"
steps="${2:-1000}"
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
[ -f "$out/tok8k/tokenizer.json" ] || "$lmkit" tokenizer train "$out"/*.train.jsonl --vocab-size 8192 \
  --out "$out/tok8k" 2>"$out/tokenizer.log"
config() { # name seed extra-data-lines
  cat >"$out/$1.toml" <<TOML
[model]
hidden_size = 256
intermediate_size = 688
num_layers = 4
num_heads = 4
num_kv_heads = 2
max_position_embeddings = 128
[data]
tokenizer = "tok8k"
seq_len = 128
$3
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
seed = $2
TOML
}
T=(-t "${THREADS:-2}")
seeds=(${SEEDS:-1 2 3})
config uniform "${seeds[0]}" ""
[ -f "$out/doremi/domain_weights.json" ] || "$lmkit" data doremi --proxy-config "$out/uniform.toml" \
  --out "$out/doremi" --eta "${ETA:-1}" --update-every "${UPDATE_EVERY:-1}" --rounds "${ROUNDS:-1}" "${T[@]}" 2>"$out/doremi.log"
for s in "${seeds[@]}"; do
  config "uniform-$s" "$s" ""
  # The first seed's baseline is the reference itself (the same config and seed).
  # (Iterated: round 1's reference.)
  ref="$out/doremi/reference/final"
  [ "${ROUNDS:-1}" = 1 ] || ref="$out/doremi/round-1/reference/final"
  if [ "$s" = "${seeds[0]}" ] && [ ! -d "$out/uniform-$s/final" ]; then
    mkdir -p "$out/uniform-$s" && cp -r "$ref" "$out/uniform-$s/final"
  fi
  config "reweighted-$s" "$s" 'weights_from = "doremi/domain_weights.json"'
  runs=("uniform-$s" "reweighted-$s")
  for m in ${MIXTURES:-}; do
    IFS=, read -r w1 w2 w3 w4 w5 <<<"${m#*=}"
    config "${m%%=*}-$s" "$s" "$(printf '[data.weights]\nwiki = %s\nbible = %s\ncode = %s\nbench = %s\ngsm8k = %s' \
      "$w1" "$w2" "$w3" "$w4" "$w5")"
    runs+=("${m%%=*}-$s")
  done
  for run in "${runs[@]}"; do
    [ -d "$out/$run/final" ] || "$lmkit" train --config "$out/$run.toml" --out "$out/$run" "${T[@]}" \
      2>"$out/$run.log"
    for g in wiki bible code bench gsm8k; do
      [ -f "$out/ppl-$run-$g.json" ] || "$lmkit" ppl "$out/$g.heldout.txt" --model "$out/$run/final" \
        --ctx 128 --max-windows 200 "${T[@]}" --json >"$out/ppl-$run-$g.json"
    done
  done
done
mixes="uniform reweighted"
for m in ${MIXTURES:-}; do mixes="$mixes ${m%%=*}"; done
"$py" - "$out" "$mixes" "${seeds[@]}" <<'PY'
import json, math, statistics, sys
out, mixes, seeds = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
doms = ["wiki", "bible", "code", "bench", "gsm8k"]
w = json.load(open(f"{out}/doremi/domain_weights.json"))["average"]
print("DoReMi weights: " + ", ".join(f"{d} {w[d]:.3f}" for d in doms))
for mix in mixes:
    rows = []
    for s in seeds:
        p = {d: json.load(open(f"{out}/ppl-{mix}-{s}-{d}.json"))["ppl"] for d in doms}
        rows.append(p)
        avg = sum(p.values()) / len(p)
        geo = math.exp(sum(math.log(v) for v in p.values()) / len(p))
        print(f"{mix:>10} seed {s}: " + "  ".join(f"{d} {p[d]:.1f}" for d in doms)
              + f"  | average {avg:.1f}, geometric {geo:.1f}, worst {max(p.values()):.1f}")
    mean = {d: statistics.mean(r[d] for r in rows) for d in doms}
    sd = {d: statistics.stdev(r[d] for r in rows) if len(rows) > 1 else 0.0 for d in doms}
    avg = [sum(r.values()) / len(r) for r in rows]
    worst = [max(r.values()) for r in rows]
    print(f"{mix:>10} mean:   " + "  ".join(f"{d} {mean[d]:.1f}±{sd[d]:.1f}" for d in doms)
          + f"  | average {statistics.mean(avg):.1f}, worst {statistics.mean(worst):.1f}")
PY
