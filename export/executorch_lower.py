"""From the three method modules to one ``.pte``: torchao quantisation of the text decoder, torch.export,
XNNPACK lowering and the constant methods ExecuTorch's LLM runners read.

Quantisation (``--quantize``), applied to the decoder's ``nn.Linear`` layers (LM head included) with
torchao's ``Int8DynamicActivationIntxWeightConfig``, the recipe ExecuTorch's own LLM exports use:

    fp32   no quantisation
    8da4w  8-bit dynamic (per-token) activations, 4-bit weights in groups of ``group_size``
    int8   8-bit dynamic activations, 8-bit per-channel weights (8da8w)

The vision method (tower + integrator) and the token embedding stay fp32, as in ExecuTorch's LLaVA
example. XNNPACK takes what it supports (linears, quantised linears, most elementwise ops); the rest
runs in ExecuTorch's portable kernels.

Constant methods (``extension/llm/runner/constants.h``; read by ``get_llm_metadata`` and
``get_eos_ids`` in ``llm_runner_helper.cpp``): ``get_max_seq_len`` (required by the runner),
``get_max_context_len``, ``get_vocab_size``, ``get_bos_id``, ``get_eos_ids``, ``use_kv_cache``,
``enable_dynamic_shape``, ``use_sdpa_with_kv_cache``. The runner takes BOS and vocabulary size from
the tokenizer; the ones here are for other readers.
"""
from __future__ import annotations

import copy
import time
import warnings

import torch

from .executorch_graphs import METHODS, export_method, method_modules
from .executorch_options import GROUP_SIZE


def quantize_decoder(decoder: torch.nn.Module, quantize: str, group_size: int = GROUP_SIZE) -> dict:
    """Quantise ``decoder``'s linears in place (torchao); returns what was done (for the manifest)."""
    if quantize == "fp32":
        return {"recipe": "none"}
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    int4 = quantize == "8da4w"
    granularity = PerGroup(group_size) if int4 else PerAxis(0)

    def wanted(m, fqn: str) -> bool:
        return isinstance(m, torch.nn.Linear) and (not int4 or m.in_features % group_size == 0)

    names = [n for n, m in decoder.named_modules() if wanted(m, n)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(decoder, Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4 if int4 else torch.int8, weight_granularity=granularity), filter_fn=wanted)
    return {"recipe": f"torchao Int8DynamicActivationIntxWeightConfig (weight {'int4' if int4 else 'int8'}, "
                      f"{'group ' + str(group_size) if int4 else 'per channel'}; activations int8 dynamic per token)",
            "group_size": group_size if int4 else 0, "quantized_linears": len(names)}


def constant_methods(model, max_seq_len: int) -> dict:
    """The metadata methods of the ``.pte`` (see the module docstring)."""
    t = model.cfg.tokens
    eos = [int(t.eos_id)]
    bos = getattr(t, "bos_id", None)
    out = {"get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len,
           "get_vocab_size": int(model.cfg.llm.vocab_size), "get_eos_ids": eos, "use_kv_cache": True,
           "enable_dynamic_shape": True, "use_sdpa_with_kv_cache": False}
    if bos is not None:
        out["get_bos_id"] = int(bos)
    return out


def build_modules(model, max_seq_len: int, quantize: str, group_size: int = GROUP_SIZE) -> tuple[dict, dict]:
    """({method: module}, quantisation facts); the decoder works on a copy of the LLM when quantised,
    so ``model`` stays the fp32 reference."""
    modules = method_modules(model, max_seq_len)
    if quantize != "fp32":
        from .executorch_graphs import StaticCacheDecoder

        modules["text_decoder"] = StaticCacheDecoder(_LlmHolder(model.cfg, copy.deepcopy(model.llm)), max_seq_len).eval()
    facts = quantize_decoder(modules["text_decoder"], quantize, group_size)
    return modules, facts


class _LlmHolder:
    """What ``StaticCacheDecoder`` reads from a model: its config and its LLM."""

    def __init__(self, cfg, llm):
        self.cfg, self.llm = cfg, llm


def lower_to_pte(model, modules: dict, max_seq_len: int) -> tuple[bytes, dict]:
    """torch.export each method, lower to XNNPACK, serialise: (.pte bytes, facts)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        programs = {m: export_method(modules[m], model, m, max_seq_len) for m in METHODS}
        t1 = time.perf_counter()
        edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                           constant_methods=constant_methods(model, max_seq_len))
        delegated = {m: _delegated_calls(edge.exported_program(m)) for m in METHODS}
        program = edge.to_executorch()
    facts = {"torch_export_s": round(t1 - t0, 1), "lower_s": round(time.perf_counter() - t1, 1),
             "xnnpack_delegates": delegated}
    return program.buffer, facts


def _delegated_calls(program) -> int:
    """How many XNNPACK delegate calls a lowered method holds (0: everything runs in portable kernels)."""
    return sum(1 for n in program.graph.nodes if n.op == "call_function"
               and getattr(n.target, "__name__", "") == "executorch_call_delegate")
