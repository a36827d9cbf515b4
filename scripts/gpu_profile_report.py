#!/usr/bin/env python3
"""Summaries for `scripts/gpu-check profile`.

    gpu_profile_report.py parity WORK   training losses: f32 GPU vs f32 CPU (bar 1e-3), bf16 GPU
                                        vs f32 CPU (for information)
    gpu_profile_report.py speed WORK    lmkit (flash, materialized, autograd) vs PyTorch training
                                        tokens/s and MFU (113M config), and the first losses
    gpu_profile_report.py kernels OUT   Nsight Compute per-kernel summaries (ncu-*.csv in OUT),
                                        aggregated by kernel name, the costliest first
"""

import csv
import io
import json
import statistics
import sys


def parity(work):
    def losses(name):
        try:
            return [json.loads(line)["loss"] for line in open(f"{work}/{name}/metrics.jsonl")]
        except OSError as e:
            print(f"  {name}: no losses ({e})")
            return []
    ref = losses("small-cpu-f32")
    for name, bar in [("small-cuda-f32", 1e-3), ("small-cuda-bf16", None),
                      ("small-cuda-f16", None)]:
        got = losses(name)
        if not ref or len(got) != len(ref):
            print(f"  {name}: {len(got)} losses vs {len(ref)} on the CPU")
            continue
        d = max(abs(a - b) for a, b in zip(ref, got))
        verdict = "" if bar is None else (" PASS" if d <= bar else " FAIL") + f" at {bar:g}"
        print(f"  training parity {name} vs small-cpu-f32: {len(got)} steps, max |d loss| "
              f"{d:.2e}{verdict}; first {got[0]:.4f}, last {got[-1]:.4f} (cpu {ref[-1]:.4f})")
        # Loss scaling (f16): steps skipped for gradients that were not finite, final scale.
        logs = [json.loads(line) for line in open(f"{work}/{name}/metrics.jsonl")]
        if any("loss_scale" in rec for rec in logs):
            print(f"    loss scale: {sum(rec.get('skipped', 0) for rec in logs)} steps skipped, "
                  f"last scale {logs[-1].get('loss_scale')}")
    # Heads of 64: bf16 with flash attention and with the probabilities materialized, against
    # f32 on the CPU (for information: bf16 rounding moves the losses by ~1e-2).
    ref = losses("flash-cpu-f32-1")
    for name in ["flash-cuda-bf16-1", "flash-cuda-bf16-0"]:
        got = losses(name)
        if not ref or len(got) != len(ref):
            print(f"  {name}: {len(got)} losses vs {len(ref)} on the CPU")
            continue
        d = max(abs(a - b) for a, b in zip(ref, got))
        print(f"  {name} vs flash-cpu-f32-1: {len(got)} steps, max |d loss| {d:.2e}; "
              f"last {got[-1]:.4f} (cpu {ref[-1]:.4f})")


def speed(work):
    n, layers, hidden, seq = 113265408, 12, 768, 1024
    flops, peak = 6 * n + 12 * layers * hidden * seq, 989.4e12
    def median_tps(run):
        logs = [json.loads(line) for line in open(f"{work}/{run}/metrics.jsonl")]
        return statistics.median(rec["tokens_per_sec"] for rec in logs[4:])

    rows = []
    for name, run in [("lmkit", "big"), ("lmkit materialized", "big-mat"),
                      ("lmkit autograd", "big-ag"), ("lmkit batch 32", "big32")]:
        try:
            rows.append((name, median_tps(run)))
        except (OSError, ValueError, KeyError, statistics.StatisticsError) as e:
            print(f"  {name}: no speed ({e})")
    for name, file in [("pytorch (sdpa)", "torch"), ("pytorch batch 32", "torch32")]:
        try:
            rows.append((name, json.load(open(f"{work}/{file}.json"))["tokens_per_sec"]))
        except (OSError, ValueError, KeyError) as e:
            print(f"  {name}: no speed ({e})")
    for run in ["big", "big-mat", "big-ag"]:
        try:
            ls = [json.loads(line)["loss"] for line in open(f"{work}/{run}/metrics.jsonl")]
            print(f"  {run} losses: " + " ".join(f"{x:.4f}" for x in ls[:6]))
        except (OSError, ValueError, KeyError):
            pass
    for name, tps in rows:
        print(f"  {name:<20} {tps:>9.0f} tok/s  MFU {100 * tps * flops / peak:5.1f}%")
    tps = dict(rows)
    for name, ref in [("lmkit", "pytorch (sdpa)"), ("lmkit materialized", "pytorch (sdpa)"),
                      ("lmkit autograd", "pytorch (sdpa)"), ("lmkit batch 32", "pytorch batch 32")]:
        if name in tps and ref in tps:
            print(f"  ratio {name}/{ref} {tps[name] / tps[ref]:.3f}")


def kernels(out):
    for name in ["train", "decode", "fused-decode"]:
        try:
            text = open(f"{out}/ncu-{name}.csv").read()
        except OSError:
            continue
        start = text.find('"Process ID"')
        rows = list(csv.reader(io.StringIO(text[max(start, 0):])))
        if not rows:
            print(f"ncu {name}: empty")
            continue
        head = rows[0]
        try:
            ki, ci, vi, ui = (head.index(k) for k in
                              ["Kernel Name", "Invocations", "Average", "Metric Unit"])
        except ValueError:
            print(f"ncu {name}: unexpected columns {head[:14]}")
            print(text[:2000])
            continue
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3,
                 "ms": 1e3}
        agg = {}
        for r in rows[1:]:
            if len(r) <= max(ki, ci, vi, ui):
                continue
            try:
                count = int(r[ci].replace(",", ""))
                avg = float(r[vi].replace(",", "")) * scale.get(r[ui], 1.0)
            except ValueError:
                continue
            a = agg.setdefault(r[ki][:90], [0, 0.0])
            a[0] += count
            a[1] += count * avg
        total = sum(v[1] for v in agg.values()) or 1.0
        count = sum(v[0] for v in agg.values())
        print(f"ncu {name}: {count} kernels, {total / 1e3:.1f} ms GPU time in all")
        for k, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:30]:
            print(f"  {t / 1e3:8.2f} ms {100 * t / total:5.1f}% {c:6d}x  {k}")


if __name__ == "__main__":
    {"parity": parity, "speed": speed, "kernels": kernels}[sys.argv[1]](sys.argv[2])
