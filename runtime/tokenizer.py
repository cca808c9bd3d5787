"""Text tokenizer for the runtime: a ``tokenizers.Tokenizer`` plus its special token ids; no
transformers.

``TextTokenizer.from_dir`` reads a Hugging Face tokenizer folder (``tokenizer.json`` and, when
present, ``tokenizer_config.json`` / ``special_tokens_map.json`` for the bos/eos/unk/pad tokens).
``IncrementalDetokenizer`` turns a growing list of generated ids into text pieces for streaming.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer

from .chat import IMAGE_TOKEN
from .errors import BundleError, EdgeVLMError

# The files of a Hugging Face tokenizer folder that travel with a model dir and every bundle
# (``tokenizer.json`` is what the runtime reads; the rest keeps the folder loadable by transformers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
_SPECIAL_NAMES = ("bos", "eos", "unk", "pad")
_REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _token_text(value: object) -> str | None:
    """A special token entry: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: cannot read JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _special_tokens_from_dir(folder: Path) -> dict[str, str]:
    """{"bos": "<s>", ...} from special_tokens_map.json, overridden by tokenizer_config.json."""
    found: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / fname
        if not path.is_file():
            continue
        data = _read_json(path)
        for name in _SPECIAL_NAMES:
            text = _token_text(data.get(f"{name}_token"))
            if text is not None:
                found[name] = text
    return found


@dataclass
class TokenConfig:
    """The special token ids a model is trained and prompted with: the model config's ``tokens`` and a
    bundle manifest's ``tokens`` are this one dataclass."""

    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    pad_id: int = 0  # LLaVA pads with unk
    image_token: str = IMAGE_TOKEN


def copy_tokenizer_files(src: str | os.PathLike, dest: Path) -> list[str]:
    """Copy the ``TOKENIZER_FILES`` present in ``src`` into ``dest``; returns the names copied."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dest) / name)
            copied.append(name)
    return copied


class TextTokenizer:
    """Encode/decode text with special token ids known. ``encode`` never adds special tokens."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_id: int | None,
        eos_id: int,
        unk_id: int | None = None,
        pad_id: int | None = None,
    ):
        if eos_id is None:
            raise EdgeVLMError("the tokenizer has no EOS token; pass eos_id explicitly")
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = int(eos_id)
        self.unk_id = unk_id
        self.pad_id = pad_id
        self._byte_ids: frozenset[int] | None = None

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Tokenizer, bos_id: int | None, eos_id: int, **ids: int | None
    ) -> "TextTokenizer":
        return cls(tokenizer, bos_id, eos_id, **ids)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **overrides: int | None) -> "TextTokenizer":
        """Load ``tokenizer.json`` from ``path``; ``overrides`` (bos_id=..., eos_id=...) win over
        the ids named in the folder's JSON files."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise BundleError(
                f"{folder}: no tokenizer.json (expected a Hugging Face tokenizer folder)"
            )
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust library raises a plain Exception on bad files
            raise BundleError(f"{tok_file}: cannot load tokenizer ({e})") from None
        ids: dict[str, int | None] = {}
        for name, text in _special_tokens_from_dir(folder).items():
            tid = tokenizer.token_to_id(text)
            if tid is None and name in ("bos", "eos"):
                raise BundleError(
                    f"{folder}: {name} token {text!r} is not in tokenizer.json's vocabulary"
                )
            ids[f"{name}_id"] = tid
        ids.update(overrides)
        return cls(
            tokenizer,
            bos_id=ids.get("bos_id"),
            eos_id=ids.get("eos_id"),  # type: ignore[arg-type]
            unk_id=ids.get("unk_id"),
            pad_id=ids.get("pad_id"),
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of byte-fallback tokens (``<0x00>`` .. ``<0xFF>``), for the streaming detokenizer."""
        if self._byte_ids is None:
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            self._byte_ids = frozenset(i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t))
        return self._byte_ids

    def detokenizer(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Feed generated ids one at a time; get back only the newly completed text.

    Each step decodes the whole list and returns what lies beyond the text already emitted, so
    the pieces concatenate to ``decode(all_ids)``. Two kinds of text are held back until they
    are final: a trailing U+FFFD (an incomplete UTF-8 sequence from byte-level tokens), and
    the text of a trailing run of byte-fallback tokens (``<0xNN>``), which SentencePiece-style
    decoders turn into U+FFFD *as a group* if the run proves invalid UTF-8. Should a decoder
    still rewrite text already emitted, the pieces go on from the same character position, so
    their concatenation (``emitted``) stays well-formed and differs only in those characters.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""  # text handed out so far
        self.stable = ""  # text that later tokens will not change (emitted is a prefix of it)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append id(s); return the newly completed text (may be empty)."""
        self.update(token_ids)
        return self.take(len(self.stable))

    def update(self, token_ids: int | Iterable[int]) -> None:
        """Append id(s) and refresh ``stable`` without emitting anything."""
        if isinstance(token_ids, int):
            self.ids.append(token_ids)
        else:
            self.ids.extend(token_ids)
        if self.ids and self.ids[-1] in self._tok.byte_token_ids:
            return  # an open byte run: its text may still change
        self.stable = self._align(self._tok.decode(self.ids).rstrip(_REPLACEMENT))

    def _align(self, text: str) -> str:
        """``text`` continued from the end of ``emitted`` (identical when prefix-consistent)."""
        if text.startswith(self.emitted):
            return text
        return self.emitted + text[len(self.emitted) :]

    def take(self, upto: int) -> str:
        """Emit stable text up to character ``upto`` (callers may hold some back: stop strings)."""
        upto = min(upto, len(self.stable))
        if upto <= len(self.emitted):
            return ""
        piece = self.stable[len(self.emitted) : upto]
        self.emitted += piece
        return piece

    def finalize(self) -> None:
        """No more ids will come: make all text stable (held-back text included), emit nothing."""
        self.stable = self._align(self._tok.decode(self.ids))

    def flush(self) -> str:
        """Everything not yet emitted, including held-back text."""
        self.finalize()
        return self.take(len(self.stable))
