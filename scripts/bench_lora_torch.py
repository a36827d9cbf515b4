#!/usr/bin/env python3
"""LoRA fine-tuning throughput of HF transformers + PEFT on a GGUF model (dequantized to f32),
for a side-by-side with `lmkit train --model MODEL.gguf` and a `[lora]` section of the same
rank, targets, batch, sequence length and thread count (docs/benchmarks.md).

    python scripts/bench_lora_torch.py MODEL.gguf --r 8 --alpha 16 \
        --targets q_proj,k_proj,v_proj,o_proj --seq 256 --batch 4 --steps 10 --threads 2

Only the adapters train (AdamW over them, gradient clipping at 1.0), as in lmkit. Token ids
are random: a step's speed does not depend on their values. Prints one JSON line: tokens/s over
the timed steps (after 3 warm-up steps) and peak RSS. (Environment:
scripts/fixtures/requirements.txt plus `peft`.)
"""

import argparse
import json
import os
import resource
import time

import peft
import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    for k, v in [("r", 8), ("alpha", 16), ("seq", 256), ("batch", 4), ("steps", 10),
                 ("threads", 2)]:
        ap.add_argument("--" + k, type=int, default=v)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, f = os.path.dirname(os.path.abspath(a.model)), os.path.basename(a.model)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, torch_dtype=torch.float32, attn_implementation="sdpa")
    cfg = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0,
                          target_modules=a.targets.split(","), task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    vocab = base.config.vocab_size
    warm, tokens, t0 = 3, 0, None
    for step in range(warm + a.steps):
        if step == warm:
            t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (a.batch, a.seq))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warm:
            tokens += a.batch * a.seq
    secs = time.perf_counter() - t0
    print(json.dumps({
        "tool": f"transformers {transformers.__version__} + peft {peft.__version__}",
        "torch": torch.__version__,
        "trainable_params": sum(p.numel() for p in params),
        "tokens_per_sec": tokens / secs,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }))


if __name__ == "__main__":
    main()
