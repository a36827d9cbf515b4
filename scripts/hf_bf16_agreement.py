#!/usr/bin/env python3
"""How often HF transformers' bf16 model picks the same next token as its f32 model: the
reference for lmkit's bf16 parity check (docs/benchmarks.md, "Correctness on the GPU").

    python scripts/hf_bf16_agreement.py MODEL.gguf README.md wiki.test.raw

Loads the GGUF twice through transformers (dequantized to f32, and to bf16), runs the first 512
tokens of each text file and prints, per file, the share of positions whose argmax agrees and
the logit differences, as JSON. (Environment: scripts/fixtures/requirements.txt.)
"""

import json
import os
import sys

import torch
import transformers


def main():
    path, texts = sys.argv[1], sys.argv[2:]
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    load = lambda dt: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        d, gguf_file=f, torch_dtype=dt).eval()
    m32, m16 = load(torch.float32), load(torch.bfloat16)
    out = {}
    for name in texts:
        ids = tok(open(name).read(), return_tensors="pt").input_ids[:, :512]
        with torch.no_grad():
            a = m32(ids).logits[0].float()
            b = m16(ids).logits[0].float()
        out[name] = {
            "positions": ids.shape[1],
            "argmax_agreement_bf16_vs_f32": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "max_abs_diff": (a - b).abs().max().item(),
            "mean_abs_diff": (a - b).abs().mean().item(),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
