#!/usr/bin/env python3
"""The reference DSIR (PyPI `data-selection`, p-lambda/dsir) on the pool of
scripts/dsir_pool.py, for the side-by-side of docs/benchmarks.md (scripts/bench_dsir.sh).

    python3 scripts/dsir_reference.py TARGET.jsonl POOL.jsonl N OUT_DIR WORK_DIR \
        [--procs 2] [--min-length 10] [--ngrams 2] [--buckets 10000] [--seed 0]

Hashed n-gram DSIR with the package's defaults otherwise (wordpunct tokenizer, importance
resampling by Gumbel top-k). Prints one JSON line: documents, seconds, docs/s.
"""

import argparse
import json
import shutil
import time

import numpy as np
from data_selection import HashedNgramDSIR


def main():
    ap = argparse.ArgumentParser()
    for name in ["target", "pool", "n", "out", "work"]:
        ap.add_argument(name)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--min-length", type=int, default=10)
    ap.add_argument("--ngrams", type=int, default=2)
    ap.add_argument("--buckets", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    shutil.rmtree(a.out, ignore_errors=True)
    np.random.seed(a.seed)
    t0 = time.time()
    dsir = HashedNgramDSIR([a.pool], [a.target], cache_dir=a.work, num_proc=a.procs,
                           ngrams=a.ngrams, num_buckets=a.buckets,
                           min_example_length=a.min_length)
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    dsir.resample(out_dir=a.out, num_to_sample=int(a.n), cache_dir=a.work + "/resampled")
    secs = time.time() - t0
    docs = sum(1 for _ in open(a.pool))
    print(json.dumps({"documents": docs, "seconds": secs, "docs_per_sec": docs / secs}))


if __name__ == "__main__":
    main()
