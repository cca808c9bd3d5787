"""The ``mmproj`` GGUF: the CLIP vision tower plus the integrator, in the layout llama.cpp's
multimodal library (mtmd, ``clip`` architecture) loads for projector types ``mlp``, ``ldp`` and
``ldpv2`` (its llava graph), ``resampler`` (MiniCPM-V graph) and ``internvl`` (InternVL graph).

How llama.cpp picks the ViT layers (its llava graph, used by all three projector types): without
``clip.vision.feature_layer`` it runs ``block_count - 1`` blocks (LLaVA's "second to last layer"
is subtracted in the graph, even though the legacy converter already dropped the last block --
llama.cpp issue 25817). With ``feature_layer = [k]`` it runs exactly ``k`` blocks and takes their
output. So this writer stores only the blocks the torch tower runs (``layers_used``), writes
``block_count = layers_used`` and ``feature_layer = [layers_used]``: the same hidden state as
``hidden_states[select_layer]``, whichever way that llama.cpp rule is later fixed. No post-layernorm
is written (MobileVLM takes features before it). For CLS see ``CLS_MODES``.

The other two graphs take the same CLIP blocks through llama.cpp's generic ViT builder (all
``block_count`` blocks, pre-LN when present) but lay out the position table their own way, so the
writer re-lays CLIP's rows without changing a value (``_position_tensors``):

- ``resampler`` asserts the file has no class embedding and looks position rows up by SigLIP-NaViT
  bucket ids, ``floor(70 i / g) * 70 + floor(70 j / g)`` for patch (i, j): the rows are scattered
  into a 70 x 70 table at those ids (distinct for g <= 70), the other rows are zero.
- ``internvl`` requires a class embedding, appends it *after* the patches and adds position rows
  in order: the rows are written as (patches, CLS), which is CLIP's computation with the tokens
  permuted -- exact, CLS included, whatever ``cls`` says.

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
LLAVA_GRAPH = ("mlp", "ldp", "ldpv2")  # projector types llama.cpp runs with its llava graph
# llama.cpp's resampler (MiniCPM-V) graph: d_head = 128 and n_head = n_embd / 128 hard-coded; ViT
# position ids bucketed onto a 70 x 70 table (SigLIP 980 px / patch 14)
RESAMPLER_HEAD_DIM = 128
RESAMPLER_POS_SIDE = 70
RESAMPLER_VERSION = 2  # clip.minicpmv_version: mtmd's slice template (an image_size image gets one slice)
VISION_ACTS = {"quick_gelu": False, "gelu_pytorch_tanh": True}  # hidden_act -> clip.use_gelu


def gguf_projectors() -> dict[str, str]:
    """Integrator name -> llama.cpp projector type, for every integrator that has one."""
    from edgevlm.model.integrators import INTEGRATORS

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
    if proj == "resampler":
        _check_resampler(model)
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


def _check_resampler(model) -> None:
    """EdgeVLMError unless llama.cpp's resampler graph computes ``model.integrator`` exactly."""
    v, d, integ = model.cfg.vision, model.cfg.llm.hidden_size, model.integrator
    if d % RESAMPLER_HEAD_DIM or integ.num_heads != d // RESAMPLER_HEAD_DIM:
        raise EdgeVLMError(f"llama.cpp's resampler graph hard-codes {RESAMPLER_HEAD_DIM}-wide attention heads "
                           f"(n_head = n_embd / {RESAMPLER_HEAD_DIM}); this resampler has width {d} with "
                           f"{integ.num_heads} heads. Use an LLM width that is a multiple of "
                           f"{RESAMPLER_HEAD_DIM} and num_heads = width / {RESAMPLER_HEAD_DIM}")
    if integ.eps != v.layer_norm_eps:
        raise EdgeVLMError(f"llama.cpp runs the resampler's LayerNorms with the vision tower's epsilon "
                           f"({v.layer_norm_eps}); this resampler uses eps={integ.eps}: set "
                           f"integrator.kwargs.eps={v.layer_norm_eps}")
    if v.grid > RESAMPLER_POS_SIDE:
        raise EdgeVLMError(f"llama.cpp's resampler graph buckets ViT positions onto a {RESAMPLER_POS_SIDE}x"
                           f"{RESAMPLER_POS_SIDE} table; a {v.grid}x{v.grid} patch grid does not fit")


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


