"""Constrained decoding: a JSON schema, "any JSON object", a regex or a choice from a list, compiled by
llguidance into a token mask that the one generation loop (runtime.generate) applies to the logits
of every step, on every backend.

    c = Constraint.json_schema({"type": "object", "properties": {...}})   # ConstraintError if bad
    state = c.start(tokenizer)       # per run: a copy of the compiled matcher
    x = state.mask(logits)           # disallowed tokens -> -inf; EOS allowed iff the grammar is complete
    state.advance(token)             # after the token is chosen
    state.done                       # nothing but EOS can follow

Compiling: the grammar text is built and checked once per constraint (``ConstraintError`` names the
problem); the matcher is built once per (constraint, tokenizer) and kept in a bounded LRU; each run
takes a cheap ``deep_copy``. The llguidance view of a tokenizer (one per ``TextTokenizer``: ~1 s for
Llama's 32k vocabulary, ~8 s for the 1.7B preset's 1k-token vocabulary padded with 31k added tokens,
on the 2-core VM) is built on first use (or ``prepare``) and kept while the tokenizer lives.

JSON layout: no free whitespace; items are separated by ", " and keys by ": " (``json.dumps``'s
default layout), so a small or random model cannot wander off into endless blank lines.
Why llguidance (and not xgrammar or outlines-core): docs/structured-output.md.
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from .errors import ConstraintError, EdgeVLMError
from .tokenizer import TextTokenizer

KINDS = ("json_schema", "json_object", "regex", "choices")
MATCHER_CACHE_SIZE = 64  # compiled matchers kept per tokenizer (LRU)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintViolation(RuntimeError):
    """The grammar refused a token the loop chose: the mask was not applied (a bug, never user input)."""


def _llg():
    try:
        import llguidance
    except ImportError:
        raise EdgeVLMError("constrained decoding and logprobs need llguidance: pip install llguidance "
                           "(it comes with edgevlm's [ort], [llamacpp], [trt] and [serve] extras)") from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What the output must match. Build with the constructors; equal constraints share one compile."""

    kind: str
    source: str  # canonical text: the schema as JSON (its key order kept), the regex, or the options as a JSON list
    strict: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r}; one of {', '.join(KINDS)}")
        grammar(self)  # compile now: a bad schema or regex fails here, not at the first decode step

    @classmethod
    def json_schema(cls, schema: dict | str, strict: bool = True) -> "Constraint":
        """Output is JSON valid under ``schema``. ``strict``: a keyword llguidance cannot enforce is an
        error (False: such keywords are ignored, so the output may not satisfy them)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema), bool(strict))  # key order kept: it is the output's order

    @classmethod
    def json_object(cls) -> "Constraint":
        """Output is one JSON object (any keys and values)."""
        return cls("json_object", '{"type": "object"}')

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        """Output fully matches ``pattern`` (Rust ``regex`` syntax, no look-around or back-references)."""
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError("a regex constraint needs a non-empty pattern string")
        return cls("regex", pattern)

    @classmethod
    def choices(cls, options: Sequence[str]) -> "Constraint":
        """Output is exactly one of ``options``."""
        opts = [options] if isinstance(options, str) else list(options)
        if not opts or any(not isinstance(o, str) or not o for o in opts):
            raise ConstraintError(f"choices must be a non-empty list of non-empty strings, got {options!r}")
        return cls("choices", json.dumps(opts))

    def start(self, tokenizer: TextTokenizer) -> "ConstraintState":
        """A fresh matcher for one run (compiled once per tokenizer, then copied)."""
        return ConstraintState(_engine(tokenizer).matcher(self), tokenizer.eos_id)

    def describe(self) -> str:
        return f"{self.kind} {self.source if len(self.source) < 60 else self.source[:57] + '...'}"


def constraint_from(json_schema: dict | str | None = None, json_object: bool = False, regex: str | None = None,
                    choices: Sequence[str] | None = None, strict: bool = True,
                    constraint: Constraint | None = None) -> Constraint | None:
    """The one Constraint named by ``Runtime.generate``'s keyword arguments (None: unconstrained)."""
    given = {k: v for k, v in dict(json_schema=json_schema, json_object=json_object or None, regex=regex,
                                   choices=choices, constraint=constraint).items() if v is not None}
    if len(given) > 1:
        raise ConstraintError(f"pass at most one of json_schema, json_object, regex, choices, constraint "
                              f"(got {', '.join(given)})")
    if constraint is not None:
        return constraint
    if json_schema is not None:
        return Constraint.json_schema(json_schema, strict)
    if json_object:
        return Constraint.json_object()
    if regex is not None:
        return Constraint.regex(regex)
    return Constraint.choices(choices) if choices is not None else None


