"""The ``mmproj`` GGUF: the CLIP vision tower plus the integrator, in the layout llama.cpp's
multimodal library (mtmd, ``clip`` architecture) loads for projector types ``mlp``, ``ldp`` and
``ldpv2``.

How llama.cpp picks the ViT layers (its llava graph, used by all three projector types): without
``clip.vision.feature_layer`` it runs ``block_count - 1`` blocks (LLaVA's "second to last layer"
is subtracted in the graph, even though the legacy converter already dropped the last block --
llama.cpp issue 25817). With ``feature_layer = [k]`` it runs exactly ``k`` blocks and takes their
output. So this writer stores only the blocks the torch tower runs (``layers_used``), writes
``block_count = layers_used`` and ``feature_layer = [layers_used]``: the same hidden state as
``hidden_states[select_layer]``, whichever way that llama.cpp rule is later fixed. No post-layernorm
is written (MobileVLM takes features before it). For CLS see ``CLS_MODES``.

Tensor types follow llama.cpp's converter: matrices and convolution kernels f16 (ggml's
convolutions want f16 kernels), vectors f32.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from edgevlm.runtime.errors import EdgeVLMError

from .gguf_io import to_numpy, write_gguf

# What to do with CLIP's CLS token. llama.cpp's llava graph (this project's build and upstream as
# of 2026-10) appends the class embedding *after* the patches while still adding position rows
# 0..N in order and reading rows 1..N back (issue 25814, fix proposed in PR 25844): every patch
# gets its neighbour's position and the CLS output becomes the last visual token (cosine ~0.93 vs
# torch on the tiny model). "omit" writes no class embedding and only the patch positions, so
# llama.cpp runs the patches alone -- exact for a tower whose features do not depend on CLS,
# otherwise an approximation measured by the parity test; "keep" writes CLIP as it is, for a
# llama.cpp with that fix.
CLS_MODES = ("omit", "keep")
LDP_GRID = 24  # llama.cpp's ldp/ldpv2 graphs hard-code a 24x24 patch grid (336 px / patch 14)
VISION_ACTS = {"quick_gelu": False, "gelu_pytorch_tanh": True}  # hidden_act -> clip.use_gelu


def gguf_projectors() -> dict[str, str]:
    """Integrator name -> llama.cpp projector type, for every integrator that has one."""
    from edgevlm.train.integrators import INTEGRATORS

    out = {}
    for name in INTEGRATORS.names():
        proj = getattr(INTEGRATORS.get(name), "gguf_projector", None)
        if proj:
            out[name] = proj
    return out


def projector_type(model) -> str:
    """The llama.cpp projector type for ``model``, or EdgeVLMError saying why it cannot go to GGUF."""
    cfg = model.cfg
    name = cfg.integrator.name
    capable = gguf_projectors()
    proj = capable.get(name)
    if proj is None:
        raise EdgeVLMError(f"integrator {name!r} cannot run in llama.cpp; GGUF export supports: "
                           f"{', '.join(f'{k} ({v})' for k, v in sorted(capable.items()))}")
    v = cfg.vision
    if proj in ("ldp", "ldpv2") and v.grid != LDP_GRID:
        raise EdgeVLMError(f"integrator {name!r} has a {v.grid}x{v.grid} patch grid (image_size "
                           f"{v.image_size}, patch {v.patch_size}); llama.cpp's {proj} projector "
                           f"hard-codes {LDP_GRID}x{LDP_GRID} (e.g. 336 px with patch 14)")
    if v.select_feature != "patch":
        raise EdgeVLMError(f"vision.select_feature={v.select_feature!r}: llama.cpp's llava graph "
                           "always drops the CLS token; only 'patch' can be exported to GGUF")
    if v.hidden_act not in VISION_ACTS:
        raise EdgeVLMError(f"vision.hidden_act={v.hidden_act!r} has no llama.cpp equivalent in "
                           f"the CLIP graph; supported: {', '.join(VISION_ACTS)}")
    if v.intermediate_size == v.hidden_size:
        # llama.cpp swaps ffn_up/ffn_down of llava-era files when ffn_down's input width equals
        # the embedding width (a fix for old converters); a square FFN would be swapped wrongly.
        raise EdgeVLMError("vision.intermediate_size equals vision.hidden_size; llama.cpp would "
                           "misread the vision FFN of such a file")
    return proj


def _mat(t) -> np.ndarray:
    return to_numpy(t).astype(np.float16)


def _vec(t) -> np.ndarray:
    return to_numpy(t).astype(np.float32)


def _linear(prefix: str, lin) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{prefix}.weight", _mat(lin.weight)
    if lin.bias is not None:
        yield f"{prefix}.bias", _vec(lin.bias)


def _norm(prefix: str, ln) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{prefix}.weight", _vec(ln.weight)
    yield f"{prefix}.bias", _vec(ln.bias)


def vision_tensors(tower, cls: str = "omit") -> Iterator[tuple[str, np.ndarray]]:
    """CLIP tensors for the ``tower.layers_used`` blocks the torch tower runs (see CLS_MODES)."""
    vm = tower.vision_tower.vision_model
    emb = vm.embeddings
    yield "v.patch_embd.weight", _mat(emb.patch_embedding.weight)  # [D, 3, p, p]
    pos = emb.position_embedding.weight  # [1 + N, D], row 0 is the CLS position
    if cls == "keep":
        yield "v.class_embd", _vec(emb.class_embedding)  # [D]
        yield "v.position_embd.weight", _mat(pos)
    else:
        yield "v.position_embd.weight", _mat(pos[1:])  # [N, D]: patch positions only
    yield from _norm("v.pre_ln", vm.pre_layrnorm)
    for i, layer in enumerate(vm.encoder.layers[: tower.layers_used]):
        a, p = layer.self_attn, f"v.blk.{i}"
        yield from _linear(f"{p}.attn_q", a.q_proj)
        yield from _linear(f"{p}.attn_k", a.k_proj)
        yield from _linear(f"{p}.attn_v", a.v_proj)
        yield from _linear(f"{p}.attn_out", a.out_proj)
        yield from _norm(f"{p}.ln1", layer.layer_norm1)
        yield from _norm(f"{p}.ln2", layer.layer_norm2)
        yield from _linear(f"{p}.ffn_up", layer.mlp.fc1)  # [F, D]
        yield from _linear(f"{p}.ffn_down", layer.mlp.fc2)  # [D, F]


def _dwconv(t) -> np.ndarray:
    return to_numpy(t)[:, 0].astype(np.float16)  # depthwise [C, 1, 3, 3] -> [C, 3, 3]


def _pwconv(t) -> np.ndarray:
    return to_numpy(t)[:, :, 0, 0].astype(np.float16)  # 1x1 conv [O, I, 1, 1] -> matrix [O, I]


def _ldp_block(i: int, ir) -> Iterator[tuple[str, np.ndarray]]:
    p = f"mm.model.mb_block.{i}.block"
    dw, se, pw = ir.block
    yield f"{p}.0.0.weight", _dwconv(dw[0].weight)
    yield from _norm(f"{p}.0.1", dw[1])
    yield f"{p}.1.fc1.weight", _pwconv(se.fc1.weight)
    yield f"{p}.1.fc1.bias", _vec(se.fc1.bias)
    yield f"{p}.1.fc2.weight", _pwconv(se.fc2.weight)
    yield f"{p}.1.fc2.bias", _vec(se.fc2.bias)
    yield f"{p}.2.0.weight", _pwconv(pw[0].weight)
    yield from _norm(f"{p}.2.1", pw[1])


def projector_tensors(integrator, proj: str) -> Iterator[tuple[str, np.ndarray]]:
    if proj == "mlp":  # nn.Sequential(Linear, GELU, Linear)
        yield from _linear("mm.0", integrator[0])
        yield from _linear("mm.2", integrator[2])
    elif proj == "ldp":
        m = integrator.model
        yield from _linear("mm.model.mlp.1", m.mlp[1])
        yield from _linear("mm.model.mlp.3", m.mlp[3])
        yield from _ldp_block(1, m.mb_block[1])
        yield from _ldp_block(2, m.mb_block[2])
    elif proj == "ldpv2":
        yield from _linear("mm.model.mlp.0", integrator.mlp.mlp[0])
        yield from _linear("mm.model.mlp.2", integrator.mlp.mlp[2])
        conv = integrator.peg.peg[0]
        yield "mm.model.peg.0.weight", _dwconv(conv.weight)
        yield "mm.model.peg.0.bias", _vec(conv.bias)
    else:
        raise ValueError(f"no tensor layout for projector type {proj!r}")


def add_metadata(w, model, proj: str) -> None:
    """clip.* keys (``w`` is a gguf.GGUFWriter)."""
    import gguf

    cfg, v = model.cfg, model.cfg.vision
    layers = model.vision_tower.layers_used
    w.add_name(f"{cfg.preset or 'edgevlm'} mmproj")
    w.add_description(f"edgevlm vision tower + {cfg.integrator.name} integrator")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    w.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, proj)
    cv = gguf.Keys.ClipVision
    w.add_uint32(cv.IMAGE_SIZE, v.image_size)
    w.add_uint32(cv.PATCH_SIZE, v.patch_size)
    w.add_uint32(cv.EMBEDDING_LENGTH, v.hidden_size)
    w.add_uint32(cv.FEED_FORWARD_LENGTH, v.intermediate_size)
    w.add_uint32(cv.PROJECTION_DIM, cfg.llm.hidden_size)
    w.add_uint32(cv.Attention.HEAD_COUNT, v.num_attention_heads)
    w.add_float32(cv.Attention.LAYERNORM_EPS, v.layer_norm_eps)
    w.add_uint32(cv.BLOCK_COUNT, layers)
    w.add_array("clip.vision.feature_layer", [layers])
    w.add_array(cv.IMAGE_MEAN, [float(x) for x in cfg.preprocess.mean])
    w.add_array(cv.IMAGE_STD, [float(x) for x in cfg.preprocess.std])
    w.add_bool(cv.USE_GELU, VISION_ACTS[v.hidden_act])


def write_mmproj(model, path, cls: str = "omit") -> dict:
    """Write ``path``; returns a summary for the manifest (projector type, layers, tensors)."""
    if cls not in CLS_MODES:
        raise EdgeVLMError(f"unknown CLS mode {cls!r}; valid: {', '.join(CLS_MODES)}")
    proj = projector_type(model)
    tensors = (*vision_tensors(model.vision_tower, cls), *projector_tensors(model.integrator, proj))
    n = write_gguf(path, "clip", lambda w: add_metadata(w, model, proj), tensors)
    return {"projector_type": proj, "vision_layers": model.vision_tower.layers_used, "cls": cls,
            "n_tensors": n, "mm_embd": model.cfg.llm.hidden_size}
