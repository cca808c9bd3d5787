"""Which parameters a stage trains: full modules and/or LoRA/DoRA adapters on the LLM (peft)."""
from __future__ import annotations

from torch import nn

from edgevlm.train.recipe import StageConfig


def apply_lora(model, stage: StageConfig) -> None:
    """Wrap ``model.llm`` with peft LoRA (or DoRA) adapters in place."""
    from peft import LoraConfig, get_peft_model

    lc = stage.lora
    cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, use_dora=lc.dora,
                     target_modules=list(lc.target_modules), bias="none")
    model.llm = get_peft_model(model.llm, cfg)


def merge_lora(model) -> None:
    """Fold adapters into the base weights (exportable plain LlamaForCausalLM again)."""
    from peft import PeftModel

    if isinstance(model.llm, PeftModel):
        model.llm = model.llm.merge_and_unload()


def set_trainable(model, stage: StageConfig) -> list[tuple[str, list[nn.Parameter]]]:
    """Freeze everything, then unfreeze the stage's modules. Returns (group, params) pairs."""
    for p in model.parameters():
        p.requires_grad_(False)
    groups: list[tuple[str, list[nn.Parameter]]] = []
    for name in stage.train:
        module = getattr(model, name)
        params = module.used_parameters() if hasattr(module, "used_parameters") else list(module.parameters())
        for p in params:
            p.requires_grad_(True)
        groups.append((name, params))
    if stage.lora.enabled:
        apply_lora(model, stage)  # peft marks only adapter weights trainable inside model.llm
        groups.append(("lora", [p for p in model.llm.parameters() if p.requires_grad]))
    return groups


def group_lr(name: str, stage: StageConfig) -> float:
    if name == "integrator" and stage.lr_integrator > 0:
        return stage.lr_integrator
    if name == "vision_tower" and stage.lr_vision > 0:
        return stage.lr_vision
    return stage.lr
