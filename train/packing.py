"""Independent-QA packing: several single-turn questions about one image in one sequence.

A multi-turn ShapesVQA record asks 5-8 questions about one image. Trained as a conversation, a
later answer can often be read off an earlier turn ("What colour is the circle? red" ... "Is there
a red circle?"), a text shortcut the model cannot use at test time, where every question comes
alone. Packing keeps the efficiency of the conversation (the image is encoded once, its tokens
appear once) but removes the shortcut:

    [BOS system USER: <image>] [\\nQ1 ASSISTANT: A1</s>] [\\nQ2 ASSISTANT: A2</s>] ...
     segment 0 (shared prefix)   segment 1                segment 2

Every segment k >= 1 is exactly the token sequence of the single-turn prompt the runtime builds
for question k (its positions restart after the prefix), and attends only to the prefix and to
itself. ``segment_ids`` marks the segments; the model's ``attention_and_positions``
(``model/segments.py``) turns them into the 4-D mask and position ids the LLM takes.
"""
from __future__ import annotations

from typing import Sequence

from edgevlm.runtime.processor import Processor, count_images, image_question, spliced_length

QA_MODES = ("conversation", "independent")


def pack_independent(processor: Processor, turns: Sequence[tuple[str, str]], n_visual: int,
                     max_length: int) -> tuple[list[int], list[bool], list[int]] | None:
    """(ids, is_target, segment_ids) for the packed record, or None if it cannot be packed (one
    turn, or no shared prefix ending at the image). Each question is asked as the runtime asks
    it (``image_question``). Whole trailing segments that would not fit in ``max_length``
    spliced positions are dropped."""
    if len(turns) < 2:
        return None
    encoded = [processor.training_ids([(image_question(q), a)]) for q, a in turns]
    n = _common_prefix(ids for ids, _ in encoded)
    prefix = encoded[0][0][:n]
    if count_images(prefix) != 1 or any(encoded[0][1][:n]):
        return None
    ids, target, segs = list(prefix), [False] * n, [0] * n
    used = spliced_length(prefix, n_visual)
    for k, (e_ids, e_target) in enumerate(encoded, start=1):
        tail = e_ids[n:]
        if used + len(tail) > max_length:
            break
        ids += tail
        target += e_target[n:]
        segs += [k] * len(tail)
        used += len(tail)
    return ids, target, segs


def _common_prefix(seqs) -> int:
    seqs = list(seqs)
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n
