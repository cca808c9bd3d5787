"""Chat templates and prompt tokenisation, defined once and used by training and every runtime.

Training and the on-device runtime both turn a conversation into token ids with ``encode_turns``,
using the same ``tokenizers.Tokenizer`` (the fast tokenizer's backend), so the ids a phone feeds
the decoder are the ids training saw. ``<image>`` in a prompt becomes ``IMAGE_TOKEN_INDEX``; the
model (or backend) replaces that position with the image's visual tokens.

A template is data: the text pieces around questions and answers, and where a question's image
goes. Wherever ``<image>`` appears in a question, the template puts it first, followed by
``image_sep`` (LLaVA does the same), so data, the runtime and servers only say *that* a question
has an image. The GGUF's Jinja chat template (``export/gguf_llm.py``) is built from the same data, and a
bundle's manifest stores the template's pieces, so a runtime that does not know its name runs it alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import EdgeVLMError

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's convention: never a real vocabulary id

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class ChatTemplate:
    """A two-role template: ``[system system_end] user Q1 user_end assistant answer_prefix A1 EOS
    turn_end user Q2 user_end assistant`` (the system part only when ``system`` is not empty).

    ``llama_cpp`` names the llama.cpp built-in template that renders this one byte for byte (what
    ``llama-mtmd-cli`` uses without ``--jinja``), or is empty when none does.
    """

    name: str
    system: str = ""  # default system prompt; a conversation's own system message replaces it
    system_end: str = ""
    user: str = ""
    user_end: str = ""
    assistant: str = ""  # the generation prompt ends here
    answer_prefix: str = ""
    turn_end: str = ""  # after an answer's EOS
    image_sep: str = "\n"  # between a question's image placeholder(s), always first, and its text
    llama_cpp: str = ""

    def question_text(self, question: str) -> str:
        """``question`` with its ``<image>`` placeholders moved to the front, then ``image_sep``."""
        n = question.count(IMAGE_TOKEN)
        if not n:
            return question
        return IMAGE_TOKEN * n + self.image_sep + question.replace(IMAGE_TOKEN, "").strip()

    def prompt_text(self, question: str, first: bool) -> str:
        """The text before an assistant answer (not including the answer)."""
        if first:
            head = self.system + self.system_end if self.system else ""
        else:
            head = self.turn_end
        return f"{head}{self.user}{self.question_text(question)}{self.user_end}{self.assistant}"

    def render(self, turns: Sequence[tuple[str, str | None]], eos: str = "</s>") -> str:
        """Human-readable rendering (for docs and GGUF chat templates); not used for ids. Equals
        the GGUF's Jinja template with ``add_generation_prompt`` when the last answer is None."""
        out = ""
        for i, (q, a) in enumerate(turns):
            out += self.prompt_text(q, i == 0)
            if a is not None:
                out += self.answer_prefix + a + eos
        return out + (self.turn_end if turns and turns[-1][1] is not None else "")


TEMPLATES = {
    # LLaVA's conv_vicuna_v1 (MobileVLM's checkpoints): {system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ...
    "vicuna_v1": ChatTemplate(name="vicuna_v1", system=VICUNA_SYSTEM, system_end=" ", user="USER: ",
                              user_end=" ", assistant="ASSISTANT:", answer_prefix=" "),
    # llama.cpp's built-in "vicuna" (src/llama-chat.cpp) with the image where llama-mtmd-cli and
    # llama-server put it (its marker right before the question): USER: <image>{q}\nASSISTANT: {a}</s>\n
    # The default for models trained here, so llama.cpp's tools run their bundles with no flags.
    "llamacpp_vicuna": ChatTemplate(name="llamacpp_vicuna", system_end="\n\n", user="USER: ", user_end="\n",
                                    assistant="ASSISTANT:", answer_prefix=" ", turn_end="\n", image_sep="",
                                    llama_cpp="vicuna"),
    # stage-1 captions: no roles, the question is normally just <image>\n
    "plain": ChatTemplate(name="plain"),
}
DEFAULT_TEMPLATE = "llamacpp_vicuna"


def get_template(name: str) -> ChatTemplate:
    """The built-in template ``name``; EdgeVLMError listing the valid names for any other. (A bundle
    stores its template's pieces, so reading one never needs this table.)"""
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise EdgeVLMError(f"unknown chat template {name!r}; valid: {', '.join(TEMPLATES)}") from None


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
    for generation. Answers are encoded as ``answer_prefix + answer`` followed by EOS and are the
    only targets. ``encode`` must not add special tokens. Text between images and special tokens
    is encoded piece by piece, as llama.cpp's mtmd tokenises the text around its media markers.
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
        a = encode(template.answer_prefix + answer) + [eos_id]
        ids += a
        target += [True] * len(a)
    return ids, target
