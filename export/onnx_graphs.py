"""The three ONNX graphs of a bundle, named the way ONNX Runtime GenAI / transformers.js split VLMs:

    vision_encoder.onnx        pixel_values [B, 3, S, S] -> image_features [B, M, D]
                               (vision tower + integrator fused)
    embed_tokens.onnx          input_ids [B, T] -> inputs_embeds [B, T, D]
    decoder_model_merged.onnx  inputs_embeds [B, T, D], attention_mask [B, P + T],
                               position_ids [B, T], past_key_values.{i}.key/value [B, H_kv, P, Dh]
                               -> logits [B, T, V], present.{i}.key/value [B, H_kv, P + T, Dh]

One decoder graph serves prefill (P = 0: empty past tensors) and decode (T = 1), with optimum's
input/output names. The decoder builds its additive 4-D causal mask from ``attention_mask`` and
``position_ids`` itself, so the graph holds none of transformers' mask-building machinery.

Exporters: ``dynamo`` (torch.export + onnxscript, the default; small clean graphs) or
``torchscript`` (the legacy tracer; ~5x faster to export). Both are validated the same way.

``build_gqa_decoder`` writes a second form of the decoder for ONNX Runtime only, with the same
names and semantics: one com.microsoft GroupQueryAttention per layer (rotary inside, GQA without
repeating KV heads) whose past and present may share one preallocated buffer, so decode steps never
copy the KV cache; QKV and gate/up weights fused into one MatMul each (one int4 GEMV instead of
three or two). It is built from the weights with onnx.helper -- no tracing, weights streamed to
external data -- and validated against PyTorch like the exported graphs.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgevlm.runtime.graph_io import (
    ATTENTION_MASK, IMAGE_FEATURES, INPUT_IDS, INPUTS_EMBEDS, INTEGER_INPUTS, LOGITS, PIXEL_VALUES, POSITION_IDS,
    past_key, past_names, past_value, present_names,
)

from .onnx_io import EXTERNAL_DATA_BYTES, LARGE_MODEL_BYTES, save_model

OPSET = 18
EXPORTERS = ("dynamo", "torchscript")


@dataclass(frozen=True)
class GraphSpec:
    """Names and symbolic axes of one graph's inputs and outputs (recorded in the manifest)."""

    name: str  # the manifest file role
    file: str
    inputs: dict[str, tuple[str | int, ...]]  # name -> dims (str: dynamic, int: fixed)
    outputs: dict[str, tuple[str | int, ...]]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        out = {}
        for name, dims in {**self.inputs, **self.outputs}.items():
            out[name] = {i: d for i, d in enumerate(dims) if isinstance(d, str)}
        return out

    def to_dict(self) -> dict:
        return {"file": self.file, "inputs": {k: list(v) for k, v in self.inputs.items()},
                "outputs": {k: list(v) for k, v in self.outputs.items()}}


def graph_specs(model) -> dict[str, GraphSpec]:
    c = model.cfg
    s, d, v = c.vision.image_size, c.llm.hidden_size, c.llm.vocab_size
    kv, hd, n = c.llm.num_key_value_heads, c.llm.hidden_size // c.llm.num_attention_heads, c.llm.num_hidden_layers
    past = {name: ("batch", kv, "past_sequence_length", hd) for name in past_names(n)}
    present = {name: ("batch", kv, "total_sequence_length", hd) for name in present_names(n)}
    return {
        "vision_encoder": GraphSpec("vision_encoder", "vision_encoder.onnx", {PIXEL_VALUES: ("batch", 3, s, s)},
                                    {IMAGE_FEATURES: ("batch", model.n_visual_tokens, d)}),
        "embed_tokens": GraphSpec("embed_tokens", "embed_tokens.onnx", {INPUT_IDS: ("batch", "sequence_length")},
                                  {INPUTS_EMBEDS: ("batch", "sequence_length", d)}),
        "decoder": GraphSpec(
            "decoder", "decoder_model_merged.onnx",
            {INPUTS_EMBEDS: ("batch", "sequence_length", d), ATTENTION_MASK: ("batch", "total_sequence_length"),
             POSITION_IDS: ("batch", "sequence_length"), **past},
            {LOGITS: ("batch", "sequence_length", v), **present}),
    }


