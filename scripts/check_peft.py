#!/usr/bin/env python3
"""PEFT compatibility of lmkit's LoRA adapters: HF `peft` loads the adapter lmkit saved
(`adapter/`, PEFT layout) onto the base model, and its logits are compared with the logits of
lmkit's merged model saved by `lmkit logits` (docs/results.md, "LoRA adapters load in PEFT").

    lmkit logits --model runs/sft/final "some text" --out merged.safetensors
    python scripts/check_peft.py BASE.gguf runs/sft/adapter merged.safetensors

BASE is the GGUF file the run fine-tuned (transformers dequantizes it to f32). Prints max |Δ|
and argmax agreement as JSON. (Environment: scripts/fixtures/requirements.txt plus `peft`.)
"""

import json
import os
import sys

import peft
import torch
import transformers
from safetensors.torch import load_file


def main():
    base_path, adapter, logits_path = sys.argv[1:4]
    d, f = os.path.dirname(os.path.abspath(base_path)), os.path.basename(base_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, torch_dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    saved = load_file(logits_path)
    ids = saved["ids"].long().unsqueeze(0)
    with torch.no_grad():
        ours = model(ids).logits[0].float()
    lm = saved["logits"].float()
    out = {
        "positions": ids.shape[1],
        "peft": peft.__version__,
        "max_abs_diff": (ours - lm).abs().max().item(),
        "max_logit": lm.abs().max().item(),
        "argmax_agreement": (ours.argmax(-1) == lm.argmax(-1)).float().mean().item(),
    }
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(ids).logits[0].float()
    # How far the adapter moved the model: the comparison above must be much tighter.
    out["adapter_effect_max_abs"] = (base_logits - lm).abs().max().item()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
