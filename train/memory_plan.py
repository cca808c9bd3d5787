"""Per-GPU memory of a recipe's training stage under each strategy, before anything is allocated.

``edgevlm train --plan RECIPE [--gpus N] [--gpu-mem GB]``. Parameter counts are exact (the recipe's
model built on the meta device); the rest is arithmetic, in GiB per GPU:

- ddp: fp32 parameters (bf16 autocast on CUDA), fp32 gradients and AdamW moments (8 bytes) for every
  trainable parameter, all replicated on every GPU.
- fsdp: the same state sharded over N GPUs, plus what is gathered at a time: the root unit
  (embeddings, LM head, norms) and two blocks (the one computing and the one prefetched) in bf16,
  and the unsharded fp32 gradient of the root and of one block before it is reduce-scattered.
- fsdp + cpu offload: only the gathered working set on the GPU; the sharded state goes to CPU memory
  (the ``cpu_gib`` column, per GPU).
- lora (ddp): the frozen model replicated in fp32, gradients and moments only for the adapters (rank
  ``lora.r`` on ``lora.target_modules``) and the stage's other trained modules.

Activations are what backward keeps, measured per token for one bf16 block with SDPA attention
(``tests/test_fsdp.py`` checks the formulas against a real layer's saved tensors): a LLaMA decoder
layer keeps 24h + 8i + 4·heads bytes, a CLIP block 16h + 6i + 4·heads (its 577 tokens per image,
only when the vision tower trains); the LM head's logits and loss peak at 10 bytes per token and
vocabulary entry. With ``fsdp.activation_checkpointing`` (fsdp rows) a layer keeps only its bf16
input and one layer is recomputed at a time. A configuration fits when its total is at most 90% of
the GPU's memory (CUDA context, allocator fragmentation and temporaries take the rest); a GPU sold as
24/40/80 GB has that many GiB.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from edgevlm.runtime.errors import EdgeVLMError

GIB = 2**30
HEADROOM = 0.9
DEFAULT_GPU_MEM = (24, 40, 80)


@dataclass
class Sizes:
    total: int  # parameters
    trainable: int  # full-training trainable parameters of the stage
    lora_trainable: int  # adapters + non-LLM trained modules, for the LoRA row
    root: int  # parameters outside every FSDP unit
    root_trainable: int
    unit_max: int  # the largest FSDP unit (a decoder layer, usually)


@dataclass
class Row:
    strategy: str
    params: float
    grads: float
    optimizer: float
    activations: float
    cpu: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def model_config(cfg):
    """The VLMConfig of a recipe's start model (a preset or an edgevlm model directory)."""
    from pathlib import Path

    from edgevlm.model import checkpoint
    from edgevlm.model.config import PRESETS, override_config, preset_config

    if cfg.model in PRESETS:
        return preset_config(cfg.model, **cfg.model_overrides)
    path = Path(cfg.model)
    if path.is_dir() and checkpoint.is_edgevlm_dir(path):
        return override_config(checkpoint.read_config(path), **cfg.model_overrides)
    raise EdgeVLMError(f"--plan needs a preset or an edgevlm model dir as the recipe's model, got {cfg.model!r}; "
                       "override it, e.g. model=mobilevlm-1.7b")


def measure_sizes(vlm_cfg, stage) -> Sizes:
    from edgevlm.model.vlm import EdgeVLM
    from edgevlm.train.fsdp import shard_units

    with torch.device("meta"):
        model = EdgeVLM(vlm_cfg)
    n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    trained = set()
    for name in stage.train:
        module = getattr(model, name)
        trained |= {id(p) for p in (module.used_parameters() if hasattr(module, "used_parameters")
                                    else module.parameters())}
    params = list(model.parameters())
    in_units = {id(p) for u in shard_units(model) for p in u.parameters()}
    root = [p for p in params if id(p) not in in_units]
    non_llm = n(p for p in params if id(p) in trained and id(p) not in {id(q) for q in model.llm.parameters()})
    return Sizes(total=n(params), trainable=n(p for p in params if id(p) in trained),
                 lora_trainable=non_llm + lora_parameters(vlm_cfg.llm, stage.lora),
                 root=n(root), root_trainable=n(p for p in root if id(p) in trained),
                 unit_max=max(n(u.parameters()) for u in shard_units(model)))


