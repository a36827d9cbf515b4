#!/usr/bin/env python3
"""Training throughput of HF transformers' LlamaForCausalLM, for a side-by-side with
`lmkit train` on the same shape, batch, sequence length and thread count (CPU) or GPU.

    python scripts/bench_train_torch.py --hidden 256 --ffn 688 --layers 4 --heads 4 --kv-heads 2 \
        --vocab 49152 --seq 128 --batch 8 --steps 20 --threads 2
    python scripts/bench_train_torch.py --device cuda --dtype bf16 --attn sdpa --hidden 768 \
        --ffn 2048 --layers 12 --heads 12 --kv-heads 4 --seq 1024 --batch 16

On a GPU, `--dtype bf16` is autocast (f32 master weights and AdamW state, bf16 products), as
`lmkit train --dtype bf16` does; the step is timed to the device's completion.

Prints one JSON line: tokens/s over the timed steps (after 3 warm-up steps) and peak RSS.
Random token ids: the speed of a step does not depend on their values. (Environment:
scripts/fixtures/requirements.txt.)
"""

import argparse
import json
import resource
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    for k, v in [("hidden", 256), ("ffn", 688), ("layers", 4), ("heads", 4), ("kv_heads", 2),
                 ("vocab", 49152), ("seq", 128), ("batch", 8), ("steps", 20), ("threads", 2)]:
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(1024, a.seq), tie_word_embeddings=True, rope_theta=10000.0,
        attn_implementation=a.attn,
    )
    model = transformers.LlamaForCausalLM(cfg).float().to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warm, tokens, t0 = 3, 0, None
    for step in range(warm + a.steps):
        if step == warm:
            t0 = time.perf_counter()
        ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1)).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warm:
            tokens += a.batch * a.seq
        if dev.type == "cuda" and step == warm - 1:
            torch.cuda.synchronize()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(json.dumps({
        "tool": "pytorch", "torch": torch.__version__, "transformers": transformers.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(dev), "dtype": a.dtype, "attn": a.attn,
        "tokens_per_sec": tokens / dt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
