"""A bounded load generator for OpenAI-compatible servers (lmkit serve, llama.cpp's
llama-server), standard library only: a fixed number of chat requests from N concurrent clients
(one keep-alive connection each); reports requests/s, output tokens/s (from each answer's
usage), latency p50/p99 and status counts as JSON.

With --cancel F a share F of the requests stream and hang up after their first chunk (a client
that disconnects), to check that the server frees their slots.

Usage: python3 load_test.py http://127.0.0.1:8080 --concurrency 16 --requests 256 \
           --max-tokens 64 --ignore-eos [--cancel 0.1] [--api-key KEY]
"""

import argparse
import http.client
import json
import random
import threading
import time
from urllib.parse import urlparse

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in simple terms.",
    "List five uses for a paperclip.",
    "What are the main causes of the French Revolution?",
    "Describe a day in the life of a lighthouse keeper.",
    "Give me three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base", help="server address, e.g. http://127.0.0.1:8080")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--model", default="default")
    p.add_argument("--api-key", default=None)
    p.add_argument("--cancel", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true")
    args = p.parse_args()
    url = urlparse(args.base)
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"

    lock = threading.Lock()
    next_i = [0]
    stats = {"status": {}, "tokens": 0, "latency": [], "cancelled": 0}

    def count(key):
        stats["status"][key] = stats["status"].get(key, 0) + 1

    def worker():
        conn = None
        while True:
            with lock:
                i = next_i[0]
                if i >= args.requests:
                    break
                next_i[0] += 1
            body = {
                "model": args.model,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "seed": i,
            }
            if args.ignore_eos:
                body["ignore_eos"] = True
            cancel = random.Random(i).random() < args.cancel
            if cancel:
                body["stream"] = True
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
                conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
                r = conn.getresponse()
                if cancel:
                    r.fp.readline()  # the first bytes of the stream, then hang up
                    conn.close()
                    conn = None
                    with lock:
                        stats["cancelled"] += 1
                        count(str(r.status))
                    continue
                data = r.read()
                dt = time.perf_counter() - t0
                with lock:
                    count(str(r.status))
                    if r.status == 200:
                        stats["tokens"] += json.loads(data)["usage"]["completion_tokens"]
                        stats["latency"].append(dt)
            except Exception as e:  # a transport error counts as a failure
                if conn is not None:
                    conn.close()
                conn = None
                with lock:
                    count("error:" + type(e).__name__)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(stats["latency"])

    def q(f):
        return lat[min(len(lat) - 1, int(f * len(lat)))] if lat else None

    print(json.dumps({
        "concurrency": args.concurrency,
        "requests": args.requests,
        "completed": len(lat),
        "cancelled": stats["cancelled"],
        "status": stats["status"],
        "seconds": round(wall, 3),
        "requests_per_sec": len(lat) / wall,
        "output_tokens": stats["tokens"],
        "output_tokens_per_sec": stats["tokens"] / wall,
        "latency_p50": q(0.5),
        "latency_p99": q(0.99),
    }))


if __name__ == "__main__":
    main()
