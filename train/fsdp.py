"""FSDP2 training (``torch.distributed.fsdp.fully_shard``): parameters, gradients and AdamW state
sharded across ranks, per-parameter (DTensor), on GPUs (NCCL) or CPU processes (gloo).

Sharding units, innermost first: each LLM decoder layer, each vision-tower block, the integrator
(token integrators; in-LLM ones stay with the root because the LLM's hooks read their weights), then
the root (embeddings, LM head, norms, the vision embeddings). Frozen weights are sharded too and get
no optimizer state; LoRA/DoRA adapters (peft) are sharded with the layer they sit in. On CUDA with
bf16 precision the gathered parameters are bf16 and gradients are reduced in fp32; CPU runs in fp32.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.model.integrators.base import placement
from edgevlm.model.load import build_model
from edgevlm.train.lora import apply_lora, merge_lora
from edgevlm.train.sharded_ckpt import load_sharded, save_sharded


def decoder_layers(model) -> list[torch.nn.Module]:
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm  # peft or plain
    return list(llm.model.layers)


def vision_blocks(model) -> list[torch.nn.Module]:
    return list(model.vision_tower.vision_tower.vision_model.encoder.layers)


def shard_units(model) -> list[torch.nn.Module]:
    """The modules wrapped before the root, in order."""
    units = decoder_layers(model) + vision_blocks(model)
    if placement(model.integrator) == "tokens":
        units.append(model.integrator)
    return units


def enable_activation_checkpointing(model) -> None:
    """Recompute every decoder layer and vision block in backward (Hugging Face's per-layer
    checkpointing; non-reentrant, which works with FSDP2's hooks)."""
    kwargs = {"use_reentrant": False}
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.vision_tower.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def shard(model, opts, device: torch.device, bf16: bool) -> None:
    """``fully_shard`` every unit, then the root, in place (parameters become DTensors)."""
    kw = {"reshard_after_forward": opts.reshard_after_forward}
    if bf16 and device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if opts.cpu_offload:
        if device.type != "cuda":  # PyTorch's offload policy copies shards to and from an accelerator
            raise EdgeVLMError("fsdp.cpu_offload needs CUDA GPUs; a CPU run keeps everything in CPU memory "
                               "already (drop fsdp.cpu_offload)")
        kw["offload_policy"] = CPUOffloadPolicy()
    if opts.activation_checkpointing:
        enable_activation_checkpointing(model)
    for unit in shard_units(model):
        fully_shard(unit, **kw)
    fully_shard(model, **kw)


class FsdpEngine:
    """The loop's engine for ``strategy: fsdp`` (see ``train/engines.py`` for the protocol)."""

    def __init__(self, model, names, stage, cfg, info, make_optimizer):
        self.info, self.stage = info, stage
        self.model_cfg, self.tokenizer_dir = model.cfg, model.tokenizer_dir
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda")
        shard(model, stage.fsdp, info.device, bf16)
        self.module = self.model = model
        self.optimizer = make_optimizer(model, names, stage)  # after sharding: over the DTensor parameters

    def accumulating(self, last: bool):
        @contextlib.contextmanager
        def sync():
            self.model.set_requires_gradient_sync(last)  # reduce-scatter only on the last micro-batch
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        return sync()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.stage.grad_accum).backward()

    def step(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.stage.max_grad_norm)  # DTensor grads: one global norm
        self.optimizer.step()

    def save_checkpoint(self, ckpt_root: Path, step: int) -> None:
        save_sharded(ckpt_root, step, self.model, self.optimizer, self.info)

    def load_checkpoint(self, path: Path) -> int:
        return load_sharded(path, self.model, self.optimizer, self.info)

    def final_model(self):
        """Collective. Rank 0: the consolidated plain model (adapters merged, frozen, CPU); other
        ranks: None (they read what rank 0 saves)."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        model = build_model(self.model_cfg, self.tokenizer_dir)
        if self.stage.lora.enabled:
            apply_lora(model, self.stage)
        model.load_state_dict(full, strict=True)
        merge_lora(model)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()
