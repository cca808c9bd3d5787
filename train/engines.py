"""How micro-batch gradients become optimizer steps: plain/DDP PyTorch, FSDP2 (``train/fsdp.py``) or
DeepSpeed (untested: it needs CUDA).

Every engine builds the optimizer over the stage's trainable parameters (after wrapping: FSDP replaces
them) and owns checkpoint I/O. The loop calls, per optimizer step: ``zero_grad()``; for each
micro-batch ``with engine.accumulating(last): out = engine.module(...); engine.backward(loss)``; then
``step()``; ``save_checkpoint``/``load_checkpoint`` at checkpoints and resume; ``final_model()``
at the end of the stage (the plain model, adapters merged; None on ranks that do not hold it).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.train import distributed
from edgevlm.train.lora import group_lr, merge_lora
from edgevlm.train.recipe import stage_strategy
from edgevlm.train.state import load_checkpoint, save_checkpoint


def make_optimizer(model, names: list[tuple[str, list[str]]], stage) -> torch.optim.Optimizer:
    """AdamW with one parameter group per (group name, parameter names) of ``set_trainable``."""
    params = dict(model.named_parameters())
    optim = torch.optim.AdamW([{"params": [params[n] for n in ns], "lr": group_lr(g, stage), "name": g}
                               for g, ns in names if ns], weight_decay=stage.weight_decay)
    check_optimizer_covers_trainable(model, optim)
    return optim


def check_optimizer_covers_trainable(model, optim) -> None:
    """Exactly the trainable parameters get optimizer state: no frozen one, none left out."""
    in_optim = {id(p) for g in optim.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optim == trainable, f"optimizer holds {len(in_optim)} tensors, {len(trainable)} are trainable"


class _RankZeroCheckpoints:
    """Whole-model engines: rank 0 writes ``train/state.py`` checkpoints, every rank reads them."""

    def save_checkpoint(self, ckpt_root: Path, step: int) -> None:
        if self.info.is_main:
            save_checkpoint(ckpt_root, step, self.model, self.optimizer)
        distributed.barrier(self.info)

    def load_checkpoint(self, path: Path) -> int:
        return load_checkpoint(path, self.model, self.optimizer)

    def final_model(self):
        merge_lora(self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model.cpu().eval()


class TorchEngine(_RankZeroCheckpoints):
    """Single process, or DDP under torchrun (gradient all-reduce only on the last micro-batch)."""

    def __init__(self, model, names, stage, info):
        self.optimizer, self.info, self.model = make_optimizer(model, names, stage), info, model
        self.grad_accum, self.max_grad_norm = stage.grad_accum, stage.max_grad_norm
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


class DeepSpeedEngine(_RankZeroCheckpoints):
    """Multi-GPU training through DeepSpeed (needs CUDA and ``pip install deepspeed``); the user's
    JSON config brings ZeRO stage/offload, the recipe's batch size, accumulation and clipping are
    written into it. Resume restores the trainable weights and the step; DeepSpeed partitions the
    optimizer moments, so they restart (bit-exact resume holds for single-process and DDP runs)."""

    def __init__(self, model, names, stage, info, config_path: str):
        self.info, self.model = info, model
        self.optimizer = make_optimizer(model, names, stage)  # the loop sets its learning rates
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
                      train_batch_size=stage.batch_size * stage.grad_accum * info.world)
        self.module, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed tracks accumulation boundaries itself

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes gradients after its optimizer step

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)  # scales by 1/accumulation itself
        self.module.step()  # a micro-step; the optimizer runs on the accumulation boundary

    def step(self) -> None:
        pass


def make_engine(model, names: list[tuple[str, list[str]]], cfg, stage, info):
    """``names``: (group, trainable parameter names) pairs; the model already on its device."""
    strategy = stage_strategy(stage, cfg)
    if strategy == "deepspeed":
        return DeepSpeedEngine(model, names, stage, info, cfg.deepspeed)
    if strategy == "fsdp":
        from edgevlm.train.fsdp import FsdpEngine

        return FsdpEngine(model, names, stage, cfg, info, make_optimizer)
    return TorchEngine(model, names, stage, info)