def bucketed_positions(pos, grid: int) -> np.ndarray:
    """[N, D] patch position rows -> [70*70, D], row i*g + j at llama.cpp's resampler bucket id."""
    side = RESAMPLER_POS_SIDE
    bucket = [side * i // grid for i in range(grid)]  # floor(70 i / g), as llama.cpp computes it
    src = to_numpy(pos)  # [g*g, D]
    table = np.zeros((side * side, src.shape[1]), np.float32)
    for i in range(grid):
        for j in range(grid):
            table[bucket[i] * side + bucket[j]] = src[i * grid + j]
    return table.astype(np.float16)


def _position_tensors(emb, cls: str, proj: str, grid: int) -> Iterator[tuple[str, np.ndarray]]:
    pos = emb.position_embedding.weight  # [1 + N, D], row 0 is the CLS position
    if proj == "internvl":  # the graph appends CLS after the patches: rows in that order
        yield "v.class_embd", _vec(emb.class_embedding)  # [D]
        # f32: this graph adds the table itself (the others gather rows), and ggml adds no f16 to f32
        yield "v.position_embd.weight", np.concatenate([_vec(pos[1:]), _vec(pos[:1])])  # [N + 1, D]
    elif proj == "resampler":  # no CLS; rows looked up by bucket id
        yield "v.position_embd.weight", bucketed_positions(pos[1:], grid)  # [70*70, D]
    elif cls == "keep":
        yield "v.class_embd", _vec(emb.class_embedding)  # [D]
        yield "v.position_embd.weight", _mat(pos)
    else:
        yield "v.position_embd.weight", _mat(pos[1:])  # [N, D]: patch positions only


def vision_tensors(tower, cls: str = "omit", proj: str = "mlp") -> Iterator[tuple[str, np.ndarray]]:
    """CLIP tensors for the ``tower.layers_used`` blocks the torch tower runs (see CLS_MODES and
    ``_position_tensors`` for the position layout each projector type's graph needs)."""
    vm = tower.vision_tower.vision_model
    emb = vm.embeddings
    yield "v.patch_embd.weight", _mat(emb.patch_embedding.weight)  # [D, 3, p, p]
    yield from _position_tensors(emb, cls, proj, tower.cfg.grid)
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
    if proj == "mlp":  # Linear, GELU, Linear (mlp2x_gelu as is; linear rewritten exactly)
        up, down = integrator.gguf_mlp_layers()
        yield from _linear("mm.0", up)
        yield from _linear("mm.2", down)
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
    elif proj == "resampler":
        yield from _resampler_tensors(integrator)
    elif proj == "internvl":  # InternVL mlp1: LayerNorm, Linear, GELU, Linear
        yield from _norm("mm.model.mlp.0", integrator.mlp[0])
        yield from _linear("mm.model.mlp.1", integrator.mlp[1])
        yield from _linear("mm.model.mlp.3", integrator.mlp[3])
    else:
        raise ValueError(f"no tensor layout for projector type {proj!r}")


def _resampler_tensors(m) -> Iterator[tuple[str, np.ndarray]]:
    """MiniCPM-V resampler names (as llama.cpp's minicpmv converter writes them)."""
    yield "resampler.query", _vec(m.query)  # [M, D], f32: the graph LayerNorms it directly
    # required by llama.cpp's loader, unused by its graph (which computes the sin-cos table itself)
    yield "resampler.pos_embed_k", _vec(m.pos_k)  # [N, D]
    yield "resampler.kv.weight", _mat(m.kv_proj.weight)  # [D, Dv]
    for name in ("q", "k", "v", "out"):
        yield from _linear(f"resampler.attn.{name}", getattr(m.attn, name))
    for name in ("q", "kv", "post"):
        yield from _norm(f"resampler.ln_{name}", getattr(m, f"ln_{name}"))
    yield "resampler.proj.weight", _mat(m.proj.weight)  # [D, D]: out = x proj.weight^T


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
    w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, proj in LLAVA_GRAPH)
    w.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, proj)
    if proj == "resampler":
        w.add_int32("clip.minicpmv_version", RESAMPLER_VERSION)
        w.add_uint32("clip.minicpmv_query_num", model.n_visual_tokens)
    elif proj == "internvl":
        w.add_uint32(gguf.Keys.ClipVision.Projector.SCALE_FACTOR, model.integrator.scale)
        w.add_uint32(gguf.Keys.ClipVision.PREPROC_MIN_TILES, 1)  # one tile: the image as it is
        w.add_uint32(gguf.Keys.ClipVision.PREPROC_MAX_TILES, 1)
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
    if proj == "resampler" and cls == "keep":
        raise EdgeVLMError("llama.cpp's resampler graph refuses a class embedding (it runs the tower on "
                           "the patches alone); use cls='omit'")
    tensors = (*vision_tensors(model.vision_tower, cls, proj), *projector_tensors(model.integrator, proj))
    n = write_gguf(path, "clip", lambda w: add_metadata(w, model, proj), tensors)
    cls = "last" if proj == "internvl" else cls  # what the file holds (see _position_tensors)
    return {"projector_type": proj, "vision_layers": model.vision_tower.layers_used, "cls": cls,
            "n_tensors": n, "mm_embd": model.cfg.llm.hidden_size}