def lora_parameters(llm, lora) -> int:
    """r x (in + out) per adapted linear layer of every decoder layer."""
    h, i = llm.hidden_size, llm.intermediate_size
    kv = llm.num_key_value_heads * (h // llm.num_attention_heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    per_layer = sum(lora.r * (a + b) for m, (a, b) in shapes.items() if m in lora.target_modules)
    return per_layer * llm.num_hidden_layers


def llama_layer_bytes_per_token(llm) -> int:
    return 24 * llm.hidden_size + 8 * llm.intermediate_size + 4 * llm.num_attention_heads


def clip_block_bytes_per_token(vision) -> int:
    return 16 * vision.hidden_size + 6 * vision.intermediate_size + 4 * vision.num_attention_heads


def activation_bytes(vlm_cfg, stage, checkpointing: bool) -> float:
    """Peak activation memory of one micro-batch (stage.batch_size samples of max_length tokens)."""
    llm, vision = vlm_cfg.llm, vlm_cfg.vision
    tokens = stage.batch_size * stage.max_length
    layer = llama_layer_bytes_per_token(llm)
    if checkpointing:
        acts = tokens * (llm.num_hidden_layers * 2 * llm.hidden_size + layer)
    else:
        acts = tokens * llm.num_hidden_layers * layer
    acts += tokens * 10 * llm.vocab_size
    if "vision_tower" in stage.train:
        layers = vision.num_hidden_layers + 1 + vision.select_layer if vision.select_layer < 0 else vision.select_layer
        per_image = (vision.num_patches + 1) * clip_block_bytes_per_token(vision)
        acts += stage.batch_size * per_image * (1 if checkpointing else layers)
    return acts


def plan_rows(vlm_cfg, stage, gpus: int) -> list[Row]:
    s = measure_sizes(vlm_cfg, stage)
    ckpt = stage.fsdp.activation_checkpointing
    full, ckpt_acts = activation_bytes(vlm_cfg, stage, False), activation_bytes(vlm_cfg, stage, ckpt)
    gathered = 2 * (s.root + 2 * s.unit_max)  # bf16 root + two blocks
    gathered_grads = 4 * (s.root_trainable + s.unit_max)
    g = lambda b: b / GIB  # noqa: E731
    return [
        Row("ddp", g(4 * s.total), g(4 * s.trainable), g(8 * s.trainable), g(full)),
        Row("fsdp", g(4 * s.total / gpus + gathered), g(4 * s.trainable / gpus + gathered_grads),
            g(8 * s.trainable / gpus), g(ckpt_acts)),
        Row("fsdp + cpu offload", g(gathered), g(gathered_grads), 0.0, g(ckpt_acts),
            cpu=g((4 * s.total + 12 * s.trainable) / gpus)),
        Row(f"lora r={stage.lora.r} (ddp)", g(4 * s.total + 4 * s.lora_trainable), g(4 * s.lora_trainable),
            g(8 * s.lora_trainable), g(full)),
    ]


def format_table(rows: list[Row], gpu_mems: list[float]) -> str:
    head = ["strategy", "params", "grads", "optimizer", "activations", "total GiB", "cpu GiB"]
    head += [f"fits {m:g} GB" for m in gpu_mems]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.strategy] + [f"{v:.1f}" for v in (r.params, r.grads, r.optimizer, r.activations, r.total, r.cpu)]
        cells += ["yes" if r.total <= HEADROOM * m else "no" for m in gpu_mems]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_plan(args: argparse.Namespace) -> int:
    from edgevlm.train.recipe import load_recipe

    cfg = load_recipe(args.plan, args.overrides)
    if args.gpus < 1:
        raise EdgeVLMError(f"--gpus {args.gpus}: need at least 1")
    vlm_cfg = model_config(cfg)
    mems = [args.gpu_mem] if args.gpu_mem else list(DEFAULT_GPU_MEM)
    for stage in cfg.stages:
        print(f"stage {stage.name}: model {vlm_cfg.preset or cfg.model}, {args.gpus} GPU(s), micro-batch "
              f"{stage.batch_size} x {stage.max_length} tokens, trains {'+'.join(stage.train) or '-'}"
              f"{', activation checkpointing (fsdp rows)' if stage.fsdp.activation_checkpointing else ''}")
        print(format_table(plan_rows(vlm_cfg, stage, args.gpus), mems))
    return 0
