"""Model configuration: nested dataclasses with YAML/JSON in and out, and the preset table."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from edgevlm.runtime.chat import DEFAULT_TEMPLATE
from edgevlm.runtime.configio import apply_overrides, from_dict, to_dict
from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.preprocess_config import PreprocessConfig
from edgevlm.runtime.tokenizer import TokenConfig  # the model's tokens and a manifest's: one type


MODULES = ("vision_tower", "integrator", "llm")  # top-level EdgeVLM modules (state-dict prefixes)


@dataclass
class VisionConfig:
    """A CLIP ViT (Hugging Face ``CLIPVisionModel``). Features are ``hidden_states[select_layer]``."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    select_layer: int = -2
    select_feature: str = "patch"  # patch: drop CLS | cls_patch: keep it
    name_or_path: str = ""  # informational (e.g. openai/clip-vit-large-patch14-336)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_features(self) -> int:
        """Tokens the tower hands the integrator."""
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)


@dataclass
class IntegratorConfig:
    name: str = "ldp"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LLMConfig:
    """A LLaMA-architecture decoder (Hugging Face ``LlamaForCausalLM``)."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    integrator: IntegratorConfig = field(default_factory=IntegratorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    chat_template: str = DEFAULT_TEMPLATE  # runtime/chat.py TEMPLATES; official checkpoints: vicuna_v1
    preset: str = ""
    seed: int = 0

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VLMConfig":
        return from_dict(cls, data)


_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   name_or_path="openai/clip-vit-large-patch14-336")
_MOBILELLAMA_1_4B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
_MOBILELLAMA_2_7B = dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)

# Presets are data. tiny keeps a 24x24 patch grid (336 px, patch 14) because llama.cpp's LDP graphs
# hard-code it; everything else is shrunk so it trains on 2 CPU cores in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    name_or_path="edgevlm-tiny-vit"),
        integrator=dict(name="ldpv2"),
        llm=dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    ),
    "mobilevlm-1.7b": dict(vision=_CLIP_L_336, integrator=dict(name="ldp"), llm=_MOBILELLAMA_1_4B),
    "mobilevlm-3b": dict(vision=_CLIP_L_336, integrator=dict(name="ldp"), llm=_MOBILELLAMA_2_7B),
    "mobilevlm-v2-1.7b": dict(vision=_CLIP_L_336, integrator=dict(name="ldpv2"), llm=_MOBILELLAMA_1_4B),
}


def preset_config(name: str, **overrides: Any) -> VLMConfig:
    """The config of a preset, with keyword overrides.

    ``integrator="ldp"`` sets the integrator name; ``integrator_kwargs={...}`` its kwargs; other keys
    are dotted config paths with ``__`` or ``.`` (``llm__num_hidden_layers=2``).
    """
    if name not in PRESETS:
        raise EdgeVLMError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    data = copy.deepcopy(PRESETS[name])
    cfg = from_dict(VLMConfig, {**data, "preset": name})
    return override_config(cfg, **overrides)


def override_config(cfg: VLMConfig, **overrides: Any) -> VLMConfig:
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "integrator" and isinstance(value, str):
            flat["integrator.name"] = value
        elif key == "integrator_kwargs":
            flat["integrator.kwargs"] = dict(value)
        else:
            flat[key.replace("__", ".")] = value
    return apply_overrides(cfg, flat) if flat else cfg