@lru_cache(maxsize=256)
def grammar(c: Constraint) -> str:
    """The llguidance grammar of ``c``, checked (``ConstraintError`` with llguidance's message)."""
    llg = _llg()
    M = llg.LLMatcher
    try:
        if c.kind in ("json_schema", "json_object"):
            options = dict(JSON_LAYOUT, lenient=not c.strict)
            text = M.grammar_from_json_schema(c.source, overrides=options)
        elif c.kind == "regex":
            text = M.grammar_from_regex(c.source)
        else:
            text = M.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in json.loads(c.source)))
    except ValueError as e:
        raise ConstraintError(f"bad {c.kind} constraint: {e}") from None
    is_error, messages = M.validate_grammar_with_warnings(text)
    if is_error or (c.strict and messages):
        what = "; ".join(messages) or "rejected by the grammar engine"
        hint = " (pass strict=False to ignore keywords it cannot enforce)" if not is_error else ""
        raise ConstraintError(f"bad {c.kind} constraint: {what}{hint}")
    return text


class _Engine:
    """llguidance's view of one tokenizer, and an LRU of matchers compiled for it."""

    def __init__(self, tokenizer: TextTokenizer):
        llg = _llg()
        self.vocab_size = tokenizer.vocab_size
        self.lltok = llg.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=self.vocab_size,
                                     eos_token=tokenizer.eos_id)
        self.matchers: OrderedDict[Constraint, object] = OrderedDict()
        self.lock = threading.Lock()
        self.compiles = 0  # how many matchers were built (the cache test reads it)

    def matcher(self, c: Constraint):
        with self.lock:
            m = self.matchers.get(c)
            if m is not None:
                self.matchers.move_to_end(c)
                return m.deep_copy()
        m = _llg().LLMatcher(self.lltok, grammar(c), log_level=0)
        if m.is_error():
            raise ConstraintError(f"bad {c.kind} constraint: {m.get_error()}")
        with self.lock:
            self.compiles += 1
            self.matchers[c] = m
            while len(self.matchers) > MATCHER_CACHE_SIZE:
                self.matchers.popitem(last=False)
        return m.deep_copy()

    def token_bytes(self, token_id: int) -> bytes:
        return self.lltok.decode_bytes([int(token_id)])


_ENGINES: "weakref.WeakKeyDictionary[TextTokenizer, _Engine]" = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def _engine(tokenizer: TextTokenizer) -> _Engine:
    with _ENGINES_LOCK:
        eng = _ENGINES.get(tokenizer)
    if eng is None:
        eng = _Engine(tokenizer)  # slow for large vocabularies: outside the lock
        with _ENGINES_LOCK:
            eng = _ENGINES.setdefault(tokenizer, eng)
    return eng


def prepare(tokenizer: TextTokenizer) -> None:
    """Build llguidance's view of ``tokenizer`` now (a server can do this at load, not on the first
    constrained or logprobs request)."""
    _engine(tokenizer)


def token_bytes(tokenizer: TextTokenizer, token_id: int) -> bytes:
    """The bytes token ``token_id`` stands for (byte-fallback and "▁" resolved; specials as their text)."""
    return _engine(tokenizer).token_bytes(token_id)


def compiled_count(tokenizer: TextTokenizer) -> int:
    """How many matchers were compiled for ``tokenizer`` so far (for the cache test and benchmark)."""
    return _engine(tokenizer).compiles


def allowed_tokens(bitmask: np.ndarray, n_logits: int) -> np.ndarray:
    """Boolean [n_logits] from an llguidance int32 bitmask (ids past the mask's end: disallowed)."""
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little").view(bool)
    out = np.zeros(n_logits, dtype=bool)
    n = min(n_logits, bits.size)
    out[:n] = bits[:n]
    return out


class ConstraintState:
    """One run's matcher: ``mask`` the logits, ``advance`` with the chosen token."""

    def __init__(self, matcher, eos_id: int):
        self.matcher = matcher
        self.eos_id = eos_id
        self.bitmask: np.ndarray | None = None

    def allowed(self, n_logits: int) -> np.ndarray:
        """Boolean [n_logits]: the tokens the grammar allows next (EOS only once it is complete)."""
        if self.bitmask is None:
            self.bitmask = np.zeros((n_logits + 31) // 32, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar engine failed: {self.matcher.get_error()}")
        return allowed_tokens(self.bitmask, n_logits)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar does not allow set to -inf (a new array)."""
        return np.where(self.allowed(logits.shape[-1]), logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise ConstraintViolation(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and accepts nothing more: only EOS may follow."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()
