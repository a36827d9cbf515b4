"""Drives a running `lmkit serve` with the official `openai` Python package (no lmkit code):
chat and text completions, streamed and not, with the options a client sends. Prints one JSON
object of what came back; the Rust test `lmkit-cli/tests/serve.rs` runs it and checks it.

Usage: python openai_client_check.py BASE_URL API_KEY
"""

import json
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
out = {"openai_version": openai.__version__}

models = client.models.list()
model = models.data[0].id
out["model"] = model

msgs = [{"role": "user", "content": "What is the capital of Germany?"}]
r = client.chat.completions.create(
    model=model, messages=msgs, max_tokens=16, temperature=0, seed=1
)
out["chat"] = {
    "text": r.choices[0].message.content,
    "role": r.choices[0].message.role,
    "finish": r.choices[0].finish_reason,
    "usage": r.usage.model_dump(),
}

parts = []
finish = None
usage = None
for chunk in client.chat.completions.create(
    model=model,
    messages=msgs,
    max_tokens=16,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
out["chat_stream"] = {"text": "".join(parts), "finish": finish, "usage": usage}

r = client.chat.completions.create(
    model=model,
    messages=msgs,
    max_tokens=4,
    temperature=0,
    logprobs=True,
    top_logprobs=2,
)
lp = r.choices[0].logprobs.content
out["chat_logprobs"] = [
    {"token": t.token, "logprob": t.logprob, "top": len(t.top_logprobs)} for t in lp
]

r = client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stop=["\n\n"]
)
out["completion"] = {"text": r.choices[0].text, "finish": r.choices[0].finish_reason}
parts = []
for chunk in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stop=["\n\n"], stream=True
):
    parts.append(chunk.choices[0].text)
out["completion_stream"] = "".join(parts)

r = client.chat.completions.create(
    model=model, messages=msgs, max_tokens=8, temperature=0.8, n=2, seed=5
)
out["n"] = len(r.choices)

errors = {}
for name, kwargs in {
    "empty_messages": {"messages": []},
    "max_tokens_zero": {"messages": msgs, "max_tokens": 0},
    "max_tokens_huge": {"messages": msgs, "max_tokens": 10**9},
    "unknown_field": {"messages": msgs, "extra_body": {"frobnicate": 1}},
}.items():
    try:
        client.chat.completions.create(model=model, **kwargs)
        errors[name] = None
    except openai.APIStatusError as e:
        errors[name] = {"status": e.status_code, "message": e.message}
out["errors"] = errors

bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
try:
    bad.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    out["wrong_key"] = None
except openai.AuthenticationError as e:
    out["wrong_key"] = e.status_code

print(json.dumps(out))
