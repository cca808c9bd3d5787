"""Input and output names of the graphs in ONNX, TensorRT and Core ML bundles: the contract between
the exporters (``export/``) and the backends (``runtime/backends/``), written once, as data.

    vision_encoder   PIXEL_VALUES [B, 3, S, S] -> IMAGE_FEATURES [B, M, D]
    embed_tokens     INPUT_IDS [B, T] -> INPUTS_EMBEDS [B, T, D]
    decoder          INPUTS_EMBEDS, ATTENTION_MASK [B, P + T], POSITION_IDS [B, T],
                     past_key(i) / past_value(i) [B, H_kv, P, Dh]
                     -> LOGITS [B, T, V], present_key(i) / present_value(i) [B, H_kv, P + T, Dh]
    Core ML decoder  INPUTS_EMBEDS, CAUSAL_MASK [1, 1, T, P + T] -> LOGITS,
                     states KEY_CACHE / VALUE_CACHE [L, 1, H_kv, C, Dh]

The names are optimum's / ONNX Runtime GenAI's, so other tools read our graphs as theirs.
Plain strings and functions: no dependencies, importable by every layer.
"""
from __future__ import annotations

PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
CAUSAL_MASK = "causal_mask"
KEY_CACHE, VALUE_CACHE = "key_cache", "value_cache"

PAST = "past_key_values"
PRESENT = "present"
KV_KINDS = ("key", "value")

INTEGER_INPUTS = frozenset({INPUT_IDS, ATTENTION_MASK, POSITION_IDS})  # int64; every other tensor is float


def past_key(i: int) -> str:
    return f"{PAST}.{i}.key"


def past_value(i: int) -> str:
    return f"{PAST}.{i}.value"


def present_key(i: int) -> str:
    return f"{PRESENT}.{i}.key"


def present_value(i: int) -> str:
    return f"{PRESENT}.{i}.value"


def past_names(num_layers: int) -> list[str]:
    """``past_key_values.{i}.key/value`` in layer order (key before value): the decoder's KV inputs."""
    return [f"{PAST}.{i}.{kind}" for i in range(num_layers) for kind in KV_KINDS]


def present_names(num_layers: int) -> list[str]:
    """``present.{i}.key/value`` in layer order: the decoder's KV outputs."""
    return [f"{PRESENT}.{i}.{kind}" for i in range(num_layers) for kind in KV_KINDS]


def is_past(name: str) -> bool:
    return name.startswith(PAST + ".")


def is_present(name: str) -> bool:
    return name.startswith(PRESENT + ".")


def present_for(past: str) -> str:
    """The output that holds the updated cache of input ``past``: ``past_key_values.3.key`` -> ``present.3.key``."""
    return PRESENT + past[len(PAST):]