# --- the modules that are exported ----------------------------------------------------------------


class VisionEncoder(nn.Module):
    """Vision tower + integrator: pixel_values [B, 3, S, S] -> image_features [B, M, D]."""

    def __init__(self, model):
        super().__init__()
        self.vision_tower = model.vision_tower
        self.integrator = model.integrator

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # as EdgeVLM.encode_images in fp32
        return self.integrator(self.vision_tower(pixel_values))  # [B, N, Dv] -> [B, M, D]


class EmbedTokens(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.llm.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        return self.embed(input_ids)


def causal_mask(attention_mask: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, T, P + T]: key j is visible to query t iff j <= position_ids[t] and
    attention_mask[j] == 1. Key positions come from a cumsum, not from a shape, so nothing about
    the sequence lengths is baked into the graph."""
    key_pos = torch.cumsum(torch.ones_like(attention_mask[0]), 0) - 1  # [P + T]
    allowed = (key_pos[None, None, :] <= position_ids[:, :, None]) & attention_mask[:, None, :].bool()  # [B, T, P + T]
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]  # [B, 1, T, P + T]


class DecoderWithPast(nn.Module):
    """The LLaMA decoder + LM head with the KV cache as flat graph inputs/outputs."""

    def __init__(self, model):
        super().__init__()
        self.llm = model.llm
        self.num_layers = model.cfg.llm.num_hidden_layers

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)  # [B, H_kv, P, Dh] each
        mask = causal_mask(attention_mask, position_ids, inputs_embeds.dtype)
        out = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
        logits = self.llm.lm_head(out.last_hidden_state)  # [B, T, V]
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]  # [B, H_kv, P + T, Dh]
        return (logits, *present)


# --- example inputs -------------------------------------------------------------------------------


def example_inputs(model, graph: str, batch: int = 2, seq: int = 3, past: int = 2,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for export (sizes >= 2 so no axis is specialised to 0 or 1) and for validation."""
    c = model.cfg
    g = torch.Generator().manual_seed(seed)
    if graph == "vision_encoder":
        s = c.vision.image_size
        return {PIXEL_VALUES: torch.randn(batch, 3, s, s, generator=g)}
    if graph == "embed_tokens":
        return {INPUT_IDS: torch.randint(0, c.llm.vocab_size, (batch, seq), generator=g)}
    kv, hd = c.llm.num_key_value_heads, c.llm.hidden_size // c.llm.num_attention_heads
    inputs = {
        INPUTS_EMBEDS: torch.randn(batch, seq, c.llm.hidden_size, generator=g) * 0.02,
        ATTENTION_MASK: torch.ones(batch, past + seq, dtype=torch.long),
        POSITION_IDS: torch.arange(past, past + seq).repeat(batch, 1),
    }
    for name in past_names(c.llm.num_hidden_layers):
        inputs[name] = torch.randn(batch, kv, past, hd, generator=g)
    return inputs


def graph_module(model, graph: str) -> nn.Module:
    modules = {"vision_encoder": VisionEncoder, "embed_tokens": EmbedTokens, "decoder": DecoderWithPast}
    return modules[graph](model).eval()


# --- export ---------------------------------------------------------------------------------------


def _dynamic_shapes(spec: GraphSpec, input_names: list[str]) -> dict:
    from torch.export import Dim

    dims: dict[str, Dim] = {}

    def dim(name: str) -> Dim:
        return dims.setdefault(name, Dim(name.replace(".", "_")))

    shapes = [{i: dim(d) for i, d in enumerate(spec.inputs[n]) if isinstance(d, str)} for n in input_names]
    fixed = 3 if spec.name == "decoder" else len(input_names)
    if spec.name != "decoder":
        return dict(zip(input_names, shapes))
    return {**dict(zip(input_names[:fixed], shapes[:fixed])), "past": tuple(shapes[fixed:])}


def export_graph(model, graph: str, path: Path, exporter: str = "dynamo", opset: int = OPSET) -> dict:
    """Export one graph to ``path`` (weights external when large); returns export facts."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    spec = graph_specs(model)[graph]
    module = graph_module(model, graph)
    inputs = example_inputs(model, graph)
    names = list(inputs)
    args = tuple(inputs.values())
    large = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())) > LARGE_MODEL_BYTES
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision ops
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; validation is what counts
        if exporter == "dynamo":
            prog = torch.onnx.export(module, args, input_names=names, output_names=list(spec.outputs),
                                     dynamic_shapes=_dynamic_shapes(spec, names), opset_version=opset,
                                     dynamo=True, verbose=False)
            prog.save(str(path), external_data=large)
        else:
            torch.onnx.export(module, args, str(path), input_names=names, output_names=list(spec.outputs),
                              dynamic_axes=spec.dynamic_axes(), opset_version=opset, dynamo=False,
                              external_data=large)
    return {"exporter": f"torch.onnx ({exporter})", "export_s": round(time.perf_counter() - t0, 2)}


def export_graphs(model, out_dir: Path, exporter: str = "dynamo", opset: int = OPSET,
                  graphs: tuple[str, ...] = ("vision_encoder", "embed_tokens", "decoder")) -> dict[str, dict]:
    """Export fp32 graphs into ``out_dir``; returns {graph: {"path", "exporter", "export_s"}}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = graph_specs(model)
    result = {}
    for graph in graphs:
        path = out_dir / specs[graph].file
        info = export_graph(model, graph, path, exporter, opset)
        result[graph] = {"path": path, **info}
    return result


# --- the ONNX Runtime decoder: GroupQueryAttention with an in-place KV cache ----------------------


class _Builder:
    """Tiny ONNX graph builder: unique node outputs, initializers from torch tensors. With
    ``data_path`` the weights stream into that external-data file as they are added, so a large
    model never has a second in-memory copy (protobuf cannot hold more than 2 GB anyway)."""

    def __init__(self, data_path: Path | None = None):
        self.nodes, self.inits, self._n = [], [], 0
        self.data_path = data_path
        self._data = open(data_path, "wb") if data_path else None

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", **attrs):
        self._n += 1
        outs = [f"{op_type.lower()}_{self._n}_{i}" for i in range(n_out)]
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name: str, value) -> str:
        from onnx import TensorProto, helper, numpy_helper

        arr = np.ascontiguousarray(value.detach().float().numpy() if isinstance(value, torch.Tensor) else value)
        if self._data is None or arr.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(arr, name))
            return name
        offset = self._data.seek(0, 2)
        offset += -offset % 4096  # page-aligned, so ONNX Runtime can mmap it
        self._data.seek(offset)
        self._data.write(arr.tobytes())
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape,
                             data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
            tensor.external_data.add(key=k, value=v)
        self.inits.append(tensor)
        return name

    def close(self) -> None:
        if self._data is not None:
            self._data.close()

    def weight(self, name: str, *linears: nn.Linear) -> str:
        """``x @ W`` weight [in, out] for one or several fused nn.Linear (no bias in LLaMA)."""
        return self.const(name, torch.cat([lin.weight for lin in linears], dim=0).t())

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        # the Pow/ReduceMean/Add/Sqrt/Div/Mul pattern ONNX Runtime fuses into SimplifiedLayerNormalization
        var = self.op("ReduceMean", self.op("Pow", x, "two"), "last_axis", keepdims=1)
        y = self.op("Div", x, self.op("Sqrt", self.op("Add", var, self.const(f"{weight}.eps", np_f32(eps)))))
        return self.op("Mul", y, weight)


