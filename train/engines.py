"""How micro-batch gradients become optimizer steps: plain/DDP PyTorch, or DeepSpeed.

The loop calls, per optimizer step: ``zero_grad()``; for each micro-batch
``with engine.accumulating(last): out = engine.module(...); engine.backward(loss)``; then ``step()``.
"""
from __future__ import annotations

import contextlib
import json

import torch

from edgevlm.runtime.errors import EdgeVLMError


class TorchEngine:
    """Single process, or DDP under torchrun (gradient all-reduce only on the last micro-batch)."""

    def __init__(self, model, optimizer, info, grad_accum: int, max_grad_norm: float):
        self.optimizer, self.info = optimizer, info
        self.grad_accum, self.max_grad_norm = grad_accum, max_grad_norm
        self.module = model
        if info.enabled:
            # find_unused_parameters: a micro-batch of text-only samples (LLaVA-Instruct has them)
            # leaves the vision tower and integrator without gradients on that rank
            self.module = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                find_unused_parameters=True)

    def accumulating(self, last: bool):
        return self.module.no_sync() if self.info.enabled and not last else contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()


class DeepSpeedEngine:
    """Multi-GPU training through DeepSpeed (needs CUDA and ``pip install deepspeed``); the user's
    JSON config brings ZeRO stage/offload, the recipe's batch size, accumulation and clipping are
    written into it. Resume restores the trainable weights and the step; DeepSpeed partitions the
    optimizer moments, so they restart (bit-exact resume holds for single-process and DDP runs)."""

    def __init__(self, model, optimizer, config_path: str, stage, world: int):
        try:
            import deepspeed
        except ImportError:
            raise EdgeVLMError("deepspeed is not installed (pip install deepspeed; it needs CUDA)") from None
        try:
            config = json.loads(open(config_path).read())
        except (OSError, json.JSONDecodeError) as e:
            raise EdgeVLMError(f"DeepSpeed config {config_path}: {e}") from None
        config.update(train_micro_batch_size_per_gpu=stage.batch_size, gradient_accumulation_steps=stage.grad_accum,
                      gradient_clipping=stage.max_grad_norm,
                      train_batch_size=stage.batch_size * stage.grad_accum * world)
        self.module, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed tracks accumulation boundaries itself

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes gradients after its optimizer step

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)  # scales by 1/accumulation itself
        self.module.step()  # a micro-step; the optimizer runs on the accumulation boundary

    def step(self) -> None:
        pass


def make_engine(model, optimizer, cfg, stage, info):
    if cfg.deepspeed:
        return DeepSpeedEngine(model, optimizer, cfg.deepspeed, stage, info.world)
    return TorchEngine(model, optimizer, info, stage.grad_accum, stage.max_grad_norm)
