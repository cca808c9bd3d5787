"""Training recipes: a run is a start model plus one or more stages (YAML under train/configs/).

Paradigms from the survey are recipes, not code paths:
- single-stage: one stage (e.g. integrator only on captions),
- two-stage: ``pretrain`` (captions, integrator) then ``instruct`` (QA, integrator + LLM, full/LoRA/DoRA),
- direct adaptation: one instruction stage on the multi-task QA mix, no pretraining.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgevlm.runtime.chat import TEMPLATES
from edgevlm.runtime.configio import apply_overrides, load_yaml
from edgevlm.runtime.errors import EdgeVLMError

from edgevlm.model.config import MODULES


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    dora: bool = False
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class FsdpConfig:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) options of a stage with ``strategy: fsdp``."""

    cpu_offload: bool = False  # sharded parameters, gradients and optimizer state live in CPU memory
    activation_checkpointing: bool = False  # recompute each LLM/vision block in backward
    reshard_after_forward: bool = True  # False: keep gathered blocks until backward (ZeRO-2-like)


STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")


@dataclass
class StageConfig:
    name: str = "instruct"
    data: str = ""  # LLaVA-format JSON
    image_root: str = ""  # default: the JSON's folder
    # runtime/chat.py TEMPLATES: "" = the model's chat template; plain for caption pretraining. A chat
    # stage makes its template the model's (what the runtime and exported bundles then use)
    template: str = ""
    # multi-turn records: "conversation" (as written) or "independent" (each question packed as a
    # single-turn sample sharing the image; no answer can be read off an earlier turn)
    qa_mode: str = "conversation"
    train: list[str] = field(default_factory=lambda: ["integrator", "llm"])  # fully trained modules
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA/DoRA on the LLM (instead of "llm")
    lr: float = 2e-5
    lr_integrator: float = 0.0  # 0: same as lr (MobileVLM: 1e-3 for the projector)
    lr_vision: float = 0.0  # 0: same as lr
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0  # >0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    max_length: int = 512  # tokens after splicing; longer samples are truncated
    max_grad_norm: float = 1.0
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    log_every: int = 10
    skip_bad_records: bool = False
    max_records: int = 0  # >0: use only the first N records (smoke runs)
    # how ranks share the work: auto (DDP under torchrun, DeepSpeed when the recipe names a config),
    # ddp (every rank holds the whole model), fsdp (parameters, gradients and optimizer state sharded
    # across ranks; train/fsdp.py), deepspeed (untested: needs CUDA)
    strategy: str = "auto"
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)


@dataclass
class TrainConfig:
    model: str = "tiny"  # start point: preset, edgevlm dir, or official MobileVLM dir
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {integrator: ldp}
    # modules initialised fresh instead of loaded from `model` (a checkpoint): [integrator] trains a
    # new integrator between a trained vision tower and LLM (MobileVLM's starting point)
    fresh: list[str] = field(default_factory=list)
    output_dir: str = "runs/tiny"
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    deepspeed: str = ""  # path to a DeepSpeed JSON config (multi-GPU; untested, see docs/training.md)
    threads: int = 0  # torch CPU threads (0: torch default)


def stage_strategy(stage: StageConfig, cfg: TrainConfig) -> str:
    """The stage's resolved strategy: ddp (plain PyTorch when single-process), fsdp or deepspeed."""
    if stage.strategy == "auto":
        return "deepspeed" if cfg.deepspeed else "ddp"
    return stage.strategy


def load_recipe(path: str, overrides: list[str] | None = None) -> TrainConfig:
    cfg = load_yaml(TrainConfig, path)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if not cfg.stages:
        raise EdgeVLMError("recipe has no stages")
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise EdgeVLMError(f"stage names must be unique, got {names}")
    for s in cfg.stages:
        bad = [m for m in s.train if m not in MODULES]
        if bad:
            raise EdgeVLMError(f"stage {s.name}: unknown module(s) {bad} in 'train'; valid: {', '.join(MODULES)}")
        if s.lora.enabled and "llm" in s.train:
            raise EdgeVLMError(f"stage {s.name}: choose full LLM training ('llm' in train) or LoRA, not both")
        if not s.data:
            raise EdgeVLMError(f"stage {s.name}: no 'data' (a LLaVA-format JSON file)")
        if s.template and s.template not in TEMPLATES:
            raise EdgeVLMError(f"stage {s.name}: template {s.template!r}; valid: {', '.join(TEMPLATES)}")
        if s.qa_mode not in ("conversation", "independent"):
            raise EdgeVLMError(f"stage {s.name}: qa_mode {s.qa_mode!r}; use conversation or independent")
        if s.strategy not in STRATEGIES:
            raise EdgeVLMError(f"stage {s.name}: strategy {s.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if s.strategy == "deepspeed" and not cfg.deepspeed:
            raise EdgeVLMError(f"stage {s.name}: strategy deepspeed needs the recipe's deepspeed=CONFIG.json")
    bad = [m for m in cfg.fresh if m not in MODULES]
    if bad:
        raise EdgeVLMError(f"fresh: unknown module(s) {bad}; valid: {', '.join(MODULES)}")
    if cfg.deepspeed and any(s.strategy not in ("auto", "deepspeed") for s in cfg.stages):
        raise EdgeVLMError("deepspeed=CONFIG applies to every stage; drop it or the stages' strategy")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise EdgeVLMError(f"precision {cfg.precision!r}: use auto, fp32 or bf16")