def np_f32(v: float) -> np.ndarray:
    return np.array(v, dtype=np.float32)


def _gqa_layer(b: _Builder, layer, i: int, h: str, seqlens_k: str, total: str, c) -> tuple[str, str, str]:
    """One LLaMA block; returns (hidden, present key, present value)."""
    att, mlp = layer.self_attn, layer.mlp
    x = b.rms_norm(h, b.const(f"layers.{i}.input_layernorm.weight", layer.input_layernorm.weight), c.rms_norm_eps)
    qkv = b.op("MatMul", x, b.weight(f"layers.{i}.qkv_proj.weight", att.q_proj, att.k_proj, att.v_proj))
    out, pk, pv = b.op("GroupQueryAttention", qkv, "", "", past_key(i), past_value(i),
                       seqlens_k, total, "cos_cache", "sin_cache", n_out=3, domain="com.microsoft",
                       num_heads=c.num_attention_heads, kv_num_heads=c.num_key_value_heads, do_rotary=1,
                       rotary_interleaved=0, scale=float(att.scaling))  # packed QKV [B, S, (N + 2 Nkv) Dh]
    h = b.op("Add", h, b.op("MatMul", out, b.weight(f"layers.{i}.o_proj.weight", att.o_proj)))
    x = b.rms_norm(h, b.const(f"layers.{i}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight),
                   c.rms_norm_eps)
    gate, up = b.op("Split", b.op("MatMul", x, b.weight(f"layers.{i}.gate_up_proj.weight", mlp.gate_proj, mlp.up_proj)),
                    n_out=2, axis=-1, num_outputs=2)
    act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)  # SiLU(gate) * up
    return b.op("Add", h, b.op("MatMul", act, b.weight(f"layers.{i}.down_proj.weight", mlp.down_proj))), pk, pv


