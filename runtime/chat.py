"""Chat templates and prompt tokenisation, defined once and used by training and every runtime.

Training and the on-device runtime both turn a conversation into token ids with ``encode_turns``,
using the same ``tokenizers.Tokenizer`` (the fast tokenizer's backend), so the ids a phone feeds
the decoder are the ids training saw. ``<image>`` in a prompt becomes ``IMAGE_TOKEN_INDEX``; the
model (or backend) replaces that position with the image's visual tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's convention: never a real vocabulary id

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class ChatTemplate:
    """A two-role template. ``plain`` (stage-1 captions) has no system prompt and no roles.

    vicuna_v1 renders: ``{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:``
    plain renders:      ``{q1}{a1}</s>`` where q1 is normally just ``<image>\\n``.
    """

    name: str = "vicuna_v1"
    system: str = VICUNA_SYSTEM
    user: str = "USER"
    assistant: str = "ASSISTANT"
    sep: str = " "

    def prompt_text(self, question: str, first: bool) -> str:
        """The text before an assistant answer (not including the answer)."""
        if self.name == "plain":
            return question
        head = (self.system + self.sep) if (first and self.system) else ""
        return f"{head}{self.user}: {question}{self.sep}{self.assistant}:"

    def render(self, turns: Sequence[tuple[str, str | None]], eos: str = "</s>") -> str:
        """Human-readable rendering (for docs and GGUF chat templates); not used for ids."""
        out = ""
        for i, (q, a) in enumerate(turns):
            out += self.prompt_text(q, i == 0)
            if a is not None:
                out += (" " + a if self.name != "plain" else a) + eos
        return out


TEMPLATES = {
    "vicuna_v1": ChatTemplate(),
    "plain": ChatTemplate(name="plain", system="", user="", assistant="", sep=""),
}


def encode_text(encode: Callable[[str], list[int]], text: str) -> list[int]:
    """Tokenise ``text``, turning each ``<image>`` into IMAGE_TOKEN_INDEX."""
    ids: list[int] = []
    parts = text.split(IMAGE_TOKEN)
    for i, part in enumerate(parts):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        if part:
            ids.extend(encode(part))
    return ids


def encode_turns(
    encode: Callable[[str], list[int]],
    template: ChatTemplate,
    turns: Sequence[tuple[str, str | None]],
    bos_id: int | None,
    eos_id: int,
) -> tuple[list[int], list[bool]]:
    """Token ids for a conversation and, per id, whether it is a training target.

    ``turns`` is [(question, answer-or-None)]; a final ``None`` answer leaves the sequence ready
    for generation. Answers are encoded as `` answer`` followed by EOS and are the only targets.
    ``encode`` must not add special tokens.
    """
    ids: list[int] = [bos_id] if bos_id is not None else []
    target = [False] * len(ids)
    for i, (question, answer) in enumerate(turns):
        p = encode_text(encode, template.prompt_text(question, first=(i == 0)))
        ids += p
        target += [False] * len(p)
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError("only the last turn may leave its answer open")
            break
        a = encode(answer if template.name == "plain" else " " + answer) + [eos_id]
        ids += a
        target += [True] * len(a)
    return ids, target
