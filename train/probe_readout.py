"""Attention-readout probe: can a small model answer "what shape is the <colour> object?" from a
model's frozen visual tokens?

The linear probe in ``probe.py`` reads one token under a shape's centre. The LLM has more to go
on: it can attend over every visual token, find the ones of the asked colour and read their edges.
This probe gives a small model the same job without the LLM's other burdens: a colour query
token plus the integrator's tokens (standardised, projected to ``width``, learned positions) go
through a ``layers``-deep pre-norm Transformer encoder, and the query's output is classified into
the shape kinds. Questions are the shapes whose colour is unique in their scene; train and test
questions come from disjoint images (``held_out_split`` over images). The per-epoch held-out
accuracy shows how much data such a readout needs, and its plateau how much the tokens carry.
"""
from __future__ import annotations

import numpy as np

WIDTH, LAYERS, HEADS, BATCH, LR = 128, 2, 4, 64, 1e-3


def binding_questions(scenes) -> np.ndarray:
    """[n, 3] int64 rows (scene index, colour index, kind index), one per shape whose colour no other
    shape in its scene has (so "the <colour> object" names it)."""
    from edgevlm.train.data.shapes_questions import COLOURS, KINDS

    rows = []
    for i, scene in enumerate(scenes):
        colours = [s.colour for s in scene.shapes]
        rows += [(i, COLOURS.index(s.colour), KINDS.index(s.kind))
                 for s in scene.shapes if colours.count(s.colour) == 1]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _readout_model(n_tokens: int, dim: int, n_queries: int, n_classes: int):
    import torch
    from torch import nn

    class Readout(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(dim, WIDTH)
            self.query = nn.Embedding(n_queries, WIDTH)
            self.pos = nn.Parameter(torch.randn(n_tokens + 1, WIDTH) * 0.02)
            layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
            self.head = nn.Linear(WIDTH, n_classes)

        def forward(self, tokens, queries):  # [B, M, D], [B] -> [B, n_classes]
            x = torch.cat([self.query(queries)[:, None], self.inp(tokens)], 1) + self.pos
            return self.head(self.encoder(x)[:, 0])

    return Readout()


def readout_probe(tokens: np.ndarray, questions: np.ndarray, n_queries: int, n_classes: int,
                  epochs: int, seed: int) -> dict:
    """Train the readout on ``questions`` (rows of ``binding_questions``) over ``tokens``
    [n_scenes, M, D]; return held-out accuracy after each epoch and the majority baseline."""
    import torch

    from edgevlm.runtime.errors import EdgeVLMError
    from edgevlm.train.probe import held_out_split

    train_idx, _ = held_out_split(len(tokens), seed)
    in_train = np.isin(questions[:, 0], train_idx)
    train_q, test_q = torch.from_numpy(questions[in_train]), torch.from_numpy(questions[~in_train])
    if len(train_q) == 0 or len(test_q) == 0:
        raise EdgeVLMError("readout probe: too few scenes for a train/held-out split; raise --images")
    x = torch.from_numpy(tokens).float()
    x = (x - x[train_idx].mean((0, 1))) / (x[train_idx].std((0, 1)) + 1e-5)
    torch.manual_seed(seed)
    model = _readout_model(x.shape[1], x.shape[2], n_queries, n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(epochs):
        model.train()
        for batch in train_q[torch.randperm(len(train_q), generator=gen)].split(BATCH):
            loss = torch.nn.functional.cross_entropy(model(x[batch[:, 0]], batch[:, 1]), batch[:, 2])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x[b[:, 0]], b[:, 1]).argmax(1) for b in test_q.split(256)])
        curve.append(round(float((pred == test_q[:, 2]).float().mean()), 4))
    counts = np.bincount(test_q[:, 2].numpy(), minlength=n_classes)
    return {"n_train_questions": int(len(train_q)), "n_test_questions": int(len(test_q)),
            "accuracy_per_epoch": curve, "accuracy": curve[-1] if curve else None,
            "majority": float(counts.max() / counts.sum())}


def readout(tokens: np.ndarray, scenes, epochs: int, seed: int) -> dict:
    """The readout probe on ``tokens`` [n_scenes, M, D] (a model's integrator output for ``scenes``)."""
    from edgevlm.runtime.errors import EdgeVLMError
    from edgevlm.train.data.shapes_questions import COLOURS, KINDS

    if tokens.shape[1] == 0:
        raise EdgeVLMError("the integrator hands the LLM no visual tokens; the readout probe has nothing to read")
    return readout_probe(tokens, binding_questions(scenes), len(COLOURS), len(KINDS), epochs, seed)
