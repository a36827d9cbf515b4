#!/usr/bin/env python3
"""Seconds per DPO step of TRL's `DPOTrainer` with a PEFT LoRA adapter, for a side-by-side with
`lmkit dpo --lora` on the same model, pairs, batch, sequence cap and thread count
(docs/benchmarks.md).

    python scripts/bench_dpo_trl.py MODEL.gguf ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz \
        --limit 40 --batch 4 --max-len 128 --steps 6 --r 8 --alpha 16 \
        --targets q_proj,k_proj,v_proj,o_proj --threads 2

The HH-RLHF dialogues are split as lmkit (and the DPO reference code) splits them: the prompt is
`chosen` up to and including its last "\\n\\nAssistant:"; pairs whose prompts differ are
skipped. The model is the GGUF file dequantized to f32 by transformers. The reference
log-probs are computed before training (`precompute_ref_log_probs`), as lmkit does, so the timed
steps are policy steps only; sequences keep their last `--max-len` tokens. Prints one JSON line:
each step's seconds (the first two are warm-up), their median over the rest, and the losses.
(Environment: scripts/fixtures/requirements.txt plus `peft`, `trl`, `datasets`.)
"""

import argparse
import gzip
import json
import os
import statistics
import tempfile
import time

import datasets
import peft
import torch
import transformers
import trl

ASSISTANT = "\n\nAssistant:"


def pairs(path, limit):
    out = []
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for line in f:
            r = json.loads(line)
            c, j = r["chosen"], r["rejected"]
            k = c.rfind(ASSISTANT)
            if k < 0 or not j.startswith(c[: k + len(ASSISTANT)]):
                continue
            p = c[: k + len(ASSISTANT)]
            out.append({"prompt": p, "chosen": c[len(p):], "rejected": j[len(p):]})
            if len(out) == limit:
                break
    return out


class Clock(transformers.TrainerCallback):
    def __init__(self):
        self.t0, self.laps = None, []

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.laps.append(time.perf_counter() - self.t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    for k, v in [("limit", 40), ("batch", 4), ("max_len", 128), ("steps", 6), ("r", 8),
                 ("alpha", 16), ("threads", 2)]:
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, f = os.path.dirname(os.path.abspath(a.model)), os.path.basename(a.model)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, torch_dtype=torch.float32, attn_implementation="sdpa")
    # The weights are dequantized f32 tensors; only the GGUF marker would stop the Trainer.
    model.hf_quantizer, model.is_quantized = None, False
    ds = datasets.Dataset.from_list(pairs(a.data, a.limit))
    cfg = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="lmkit-bench-dpo-trl-"), per_device_train_batch_size=a.batch,
        max_steps=2 + a.steps, max_length=a.max_len, truncation_mode="keep_end",
        precompute_ref_log_probs=True, beta=0.1, learning_rate=5e-4, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, save_strategy="no",
        seed=0, remove_unused_columns=False)
    lora = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0,
                           target_modules=a.targets.split(","), task_type="CAUSAL_LM")
    clock = Clock()
    tr = trl.DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                        peft_config=lora, callbacks=[clock])
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    print(json.dumps({
        "tool": f"trl {trl.__version__} + peft {peft.__version__}, torch {torch.__version__}",
        "seconds_per_step": [round(x, 3) for x in clock.laps],
        "median_after_warmup": statistics.median(clock.laps[2:]),
        "losses": losses,
    }))


if __name__ == "__main__":
    main()