def build_gqa_decoder(model, path: Path, opset: int = OPSET) -> dict:
    """The decoder as ONNX Runtime's GroupQueryAttention graph: same names and semantics as the
    exported one, plus in-place KV: bind one buffer [B, H_kv, capacity, Dh] as both past and present
    and GQA writes the new positions into it (no per-step concat). Fused QKV and gate/up weights,
    rotary inside GQA (cos/sin caches from the model's own inv_freq). ONNX Runtime only."""
    import onnx
    from onnx import TensorProto, helper

    t0 = time.perf_counter()
    spec, c, llm = graph_specs(model)["decoder"], model.llm.config, model.llm.model
    if getattr(c, "rope_scaling", None):
        raise ValueError("the GQA decoder supports plain RoPE only (rope_scaling is set)")
    params = sum(p.numel() * 4 for p in model.llm.parameters()) - model.llm.get_input_embeddings().weight.numel() * 4
    b = _Builder(path.with_name(path.name + "_data") if params > EXTERNAL_DATA_BYTES else None)
    b.const("two", np_f32(2.0))
    b.const("last_axis", [-1])
    pos = torch.arange(c.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(pos, llm.rotary_emb.inv_freq.float())  # [P, Dh/2], as LlamaRotaryEmbedding
    b.const("cos_cache", freqs.cos() * llm.rotary_emb.attention_scaling)
    b.const("sin_cache", freqs.sin() * llm.rotary_emb.attention_scaling)
    # seqlens_k = valid keys - 1 per row; total = attention_mask width (the positions in use)
    seqlens_k = b.op("Cast", b.op("Sub", b.op("ReduceSum", ATTENTION_MASK, b.const("axis1", [1]), keepdims=0),
                                  b.const("one", np.array(1, np.int64))), to=TensorProto.INT32)
    total = b.op("Cast", b.op("Gather", b.op("Shape", ATTENTION_MASK), b.const("idx1", np.array(1, np.int64)),
                              axis=0), to=TensorProto.INT32)
    h, presents = INPUTS_EMBEDS, []
    with torch.no_grad():
        for i, layer in enumerate(llm.layers):
            h, pk, pv = _gqa_layer(b, layer, i, h, seqlens_k, total, c)
            presents += [pk, pv]
        h = b.rms_norm(h, b.const("norm.weight", llm.norm.weight), c.rms_norm_eps)
        b.nodes.append(helper.make_node("MatMul", [h, b.weight("lm_head.weight", model.llm.lm_head)], [LOGITS]))
    b.close()
    renames = dict(zip(presents, list(spec.outputs)[1:]))
    for node in b.nodes:
        node.output[:] = [renames.get(o, o) for o in node.output]
    graph = helper.make_graph(b.nodes, "decoder_model_merged", _value_infos(spec.inputs), _value_infos(spec.outputs),
                              b.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    if b.data_path is None:
        save_model(proto, path)
    else:
        onnx.save_model(proto, str(path))  # weights already in <file>_data
    onnx.checker.check_model(str(path))
    return {"exporter": "edgevlm GQA builder (onnx.helper)", "export_s": round(time.perf_counter() - t0, 2)}


def _value_infos(dims: dict) -> list:
    from onnx import TensorProto, helper

    return [helper.make_tensor_value_info(n, TensorProto.INT64 if n in INTEGER_INPUTS else TensorProto.FLOAT, list(d))
            for n, d in dims.items()]
