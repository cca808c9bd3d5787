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
itself. ``segment_ids`` marks the segments; ``attention_and_positions`` turns them into the 4-D
mask and position ids the LLM takes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from edgevlm.runtime.chat import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, ChatTemplate, encode_turns

QA_MODES = ("conversation", "independent")


def single_turn(question: str) -> str:
    """The question as the runtime asks it: with the image (the template puts it first)."""
    text = question.replace(IMAGE_TOKEN, "").strip()
    return f"{IMAGE_TOKEN}\n{text}"


def pack_independent(encode: Callable[[str], list[int]], template: ChatTemplate,
                     turns: Sequence[tuple[str, str]], bos_id: int | None, eos_id: int,
                     n_visual: int, max_length: int) -> tuple[list[int], list[bool], list[int]] | None:
    """(ids, is_target, segment_ids) for the packed record, or None if it cannot be packed (one
    turn, or no shared prefix ending at the image). Whole trailing segments that would not fit in
    ``max_length`` spliced positions are dropped."""
    if len(turns) < 2:
        return None
    encoded = [encode_turns(encode, template, [(single_turn(q), a)], bos_id, eos_id) for q, a in turns]
    n = _common_prefix(ids for ids, _ in encoded)
    prefix = encoded[0][0][:n]
    if IMAGE_TOKEN_INDEX not in prefix or any(encoded[0][1][:n]):
        return None
    ids, target, segs = list(prefix), [False] * n, [0] * n
    used = n + n_visual - 1  # spliced length so far
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


def attention_and_positions(segments: list[torch.Tensor], length: int, dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spliced segment ids per sample ([T_i] each; all zeros = an ordinary causal sequence) ->
    (additive mask [B, 1, L, L] in ``dtype``, position ids [B, L]).

    Query q may see key k when k <= q and k is in the prefix (segment 0) or in q's own segment;
    padding rows see only themselves (keeps the softmax finite; their labels are -100)."""
    device = segments[0].device
    b = len(segments)
    allowed = torch.zeros(b, length, length, dtype=torch.bool, device=device)
    positions = torch.zeros(b, length, dtype=torch.long, device=device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # [L, L]
    eye = torch.eye(length, dtype=torch.bool, device=device)
    for i, s in enumerate(segments):
        t = s.shape[0]
        same = (s[:, None] == s[None, :]) | (s[None, :] == 0)  # [T, T]
        allowed[i] = eye
        allowed[i, :t, :t] = same & causal[:t, :t]
        n_prefix = int((s == 0).sum())
        pos = torch.arange(t, device=device)
        for k in s.unique().tolist():
            if k:
                idx = (s == k).nonzero().flatten()
                pos[idx] = n_prefix + torch.arange(idx.numel(), device=device)
        positions[i, :t] = pos
        positions[i, t:] = torch.arange(t, length, device=device)
    mask = torch.zeros(b, 1, length, length, dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return mask, positions
