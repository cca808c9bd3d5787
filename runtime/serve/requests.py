"""A chat-completions request body -> what the runtime needs: prompt ids, pixel values and a
GenerationConfig. Every problem is a RequestError (or the runtime's ImageError /
ContextLengthError), raised before the request is queued.

Messages: optional ``system`` messages (their text replaces the template's system prompt), then
``user`` and ``assistant`` turns alternating, ending with ``user``. A user message's images come
first in its question (``<image>\\n`` each, LLaVA's layout), then its text parts joined by newlines.
Sampling: greedy unless ``temperature`` > 0 is given (then ``top_p`` and ``seed`` apply).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..chat import IMAGE_TOKEN
from ..errors import EdgeVLMError
from ..processor import image_question
from ..generate import GenerationConfig, fit_max_new_tokens
from .errors import ModelNotFound, RequestError
from .images import image_bytes


@dataclass
class Limits:
    max_image_bytes: int = 20 << 20
    max_pixels: int = 64_000_000
    max_images: int = 1  # images per conversation the model's template takes
    image_root: Path | None = None
    default_max_tokens: int = 256


@dataclass
class ChatJob:
    prompt_ids: list[int]
    pixels: np.ndarray | None  # [B, 3, S, S]
    config: GenerationConfig
    stream: bool
    include_usage: bool


@dataclass
class Conversation:
    turns: list[tuple[str, str | None]]
    system: str | None
    images: list[str]  # image_url values, in prompt order


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None, "invalid_json")
    return body


def check_model(body: dict, model_name: str) -> None:
    name = body.get("model", model_name)
    if name != model_name:
        raise ModelNotFound(f"model {name!r} is not served here; this server serves {model_name!r}",
                            "model", "model_not_found")


def prepare_chat(body: dict, rt, limits: Limits) -> ChatJob:
    """Validate ``body`` and turn it into a ChatJob for ``rt`` (a Runtime)."""
    conv = conversation(body.get("messages"))
    config = generation_config(body, limits)
    if len(conv.images) > limits.max_images:
        raise RequestError(f"the conversation has {len(conv.images)} images but this model's prompt "
                           f"template takes at most {limits.max_images}", "messages", "too_many_images")
    ids = rt.chat_ids(conv.turns, conv.system)
    n_visual = len(conv.images) * rt.manifest.model.n_visual_tokens
    fit_max_new_tokens(n_visual, len(ids) - len(conv.images), 1, rt.backend.n_ctx)  # 400 naming both
    pixels = None
    if conv.images:
        raw = [image_bytes(u, limits.max_image_bytes, limits.image_root) for u in conv.images]
        pixels = np.concatenate([rt.pixel_values(b, limits.max_pixels) for b in raw])  # [B, 3, S, S]
    stream_options = body.get("stream_options") or {}
    return ChatJob(ids, pixels, config, bool(body.get("stream", False)),
                   bool(isinstance(stream_options, dict) and stream_options.get("include_usage")))


def conversation(messages) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required: a non-empty list of {role, content}", "messages")
    system, turns, images, question = None, [], [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] must be an object with role system, user or assistant",
                               "messages")
        text, urls = _content(m.get("content"), f"messages[{i}]")
        if m["role"] == "system":
            system = text if system is None else f"{system}\n{text}"
        elif m["role"] != ("user" if question is None else "assistant"):
            raise RequestError(f"messages[{i}]: user and assistant messages must alternate, "
                               "starting with user", "messages")
        elif m["role"] == "user":
            question = image_question(text, len(urls))  # text holds no <image> (checked)
            images = images + urls
        else:
            if urls:
                raise RequestError(f"messages[{i}]: assistant messages cannot hold images", "messages")
            turns.append((question, text))
            question = None
    if question is None:
        raise RequestError("the last message must be from the user", "messages")
    return Conversation(turns + [(question, None)], system, images)


def _content(content, where: str) -> tuple[str, list[str]]:
    """(text, image urls) of a message's content: a string or a list of text / image_url parts."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise RequestError(f"{where}.content must be a string or a list of parts", "messages")
    texts, urls = [], []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise RequestError(f"{where}.content[{j}].image_url needs a url", "messages")
            urls.append(url)
        else:
            raise RequestError(f"{where}.content[{j}]: parts must be text or image_url", "messages")
    text = "\n".join(texts)
    if IMAGE_TOKEN in text:
        raise RequestError(f"{where}: the text contains {IMAGE_TOKEN}; send images as image_url parts",
                           "messages")
    return text, urls


def _number(body: dict, name: str, default, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (kind is int and value != int(value)):
        raise RequestError(f"{name} must be a{'n integer' if kind is int else ' number'}, got {value!r}", name)
    return kind(value)


def generation_config(body: dict, limits: Limits) -> GenerationConfig:
    if _number(body, "n", 1, int) != 1:
        raise RequestError("only n=1 is supported", "n")
    max_tokens = _number(body, "max_completion_tokens", None, int)
    max_tokens = _number(body, "max_tokens", limits.default_max_tokens if max_tokens is None else max_tokens, int)
    temperature = _number(body, "temperature", 0.0)
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    if temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {temperature}", "temperature")
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else 1.0,
                              top_p=_number(body, "top_p", 1.0), seed=_number(body, "seed", 0, int),
                              stop=tuple(stop))
    try:
        config.validate()
    except EdgeVLMError as e:  # the runtime's own checks (top_p range...): a 400 naming the field
        raise RequestError(str(e), "top_p" if "top_p" in str(e) else None) from None
    return config
