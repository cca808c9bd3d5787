"""CLIP vision tower: Hugging Face ``CLIPVisionModel``, features taken MobileVLM's way."""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from edgevlm.model.config import VisionConfig


def clip_config(cfg: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps, num_channels=3,
    )


class VisionTower(nn.Module):
    """Wraps ``CLIPVisionModel`` as ``self.vision_tower`` (MobileVLM's attribute name, so official
    ``model.vision_tower.vision_tower.*`` keys load as they are).

    ``forward`` equals ``hidden_states[select_layer]`` of the full model (CLS dropped for
    ``select_feature='patch'``) but runs only the blocks that feed the selected layer, the way
    llama.cpp's CLIP graph does; ``layers_used`` says how many.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = CLIPVisionModel(clip_config(cfg))
        n = cfg.num_hidden_layers
        sel = cfg.select_layer
        self.layers_used = sel if sel >= 0 else n + 1 + sel  # hidden_states has n + 1 entries
        if not 0 <= self.layers_used <= n:
            raise ValueError(f"vision select_layer {sel} out of range for {n} layers")

    def used_parameters(self) -> list[nn.Parameter]:
        """Parameters that feed the selected layer (the later blocks and post-LN never get gradients)."""
        vm = self.vision_tower.vision_model
        mods = [vm.embeddings, vm.pre_layrnorm, *vm.encoder.layers[: self.layers_used]]
        return [p for m in mods for p in m.parameters()]

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, Dv]
        vm = self.vision_tower.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(self.dtype)))  # [B, 1 + N, Dv]
        for layer in vm.encoder.layers[: self.layers_used]:
            h = layer(h, None, None)[0]  # (hidden_states, attention_mask, causal_attention_mask)
        return h[:, 1:] if self.cfg.select_feature == "patch" else h

