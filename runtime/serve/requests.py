"""A validated chat-completions request (schema.ChatRequest) -> what the runtime needs: prompt ids,
pixel values and a GenerationConfig. The types and ranges are the schema's (FastAPI checks them);
the rules that span fields are here. Every problem is a RequestError naming the field (or the
runtime's ImageError / ContextLengthError / ConstraintError), raised before the request is queued.

Messages: optional ``system``/``developer`` messages (their text replaces the template's system prompt), then
``user`` and ``assistant`` turns alternating, ending with ``user``. A user message's images come
first in its question (``<image>\\n`` each, LLaVA's layout), then its text parts joined by newlines.
Sampling: greedy unless ``temperature`` > 0 is given (then ``top_p``, ``top_k`` and ``seed`` apply).
``response_format`` json_object / json_schema become the runtime's Constraint (a token mask in the
generation loop); ``logprobs``, ``logit_bias`` and the penalties go to its GenerationConfig.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..chat import IMAGE_TOKEN
from ..errors import EdgeVLMError
from ..processor import image_question
from ..generate import GenerationConfig, fit_max_new_tokens
from .errors import ModelNotFound, RequestError
from .video import DEFAULT_MAX_VIDEO_FRAMES, DEFAULT_VIDEO_FRAMES, media_pixels, video_refs
from .schema import NO_EFFECT, ChatRequest, Message

log = logging.getLogger("edgevlm.serve")
MIN_TEMPERATURE = 1e-4  # lower temperatures are greedy decoding


@dataclass
class Limits:
    max_image_bytes: int = 20 << 20
    max_pixels: int = 64_000_000
    max_images: int = 1  # images per conversation (video frames included) the model's context takes
    image_root: Path | None = None
    default_max_tokens: int = 256
    max_tokens_limit: int | None = None  # a request asking for more gets 400 (None: the context bounds it)
    video_frames: int = DEFAULT_VIDEO_FRAMES  # frames a video_url part is sampled to
    max_video_bytes: int = 64 << 20
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES  # frames a video may have (longer: 400)


@dataclass
class ChatJob:
    prompt_ids: list[int]
    pixels: np.ndarray | None  # [B, 3, S, S]
    config: GenerationConfig
    stream: bool
    include_usage: bool
    logprobs: bool = False


@dataclass
class Conversation:
    turns: list[tuple[str, str | None]]
    system: str | None
    images: list  # image_url values (str) and video frames (serve.video.VideoFrameRef), in prompt order


def check_model(name: str | None, model_name: str, strict: bool) -> None:
    """Lenient by default (like llama-server): any name is served; --strict-model refuses others."""
    if strict and name is not None and name != model_name:
        raise ModelNotFound(f"model {name!r} is not served here; this server serves {model_name!r}",
                            "model", "model_not_found")


def prepare_chat(req: ChatRequest, rt, limits: Limits) -> ChatJob:
    """Check ``req`` against the model and turn it into a ChatJob for ``rt`` (a Runtime)."""
    conv = conversation(req.messages, limits.video_frames)
    config = generation_config(req, limits, rt.tokenizer.vocab_size)
    if len(conv.images) > limits.max_images:
        videos = " (each video_url counts as its --video-frames sampled frames)" \
            if any(not isinstance(m, str) for m in conv.images) else ""
        raise RequestError(f"the conversation has {len(conv.images)} images{videos} but this server takes at "
                           f"most {limits.max_images} (--max-images; the model's context of {rt.backend.n_ctx} "
                           f"positions, {rt.manifest.model.n_visual_tokens} per image)", "messages",
                           "too_many_images")
    ids = rt.chat_ids(conv.turns, conv.system)
    n_visual = len(conv.images) * rt.manifest.model.n_visual_tokens
    fit_max_new_tokens(n_visual, len(ids) - len(conv.images), 1, rt.backend.n_ctx)  # 400 naming both
    pixels = None
    if conv.images:
        pixels = media_pixels(conv.images, rt, limits)  # [B, 3, S, S]; videos sampled to frames
    given = {k: getattr(req, k) for k in NO_EFFECT if getattr(req, k) is not None}
    if given:
        log.info("chat request with %s", given)
    usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatJob(ids, pixels, config, bool(req.stream), usage, bool(req.logprobs))


def conversation(messages: list[Message], video_frames: int = DEFAULT_VIDEO_FRAMES) -> Conversation:
    system, turns, images, question = None, [], [], None
    for i, m in enumerate(messages):
        text, urls = _content(m.content, f"messages[{i}]", video_frames)
        if m.role in ("system", "developer"):
            if urls:
                raise RequestError(f"messages[{i}]: {m.role} messages cannot hold images", f"messages[{i}].content")
            system = text if system is None else f"{system}\n{text}"
        elif m.role != ("user" if question is None else "assistant"):
            raise RequestError(f"messages[{i}]: user and assistant messages must alternate, "
                               "starting with user", "messages")
        elif m.role == "user":
            question = image_question(text, len(urls))  # text holds no <image> (checked)
            images = images + urls
        else:
            if urls:
                raise RequestError(f"messages[{i}]: assistant messages cannot hold images", f"messages[{i}].content")
            turns.append((question, text))
            question = None
    if question is None:
        raise RequestError("the last message must be from the user", "messages")
    return Conversation(turns + [(question, None)], system, images)


def _content(content, where: str, video_frames: int = DEFAULT_VIDEO_FRAMES) -> tuple[str, list]:
    """(text, images) of a message's content: a string or a list of text / image_url / video_url parts;
    a video is ``video_frames`` images (serve.video.VideoFrameRef), in part order with the images."""
    if isinstance(content, str):
        return _text(content, where), []
    texts = [p.text for p in content if p.type == "text"]
    urls: list = []
    for p in content:
        if p.type == "image_url":
            urls.append(p.image_url if isinstance(p.image_url, str) else p.image_url.url)
        elif p.type == "video_url":
            urls += video_refs(p.video_url if isinstance(p.video_url, str) else p.video_url.url, video_frames)
    return _text("\n".join(texts), where), urls


def _text(text: str, where: str) -> str:
    if IMAGE_TOKEN in text:
        raise RequestError(f"{where}: the text contains {IMAGE_TOKEN}; send images as image_url parts",
                           f"{where}.content")
    return text


def generation_config(req: ChatRequest, limits: Limits, vocab_size: int) -> GenerationConfig:
    asked, cap = req.max_tokens or req.max_completion_tokens, limits.max_tokens_limit
    if cap is not None and asked is not None and asked > cap:
        field = "max_tokens" if req.max_tokens else "max_completion_tokens"
        raise RequestError(f"{field} is {asked}, over this server's limit of {cap} (--max-tokens-limit)", field)
    max_tokens = asked or min(limits.default_max_tokens, cap or limits.default_max_tokens)
    temperature = req.temperature or 0.0
    if temperature < MIN_TEMPERATURE:  # the limit of sampling as T -> 0; logits / a subnormal T overflow
        temperature = 0.0
    stop = () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    sampling = dict(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                    top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed or 0,
                    repetition_penalty=req.repetition_penalty or 1.0)
    # the decode side's newer fields are passed only when asked for
    if req.logit_bias:
        sampling["logit_bias"] = _logit_bias(req.logit_bias, vocab_size)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            sampling[name] = getattr(req, name)
    extra = {}
    if req.top_logprobs and not req.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    if req.logprobs:
        extra.update(logprobs=True, top_logprobs=req.top_logprobs or 0)
    constraint = _constraint(req.response_format)
    if constraint is not None:
        extra["constraint"] = constraint
    config = GenerationConfig(max_new_tokens=max_tokens, stop=stop, **extra, **sampling)
    try:
        config.validate()
    except EdgeVLMError as e:  # the runtime's own checks: a 400 naming the field where it can
        field = next((f for f in ("top_p", "top_k", "temperature", "logit_bias", "top_logprobs") if f in str(e)), None)
        raise RequestError(str(e), field) from None
    return config


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise RequestError(f"logit_bias keys must be token ids in 0..{vocab_size - 1} (as strings), got {key!r}",
                               "logit_bias")
        out[int(key)] = float(value)
    return out


def _constraint(fmt):
    """response_format -> the runtime's Constraint (None for text)."""
    if fmt is None or fmt.type == "text":
        return None
    from ..constrain import Constraint
    from ..errors import ConstraintError

    try:
        if fmt.type == "json_object" or fmt.json_schema.json_schema is None:
            return Constraint.json_object()
        return Constraint.json_schema(fmt.json_schema.json_schema, strict=bool(fmt.json_schema.strict))
    except ConstraintError as e:
        raise RequestError(f"response_format: {e}", "response_format", "invalid_schema") from None
