"""The processor: a question and an image become model inputs, defined once for every caller.

``Processor`` holds the three things that turn user input into what a model takes, the tokenizer,
the chat template and the image preprocessing, so the runtime (``Runtime.processor``), the PyTorch
model (``EdgeVLM.processor``), training data (``train/batches.py``) and exporters all build the same
ids and pixels. Around it, the sequence rules every layer shares:

- the single-turn rule (``image_question``): a question asked about N images holds N ``<image>``, in
  front when the user did not place them (LLaVA's convention; the template then moves them first);
  ``Processor.__call__`` takes one image or a list (a question about several frames);
- each ``<image>`` marker (IMAGE_TOKEN_INDEX in ids) becomes the image's ``n_visual`` positions
  (``spliced_length``, ``expand_at_images``);
- the splice: ids split into text runs and images in prompt order (``split_at_images``), which a
  backend (numpy) or the model (torch embeddings) turns into one embedding sequence.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

import numpy as np

from .chat import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, ChatTemplate, encode_turns, get_template
from .preprocess import DEFAULT_MAX_PIXELS, ImageSource, load_image, preprocess_image
from .preprocess_config import PreprocessConfig
from .tokenizer import TextTokenizer

V = TypeVar("V")


def image_question(question: str, n_images: int = 1) -> str:
    """``question`` asked about ``n_images`` images: unchanged if it places ``<image>`` itself,
    else one ``<image>\\n`` per image in front."""
    return question if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n" * n_images + question


def count_images(ids: Sequence[int]) -> int:
    return sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)


def spliced_length(ids: Sequence[int], n_visual: int) -> int:
    """Positions ``ids`` take once each image marker becomes ``n_visual`` visual tokens."""
    return len(ids) + (n_visual - 1) * count_images(ids)


def split_at_images(ids: Sequence[int]) -> list[list[int] | int]:
    """Text runs (lists of ids) and image indices (0, 1, ...) in prompt order; no empty runs."""
    parts: list[list[int] | int] = []
    run: list[int] = []
    for t in ids:
        if t != IMAGE_TOKEN_INDEX:
            run.append(int(t))
            continue
        if run:
            parts.append(run)
            run = []
        parts.append(sum(1 for p in parts if isinstance(p, int)))
    if run:
        parts.append(run)
    return parts


def expand_at_images(ids: Sequence[int], values: Sequence[V], n_visual: int, fill: V) -> list[V]:
    """A per-id list (labels, segment ids) for the spliced sequence: each image marker's value
    becomes ``n_visual`` copies of ``fill``."""
    out: list[V] = []
    for t, v in zip(ids, values):
        out += [fill] * n_visual if t == IMAGE_TOKEN_INDEX else [v]
    return out


def as_images(image) -> list:
    """The images of a question: none (None, an empty list), one, or a list/tuple of several."""
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def image_pixels(image: ImageSource, preprocess: PreprocessConfig,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image (path, bytes, PIL) through the one decoder and ``preprocess`` -> float32 [1, 3, S, S]."""
    return preprocess_image(load_image(image, max_pixels), preprocess)


@dataclasses.dataclass
class Processor:
    """Tokenizer + chat template + image preprocessing: what a bundle's manifest or a model's
    config names, in one object."""

    tokenizer: TextTokenizer
    template: ChatTemplate
    preprocess: PreprocessConfig

    @classmethod
    def create(cls, tokenizer: TextTokenizer, template: str | ChatTemplate,
               preprocess: PreprocessConfig) -> "Processor":
        """``template``: a ``ChatTemplate`` (a manifest's pieces) or a built-in template's name."""
        return cls(tokenizer, get_template(template) if isinstance(template, str) else template, preprocess)

    def prompt_ids(self, prompt: str, with_image: bool | int) -> list[int]:
        """Ids of a single-turn prompt ready for generation (BOS first; ``<image>`` as -200);
        ``with_image``: True (one image) or a number of images."""
        n = int(with_image)
        return self.chat_ids([(image_question(prompt, n) if n else prompt, None)])

    def chat_ids(self, turns: Sequence[tuple[str, str | None]], system: str | None = None) -> list[int]:
        """Prompt ids of a conversation [(question, answer-or-None)]; ``system`` replaces the
        template's system prompt."""
        return self.training_ids(turns, system)[0]

    def training_ids(self, turns: Sequence[tuple[str, str | None]],
                     system: str | None = None) -> tuple[list[int], list[bool]]:
        """(ids, is_target) of a conversation: answers and their EOS are the targets."""
        template = self.template if system is None else dataclasses.replace(self.template, system=system)
        tok = self.tokenizer
        return encode_turns(tok.encode, template, turns, tok.bos_id, tok.eos_id)

    def pixel_values(self, image: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        return image_pixels(image, self.preprocess, max_pixels)  # [1, 3, S, S]

    def __call__(self, image: ImageSource | Sequence[ImageSource] | None,
                 prompt: str) -> tuple[list[int], np.ndarray | None]:
        """(prompt ids, pixel values or None) for a question about ``image`` (or text only); a list
        or tuple of images is one question about all of them, in order (``<image>`` each)."""
        images = as_images(image)
        if not images:
            return self.prompt_ids(prompt, False), None
        pixels = np.concatenate([self.pixel_values(i) for i in images])  # [B, 3, S, S]
        return self.prompt_ids(prompt, len(images)), pixels
