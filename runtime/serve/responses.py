"""OpenAI chat-completion shapes: the full response, stream chunks, usage (with the runtime's
timings and cache report as an extra ``timings`` field, which OpenAI clients ignore), and the
runtime's TokenLogprob entries as OpenAI's ``logprobs.content`` (schema.ChoiceLogprobs)."""
from __future__ import annotations

import json
import time
import uuid

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(result) -> dict:
    t = result.timings
    prompt = t.n_prompt_tokens + t.n_visual_tokens
    return {"prompt_tokens": prompt, "completion_tokens": t.n_generated, "total_tokens": prompt + t.n_generated,
            "prompt_tokens_details": {"cached_tokens": result.cache.prefix_reused}}


def timings(result) -> dict:
    return {**result.timings.to_dict(), **result.cache.to_dict()}


def logprobs(entries) -> dict | None:
    """Runtime TokenLogprob entries (or None: not asked for) -> OpenAI's choice ``logprobs``."""
    if entries is None:
        return None
    return {"content": [{**_top(e), "top_logprobs": [_top(t) for t in e.top]} for e in entries], "refusal": None}


def _top(e) -> dict:
    return {"token": e.token, "logprob": float(e.logprob), "bytes": list(e.bytes)}


def completion(rid: str, model: str, result, want_logprobs: bool = False) -> dict:
    lp = logprobs(getattr(result, "logprobs", None) or []) if want_logprobs else None
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": FINISH[result.finish_reason], "logprobs": lp}],
            "usage": usage(result), "timings": timings(result)}


def chunk(rid: str, model: str, delta: dict, finish: str | None = None, lp=None, **extra) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs(lp)}], **extra}
    return sse(body)


def usage_chunk(rid: str, model: str, result) -> str:
    return sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [], "usage": usage(result), "timings": timings(result)})


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"
