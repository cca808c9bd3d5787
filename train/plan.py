"""Deterministic data order and learning-rate schedule, both pure functions of the step, so a resumed
run sees exactly the batches and learning rates an uninterrupted run would."""
from __future__ import annotations

import math

import torch


class BatchPlan:
    """Micro-batches of dataset indices: per epoch a seeded permutation, sharded across ranks
    (rank r takes every world-th index), cut into batches. ``batches(start)`` resumes anywhere."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < world:
            raise ValueError(f"dataset of {n} samples is smaller than the {world} ranks")
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = n // world  # drop the tail so every rank runs the same number of steps
        self.per_epoch = math.ceil(self.per_rank / batch_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        return perm[self.rank :: self.world][: self.per_rank]

    def batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        idx = self.epoch_indices(epoch)
        return idx[j * self.bs : (j + 1) * self.bs]

    def batches(self, start: int, stop: int):
        cache_epoch, cache = -1, []
        for k in range(start, stop):
            epoch, j = divmod(k, self.per_epoch)
            if epoch != cache_epoch:
                cache_epoch, cache = epoch, self.epoch_indices(epoch)
            yield cache[j * self.bs : (j + 1) * self.bs]


class PlanSampler(torch.utils.data.Sampler):
    """A batch sampler for DataLoader over micro-batches [start, stop) of a BatchPlan."""

    def __init__(self, plan: BatchPlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        return self.plan.batches(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warm-up then cosine decay to zero (LLaVA/MobileVLM's schedule)."""
    warm = max(1, math.ceil(total * warmup_ratio)) if warmup_ratio > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
