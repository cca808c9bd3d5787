"""The one generation loop every backend shares: vision, prefill, token-by-token decode, stop rules,
streaming and timings.

Context policy: the prompt (visual + text tokens) must leave room for at least one new token, else
``ContextLengthError`` naming both numbers; when it fits but ``prompt + max_new_tokens`` does not,
``max_new_tokens`` is clamped to what fits and a run that reaches it ends with ``"length"``.

``token_ids`` are all selected tokens (the final EOS or the token that completed a stop string
included); ``text`` is their decoded text without special tokens, cut before a stop string.
Stop strings: runtime.stopstrings. Timings exclude the time a streaming consumer spends between pieces.

Caches (``runtime.cache``, passed by ``Runtime``): an ``ImageCache`` skips the vision encoder for
an image seen before; a ``PrefixCache`` lets a backend with ``supports_prefix`` keep the KV cache
of the positions the new sequence shares with the previous one and prefill only the rest.
``GenerationResult.cache`` reports both. ``Stream.cancel()`` (from any thread) ends a streaming
run before its next decode step, with ``finish_reason`` ``"cancelled"``.

Constrained decoding (``GenerationConfig.constraint``, runtime.constrain): each step's logits are
adjusted (penalties, ``logit_bias``), masked to the tokens the grammar allows, then sampled. EOS is
allowed only where the grammar is complete; once nothing but EOS can follow, the run ends at once
with that EOS (no decode step for it), ``finish_reason`` ``"eos"``, even with ``ignore_eos``.
Budget: once the tokens left (``max_new_tokens`` clamped to the context) are only just enough for the
shortest closing found from the grammar's state (runtime.closing) plus its EOS, the loop takes that
closing's tokens (and refuses a free pick that would leave too few), so the answer completes and ends
with ``"eos"``. Only when the budget cannot hold any complete answer does a run end with ``"length"``
and incomplete text.
Stop strings still cut the text. ``logprobs``: runtime.logprobs.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Generator, Hashable, Iterator, Sequence

import numpy as np

from .backends.base import Backend
from .cache import CacheReport, Caches, ImageCache, PrefixCache, image_key, position_keys, prefill
from .chat import IMAGE_TOKEN_INDEX
from .constrain import Constraint, ConstraintState
from .errors import ContextLengthError, EdgeVLMError
from .logprobs import LogprobRecorder, TokenLogprob, check_top_logprobs
from .processor import count_images, split_at_images
from .sampling import Sampler, SamplingConfig
from .stopstrings import TextState, held_back_length  # noqa: F401  (held_back_length: re-exported)
from .tokenizer import TextTokenizer


@dataclass(init=False)
class GenerationConfig:
    """How many tokens, how to pick them (``sampling``) and when to stop. The sampling fields may
    also be given flat: ``GenerationConfig(max_new_tokens=8, do_sample=True, seed=1)``."""

    max_new_tokens: int = 32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # for benchmarks: always generate max_new_tokens (not under a constraint)
    constraint: Constraint | None = None  # runtime.constrain: JSON schema, JSON object, regex, choices
    logprobs: bool = False  # GenerationResult.logprobs / Stream.take_logprobs
    top_logprobs: int = 0  # 0..20 most likely alternatives per token (needs logprobs)

    def __init__(self, max_new_tokens: int = 32, sampling: SamplingConfig | None = None,
                 stop: str | Sequence[str] = (), ignore_eos: bool = False, constraint: Constraint | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, **sampling_fields):
        if sampling is not None and sampling_fields:
            raise TypeError(f"GenerationConfig: pass sampling= or {', '.join(sampling_fields)}, not both")
        self.max_new_tokens, self.ignore_eos = max_new_tokens, ignore_eos
        self.constraint, self.logprobs, self.top_logprobs = constraint, logprobs, top_logprobs
        self.sampling = SamplingConfig(**sampling_fields) if sampling is None else sampling
        self.stop = (stop,) if isinstance(stop, str) else tuple(stop)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise EdgeVLMError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise EdgeVLMError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise EdgeVLMError(f"constraint must be a runtime.constrain.Constraint, got {type(self.constraint).__name__}")
        check_top_logprobs(self.logprobs, self.top_logprobs)
        self.sampling.validate()


@dataclass
class Timings:
    vision_ms: float = 0.0  # backend.encode_image
    prefill_ms: float = 0.0  # backend.prefill
    ttft_ms: float = 0.0  # start of the call -> first token selected (vision + prefill + sampling)
    decode_tok_s: float | None = None  # (n_generated - 1) / decode time; None when n_generated < 2
    n_visual_tokens: int = 0
    n_prompt_tokens: int = 0  # text tokens of the prompt (IMAGE_TOKEN_INDEX markers not counted)
    n_generated: int = 0
    total_ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated only
    timings: Timings = field(default_factory=Timings)
    finish_reason: str = "length"  # "eos" | "stop" | "length" | "cancelled" (Stream.cancel)
    cache: CacheReport = field(default_factory=CacheReport)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry when requested


def generate(
    backend: Backend,
    tokenizer: TextTokenizer,
    prompt_ids: Sequence[int],
    pixel_values: np.ndarray | None,
    config: GenerationConfig | None = None,
    caches: Caches | None = None,
) -> GenerationResult:
    """Run the loop to the end and return text, ids, timings and why it stopped."""
    config = config or GenerationConfig()
    gen = _run(backend, tokenizer, list(prompt_ids), pixel_values, config, False, caches or Caches(), None, [])
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


class Stream(Iterator[str]):
    """Iterator over text pieces; ``result`` holds the GenerationResult once it is exhausted."""

    def __init__(self, gen: Generator[str, None, GenerationResult], cancelled: threading.Event,
                 logprobs: list[TokenLogprob] | None = None):
        self._gen = gen
        self._cancelled = cancelled
        self._logprobs = [] if logprobs is None else logprobs
        self._taken = 0
        self.result: GenerationResult | None = None

    def take_logprobs(self) -> list[TokenLogprob]:
        """Logprob entries of the tokens chosen since the previous call (empty unless requested)."""
        out = self._logprobs[self._taken:]
        self._taken += len(out)
        return out

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        if self.result is not None:
            raise StopIteration
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.result = stop.value
            raise

    def close(self) -> None:
        self._gen.close()

    def cancel(self) -> None:
        """Ask the run to stop before its next decode step (safe from another thread)."""
        self._cancelled.set()


def stream(
    backend: Backend,
    tokenizer: TextTokenizer,
    prompt_ids: Sequence[int],
    pixel_values: np.ndarray | None,
    config: GenerationConfig | None = None,
    caches: Caches | None = None,
) -> Stream:
    """Like ``generate`` but yields text pieces as they are complete; their concatenation is
    ``result.text``. Text that could be the start of a stop string is held back until resolved."""
    config = config or GenerationConfig()
    prompt_ids = list(prompt_ids)
    _check_inputs(prompt_ids, pixel_values, config)  # fail at the call, not at the first next()
    cancelled, entries = threading.Event(), []
    gen = _run(backend, tokenizer, prompt_ids, pixel_values, config, True, caches or Caches(), cancelled, entries)
    return Stream(gen, cancelled, entries)


# --- inputs -------------------------------------------------------------------------------------


def _check_inputs(prompt_ids: list[int], pixel_values: np.ndarray | None, config: GenerationConfig) -> int:
    """Validate config, ids and image count; return the number of images."""
    config.validate()
    n_markers = count_images(prompt_ids)
    if any(t < 0 and t != IMAGE_TOKEN_INDEX for t in prompt_ids):
        raise EdgeVLMError("prompt_ids contain negative ids other than the image marker (-200)")
    n_images = 0
    if pixel_values is not None:
        if pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape)
            raise EdgeVLMError(f"pixel_values must be [B, 3, H, W], got shape {shape}")
        n_images = int(pixel_values.shape[0])
    if n_markers != n_images:
        raise EdgeVLMError(
            f"the prompt has {n_markers} image marker(s) (<image>) but {n_images} image(s) "
            "were given; put one <image> in the prompt per image"
        )
    if not prompt_ids:
        raise EdgeVLMError("the prompt is empty")
    return n_images


def fit_max_new_tokens(n_visual: int, n_text: int, max_new_tokens: int, n_ctx: int) -> int:
    """``max_new_tokens`` clamped to the context; ContextLengthError if the prompt leaves no
    room for even one new token."""
    n_in = n_visual + n_text
    if n_in >= n_ctx:
        raise ContextLengthError(
            f"the prompt is {n_in} tokens ({n_visual} visual + {n_text} text) but the model's "
            f"context is {n_ctx} positions, leaving no room to generate; shorten the prompt"
        )
    return min(max_new_tokens, n_ctx - n_in)


def split_segments(prompt_ids: Sequence[int], visual: np.ndarray | None) -> list[np.ndarray]:
    """Token-id segments (int64 [T]) and visual segments (float32 [M, D]) in prompt order."""
    return [np.ascontiguousarray(visual[p], dtype=np.float32) if isinstance(p, int)  # [M, D]
            else np.asarray(p, dtype=np.int64) for p in split_at_images(prompt_ids)]


def _run_encoder(backend: Backend, pixel_values: np.ndarray, timings: Timings) -> np.ndarray:
    t = time.perf_counter()
    visual = backend.encode_image(np.ascontiguousarray(pixel_values, dtype=np.float32))
    timings.vision_ms = (time.perf_counter() - t) * 1e3
    if visual.ndim != 3 or visual.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"{backend.name}.encode_image returned shape {visual.shape}, expected [B, M, D]"
        )
    return visual  # [B, M, D]


def _encode_images(
    backend: Backend, pixel_values: np.ndarray, keys: list[str] | None, cache: ImageCache | None,
    timings: Timings, report: CacheReport,
) -> np.ndarray:
    """Visual tokens [B, M, D]: cached images from ``cache``, the others through the encoder."""
    if cache is None or keys is None or not backend.cacheable_images:
        report.images_encoded = int(pixel_values.shape[0])
        return _run_encoder(backend, pixel_values, timings)
    return cache.lookup(keys, pixel_values, lambda px: _run_encoder(backend, px, timings), report)


def _prepare(
    backend: Backend,
    prompt_ids: list[int],
    pixel_values: np.ndarray | None,
    config: GenerationConfig,
    caches: Caches,
    tm: Timings,
    report: CacheReport,
) -> tuple[list[np.ndarray], int, list[Hashable] | None]:
    """Checks, vision encoder and context guard; returns (prefill segments, max new tokens,
    position keys for the prefix cache or None)."""
    n_images = _check_inputs(prompt_ids, pixel_values, config)
    tm.n_prompt_tokens = len(prompt_ids) - n_images
    fit_max_new_tokens(0, tm.n_prompt_tokens, 1, backend.n_ctx)  # text alone: fail before vision
    hashed = n_images and (caches.images is not None or caches.prefix is not None)
    image_keys = [image_key(p) for p in pixel_values] if hashed else []
    visual = None
    if n_images:
        visual = _encode_images(backend, pixel_values, image_keys or None, caches.images, tm, report)
    tm.n_visual_tokens = 0 if visual is None else int(visual.shape[0] * visual.shape[1])
    max_new = fit_max_new_tokens(
        tm.n_visual_tokens, tm.n_prompt_tokens, config.max_new_tokens, backend.n_ctx
    )
    keys = None
    if caches.prefix is not None and backend.supports_prefix:
        per_image = 0 if visual is None else int(visual.shape[1])
        keys = position_keys(prompt_ids, image_keys, per_image)
    return split_segments(prompt_ids, visual), max_new, keys


# --- the loop -----------------------------------------------------------------------------------


def _run(
    backend: Backend,
    tokenizer: TextTokenizer,
    prompt_ids: list[int],
    pixel_values: np.ndarray | None,
    config: GenerationConfig,
    streaming: bool,
    caches: Caches,
    cancelled: threading.Event | None,
    entries: list[TokenLogprob],
) -> Generator[str, None, GenerationResult]:
    t0 = time.perf_counter()
    tm, report = Timings(), CacheReport()
    segments, max_new, keys = _prepare(backend, prompt_ids, pixel_values, config, caches, tm, report)
    prefix = caches.prefix if keys is not None else None
    try:
        t = time.perf_counter()
        logits = prefill(backend, segments, keys, prefix, report)
        tm.prefill_ms = (time.perf_counter() - t) * 1e3
        state = TextState(tokenizer, config.stop) if (streaming or config.stop) else None
        guide = config.constraint.start(tokenizer) if config.constraint is not None else None
        recorder = LogprobRecorder(tokenizer, config.top_logprobs, entries) if config.logprobs else None
        loop = _decode(backend, tokenizer, logits, prompt_ids, config, max_new, state, streaming,
                       prefix, cancelled, guide, recorder)
        generated, finish, t_first, paused = yield from loop
    except Exception:
        if prefix is not None:
            prefix.invalidate()  # the backend's KV cache may hold anything now
        raise
    tm.ttft_ms = (t_first - t0) * 1e3
    t_end = time.perf_counter()

    if state is None:
        text = tokenizer.decode(generated[:-1] if finish == "eos" else generated)
    else:
        tail, stopped = state.finish() if finish != "stop" else ("", False)
        finish = "stop" if stopped else finish
        if tail and streaming:
            yield tail
        text = state.text
    tm.n_generated = len(generated)
    if len(generated) > 1:
        tm.decode_tok_s = (len(generated) - 1) / max(t_end - t_first - paused, 1e-9)
    tm.total_ms = (t_end - t0 - paused) * 1e3
    return GenerationResult(text=text, token_ids=generated, timings=tm, finish_reason=finish,
                            cache=report, logprobs=entries if config.logprobs else None)


def _decode(
    backend: Backend,
    tokenizer: TextTokenizer,
    logits: np.ndarray,
    prompt_ids: list[int],
    config: GenerationConfig,
    max_new: int,
    state: TextState | None,
    streaming: bool,
    prefix: PrefixCache | None,
    cancelled: threading.Event | None,
    guide: ConstraintState | None,
    recorder: LogprobRecorder | None,
) -> Generator[str, None, tuple[list[int], str, float, float]]:
    """Adjust, mask, sample, stop rules, decode steps; returns (generated ids, finish reason, time
    of the first token, seconds spent paused at yields)."""
    sampler = Sampler(config.sampling)
    context = [i for i in prompt_ids if i >= 0]  # for the repetition penalty
    generated: list[int] = []
    finish, paused, t_first = "length", 0.0, 0.0
    for step in range(max_new):
        x = sampler.adjust(logits, context, generated)
        x, token = (x, sampler.pick(x)) if guide is None else guide.select(x, sampler.pick, max_new - step)
        if recorder is not None:
            recorder.record(x, token)
        generated.append(token)
        context.append(token)
        if step == 0:
            t_first = time.perf_counter()
        if token == tokenizer.eos_id and (guide is not None or not config.ignore_eos):
            finish = "eos"
            break
        if guide is not None:
            guide.advance(token)
        if state is not None:
            piece, stopped = state.push(token)
            if piece and streaming:
                t_yield = time.perf_counter()
                yield piece
                paused += time.perf_counter() - t_yield
            if stopped:
                finish = "stop"
                break
        if guide is not None and guide.done and step + 1 < max_new:
            generated.append(tokenizer.eos_id)  # the only token the grammar allows: no decode step
            if recorder is not None:
                recorder.record_forced(tokenizer.eos_id)
            finish = "eos"
            break
        if step + 1 < max_new:
            if cancelled is not None and cancelled.is_set():
                finish = "cancelled"
                break
            logits = backend.decode(token)
            if prefix is not None:
                prefix.keys.append(token)  # the KV cache now holds this token too
    return generated, finish, t_first, paused

