#!/usr/bin/env python3
"""`lmkit eval` vs the lm-evaluation-harness fixture, item by item (docs/results.md's table).

    lmkit eval --tasks hellaswag,arc_easy,arc_challenge,piqa,boolq,winogrande,openbookqa \
        --limit 200 --dequantize --log-samples samples.jsonl
    python3 scripts/compare_lmeval.py tests/fixtures/lmeval_smollm2.json samples.jsonl
"""
import json
import sys

ref = json.load(open(sys.argv[1]))
mine = {}
for line in open(sys.argv[2]):
    s = json.loads(line)
    mine.setdefault(s["task"], []).append(s)
print("| task | items | lm-eval acc | lmkit acc | lm-eval acc_norm | lmkit acc_norm "
      "| same prediction | max abs. diff. of a log-likelihood |")
print("|---|---|---|---|---|---|---|---|")
for t, r in ref["tasks"].items():
    got = mine.get(t, [])
    n = min(len(got), len(r["items"]))
    if n == 0:
        continue
    worst, same = 0.0, 0
    acc = sum(g["acc"] for g in got[:n]) / n
    accn = sum(g["acc_norm"] for g in got[:n]) / n
    racc = sum(w["acc"] for w in r["items"][:n]) / n
    raccn = (sum(w["acc_norm"] for w in r["items"][:n]) / n) if r["acc_norm"] is not None else None
    for g, w in zip(got[:n], r["items"][:n]):
        worst = max([worst] + [abs(a - b) for a, b in zip(g["logprobs"], w["lls"])])
        same += g["pred"] == max(range(len(w["lls"])), key=lambda i: (w["lls"][i], -i))
    fmt = lambda x: "–" if x is None else f"{x:.3f}"
    print(f"| {t} | {n} | {racc:.3f} | {acc:.3f} | {fmt(raccn)} | {fmt(accn if raccn is not None else None)} "
          f"| {same}/{n} | {worst:.1e} |")
