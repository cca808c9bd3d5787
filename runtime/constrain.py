"""Constrained decoding: a JSON schema, "any JSON object", a regex or a choice from a list, compiled by
llguidance into a token mask that the one generation loop (runtime.generate) applies to the logits
of every step, on every backend.

    c = Constraint.json_schema({"type": "object", "properties": {...}})   # ConstraintError if bad
    state = c.start(tokenizer)       # per run: a copy of the compiled matcher
    x = state.mask(logits)           # disallowed tokens -> -inf; EOS allowed iff the grammar is complete
    state.advance(token)             # after the token is chosen
    state.done                       # nothing but EOS can follow
    state.budget_token(left), state.fits(token, left)   # close the answer within the tokens left

Budget: a closing plan (runtime.closing) is searched once the tokens left come within
``CLOSE_MARGIN`` of the last plan's need; the loop then forces the plan when the tokens left equal its
length plus EOS, and ``fits`` refuses a free token after which the answer could not be finished.

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

from .closing import JSON_START, Planner, json_scan, rebase
from .errors import ConstraintError, EdgeVLMError
from .tokenizer import TextTokenizer

KINDS = ("json_schema", "json_object", "regex", "choices")
MATCHER_CACHE_SIZE = 64  # compiled matchers kept per tokenizer (LRU)
CLOSE_MARGIN = 8  # closing plans are searched once the budget left is within this many tokens of the last one
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
        eng = _engine(tokenizer)
        return ConstraintState(eng.matcher(self), tokenizer.eos_id, eng.planner(self.kind in ("json_schema", "json_object")))

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
        self.vocab_size, self.eos_id = tokenizer.vocab_size, tokenizer.eos_id
        self.lltok = llg.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=self.vocab_size,
                                     eos_token=tokenizer.eos_id)
        self.matchers: OrderedDict[Constraint, object] = OrderedDict()
        self.lock = threading.Lock()
        self.compiles = 0  # how many matchers were built (the cache test reads it)
        self.planners: dict[bool, Planner] = {}

    def planner(self, json_kind: bool) -> Planner:
        with self.lock:
            p = self.planners.get(json_kind)
        if p is None:
            p = Planner(self.token_bytes, self.vocab_size, self.eos_id, json_kind)
            with self.lock:
                p = self.planners.setdefault(json_kind, p)
        return p

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
    """One run's matcher: ``mask`` the logits, ``advance`` with the chosen token; ``budget_token`` and
    ``fits`` keep the answer closable within the tokens left (runtime.closing)."""

    def __init__(self, matcher, eos_id: int, planner: Planner | None = None):
        self.matcher = matcher
        self.eos_id = eos_id
        self.bitmask: np.ndarray | None = None
        self.planner = planner
        self.scan = JSON_START  # open JSON brackets/strings of the text so far (the planner's ranking)
        self.plan: list[int] | None = None  # a closing plan from the current state (None: not known)
        self.need: int | None = None  # tokens the last known plan needed, its EOS included
        self._next: tuple[int, list[int]] | None = None  # (token, plan after it) from ``fits``

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

    def select(self, logits: np.ndarray, pick, left: int) -> tuple[np.ndarray, int]:
        """Mask ``logits``, apply the budget rule for ``left`` tokens, ``pick`` a token; returns the
        logits picked from (the logprobs are theirs) and the token."""
        x = self.mask(logits)
        forced = self.budget_token(left)
        if forced is not None:
            x = _only(x, forced)
            return x, pick(x)
        token = pick(x)
        if not self.fits(token, left):
            x = _only(x, self.fallback())  # the free pick would leave too few tokens to finish
            token = pick(x)
        return x, token

    def _in_zone(self, left: int) -> bool:
        return self.planner is not None and (self.need is None or left <= self.need + CLOSE_MARGIN)

    def _current_plan(self) -> list[int] | None:
        if self.plan is None:
            self.plan = self.planner.plan(self.matcher, self.scan)
            self.need = len(self.plan) + 1 if self.plan is not None else (self.need or 1)
        return self.plan

    def budget_token(self, left: int) -> int | None:
        """The token the budget forces now (``left``: tokens the run may still select, this one
        included): the closing plan's next token, or EOS once complete, when the plan and its EOS
        need all that is left. None: a free choice."""
        if not self._in_zone(left):
            return None
        plan = self._current_plan()
        if plan is None or left > len(plan) + 1:
            return None
        return plan[0] if plan else self.eos_id

    def fits(self, token: int, left: int) -> bool:
        """Whether, after ``token``, the answer can still be completed in the ``left - 1`` tokens after
        it (always True outside the closing zone, where no plan is searched)."""
        if not self._in_zone(left) or token == self.eos_id or self.plan is None:
            return True
        if self.plan and token == self.plan[0]:
            return True  # the rest of the plan fits: budget_token forced nothing
        probe = self.matcher.deep_copy()
        if not probe.consume_token(int(token)):
            return True  # not the budget's business: ``advance`` reports the refused token
        after = self.planner.plan(probe, self._scan_after(token))
        if after is None or len(after) + 1 > left - 1:
            return False
        self._next = (int(token), after)
        return True

    def fallback(self) -> int:
        """The token to take instead of one that ``fits`` refused."""
        return self.plan[0] if self.plan else self.eos_id

    def _scan_after(self, token: int):
        if not self.planner.json:
            return self.scan
        return rebase(json_scan(self.scan, self.planner.token_bytes(token)))  # outside text: the planner's own

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise ConstraintViolation(f"the grammar refused token {token}: {self.matcher.get_error()}")
        if self.planner is None:
            return
        self.scan = self._scan_after(token)
        if self._next is not None and self._next[0] == token:
            self.plan = self._next[1]
        elif self.plan and self.plan[0] == token:
            self.plan = self.plan[1:]
        else:
            self.plan = None
        self._next = None
        if self.plan is not None:
            self.need = len(self.plan) + 1

    @property
    def done(self) -> bool:
        """The grammar is complete and accepts nothing more: only EOS may follow."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()


def _only(x: np.ndarray, token: int) -> np.ndarray:
    """``x`` with every logit but ``token``'s set to -inf (the budget's choice, still under the mask)."""
    out = np.full_like(x, -np.inf)
    out[token] = x[token]
    return out
