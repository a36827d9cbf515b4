#!/usr/bin/env bash
# DSIR side by side: lmkit vs the reference (PyPI data-selection) on the pool and target of
# scripts/dsir_pool.py, same settings (unigrams+bigrams, 10,000 buckets, min length, 2 workers),
# then the KL reduction of both selections and the share of the target's domain in each.
#
#   scripts/bench_dsir.sh [N] [MIN_LENGTH]     (defaults 50000, 10)
#   LMKIT (default target/release/lmkit), PYTHON (with data-selection installed), DSIR_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-50000}"
minlen="${2:-10}"
lmkit="${LMKIT:-target/release/lmkit}"
py="${PYTHON:-python3}"
dir="${DSIR_DIR:-$HOME/.cache/lmkit/dsir}"
[ -f "$dir/pool.jsonl" ] || "$py" scripts/dsir_pool.py "$dir"
out="$dir/bench"
mkdir -p "$out"
T() { /usr/bin/time -f '{"max_rss_kb": %M, "wall_s": %e}' -o "$1" "${@:2}"; }
T "$out/lmkit.time" "$lmkit" data select --target "$dir/target.jsonl" --raw "$dir/pool.jsonl" \
  --n "$n" --min-length "$minlen" -t 2 --seed 0 --out "$out/lmkit.jsonl" --json >"$out/lmkit.json"
T "$out/ref.time" "$py" scripts/dsir_reference.py "$dir/target.jsonl" "$dir/pool.jsonl" "$n" \
  "$out/ref" "$out/ref-work" --procs 2 --min-length "$minlen" >"$out/ref.json"
cat "$out"/ref/*.jsonl >"$out/ref.jsonl"
for who in lmkit ref; do
  "$lmkit" data kl --target "$dir/target.jsonl" --raw "$dir/pool.jsonl" --selected "$out/$who.jsonl" \
    -t 2 --json >"$out/$who-kl.json"
done
"$py" - "$out" "$dir/pool.jsonl" <<'PY'
import json, sys
out, pool = sys.argv[1], sys.argv[2]
def share(path):
    n = wiki = 0
    for line in open(path):
        n += 1
        wiki += json.loads(line)["source"] == "wiki"
    return n, wiki / max(n, 1)
pn, pshare = share(pool)
print(f"pool: {pn} documents, Wikipedia share {100 * pshare:.2f}%")
for who in ["lmkit", "ref"]:
    t = json.load(open(f"{out}/{who}.time"))
    kl = json.load(open(f"{out}/{who}-kl.json"))
    n, s = share(f"{out}/{who}.jsonl")
    print(f"{who:>5}: {t['wall_s']:7.1f} s  {pn / t['wall_s']:9.0f} docs/s  peak RSS "
          f"{t['max_rss_kb'] / 1e6:.2f} GB  selected {n}  Wikipedia share {100 * s:.1f}%  "
          f"KL reduction {kl.get('kl_reduction')}")
PY
