"""Official MobileVLM / MobileVLM V2 (LLaVA-layout) checkpoint directories.

Keys: ``model.mm_projector.*`` -> ``integrator.*``, ``model.vision_tower.vision_tower.*`` ->
``vision_tower.vision_tower.*``, ``model.*`` -> ``llm.model.*``, ``lm_head.*`` -> ``llm.lm_head.*``.
V1 checkpoints carry no vision weights: they name the tower in ``mm_vision_tower``, which must then be
a local CLIP directory (nothing is downloaded).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.preprocess_config import MOBILEVLM_PAD, PreprocessConfig
from edgevlm.model.config import IntegratorConfig, LLMConfig, TokenConfig, VisionConfig, VLMConfig
from edgevlm.model.weights import read_weights

PROJECTOR_TYPES = {"ldpnet": "ldp", "ldpnetv2": "ldpv2", "mlp2x_gelu": "mlp2x_gelu", "linear": "linear"}
VISION_PREFIX = "model.vision_tower.vision_tower."
PROJ_PREFIX = "model.mm_projector."


def is_official_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and "mm_projector_type" in json.loads(cfg.read_text())


def official_config(path: Path, hf: dict, state: dict[str, torch.Tensor]) -> VLMConfig:
    ptype = hf["mm_projector_type"]
    if ptype not in PROJECTOR_TYPES:
        raise EdgeVLMError(f"{path}: mm_projector_type {ptype!r} is not supported; "
                           f"supported: {', '.join(sorted(PROJECTOR_TYPES))}")
    llm = LLMConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(hf.get("rope_theta", 10000.0)),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )
    vision = _vision_config(path, hf, state)
    pad = hf.get("image_aspect_ratio", "pad") == "pad"
    return VLMConfig(
        vision=vision, integrator=IntegratorConfig(PROJECTOR_TYPES[ptype]), llm=llm,
        preprocess=PreprocessConfig(image_size=vision.image_size, pad_to_square=pad, pad_color=MOBILEVLM_PAD),
        tokens=TokenConfig(bos_id=hf.get("bos_token_id", 1), eos_id=hf.get("eos_token_id", 2),
                           pad_id=hf.get("pad_token_id") or 0),
        chat_template="vicuna_v1", preset=f"official:{path.name}",
    )


CLIP_L_SHAPES = dict(hidden_size=1024, intermediate_size=4096, patch_size=14)  # 16 heads of 64, quick_gelu


def _vision_config(path: Path, hf: dict, state: dict[str, torch.Tensor]) -> VisionConfig:
    """The tower's config stated by the local CLIP dir that ``mm_vision_tower`` names; without one,
    V2 checkpoints (tower weights inside) are accepted when their shapes are CLIP ViT-L/14's, since
    head count, activation and epsilon cannot be read from tensor shapes."""
    select = dict(select_layer=hf.get("mm_vision_select_layer", -2),
                  select_feature=hf.get("mm_vision_select_feature", "patch"),
                  name_or_path=hf.get("mm_vision_tower", ""))
    shapes = _vision_shapes(state)
    clip = _local_clip_dir(path, hf, required=shapes is None)
    if clip is not None:
        stated = _stated_vision(clip)
        differ = {k: (v, stated[k]) for k, v in (shapes or {}).items() if stated[k] != v}
        if differ:
            raise EdgeVLMError(f"{path}: the vision weights do not match {clip / 'config.json'} "
                               f"(checkpoint, config): {differ}")
        return VisionConfig(**stated, **select)
    if all(shapes[k] == v for k, v in CLIP_L_SHAPES.items()):
        return VisionConfig(**shapes, num_attention_heads=16, **select)
    raise EdgeVLMError(
        f"{path}: the vision tower in the checkpoint is not CLIP ViT-L/14 (hidden {shapes['hidden_size']}, "
        f"MLP {shapes['intermediate_size']}, patch {shapes['patch_size']}), and its head count, activation and "
        f"layer-norm epsilon cannot be read from tensor shapes; set mm_vision_tower in config.json to a local "
        "directory with the tower's config.json"
    )


def _vision_shapes(state: dict[str, torch.Tensor]) -> dict | None:
    """What the stored tower tensors say about its config (None: no tower weights in the checkpoint)."""
    prefix = VISION_PREFIX + "vision_model."
    vm = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "embeddings.patch_embedding.weight" not in vm:
        return None
    pe = vm["embeddings.patch_embedding.weight"]  # [Dv, 3, p, p]
    grid = int(round((vm["embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in vm if k.startswith("encoder.layers."))
    return dict(hidden_size=pe.shape[0], intermediate_size=vm["encoder.layers.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=layers, image_size=grid * pe.shape[-1], patch_size=pe.shape[-1])


def _stated_vision(clip: Path) -> dict:
    c = json.loads((clip / "config.json").read_text())
    c = c.get("vision_config", c)
    return dict(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                image_size=c["image_size"], patch_size=c["patch_size"],
                hidden_act=c.get("hidden_act", "quick_gelu"), layer_norm_eps=c.get("layer_norm_eps", 1e-5))


def _local_clip_dir(path: Path, hf: dict, required: bool = True) -> Path | None:
    name = hf.get("mm_vision_tower", "")
    for cand in (Path(name), path / name):
        if name and (cand / "config.json").is_file():
            return cand
    if not required:
        return None
    raise EdgeVLMError(
        f"{path}: the checkpoint has no vision tower weights and mm_vision_tower={name!r} is not a local "
        "directory; download the CLIP model and set mm_vision_tower in config.json to its path"
    )


def official_state(path: Path, hf: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official keys to edgevlm's; add CLIP weights from the local tower dir for V1."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(("rotary_emb.inv_freq", "embeddings.position_ids")):
            continue
        if k.startswith(VISION_PREFIX):
            out["vision_tower.vision_tower." + k[len(VISION_PREFIX):]] = v
        elif k.startswith(PROJ_PREFIX):
            out["integrator." + k[len(PROJ_PREFIX):]] = v
        elif k.startswith("model."):
            out["llm." + k] = v
        elif k.startswith("lm_head."):
            out["llm." + k] = v
        else:
            out[k] = v  # reported as unexpected by the strict loader
    if not any(k.startswith("vision_tower.") for k in out):
        clip = read_weights(_local_clip_dir(path, hf))
        for k, v in clip.items():
            if k.startswith("vision_model.") and not k.endswith("position_ids"):
                out["vision_tower.vision_tower." + k] = v  # text tower and projections are not used
    return out
