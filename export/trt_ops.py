"""Can TensorRT's ONNX parser take this graph? A static check against ``data/tensorrt_onnx_ops.yaml``.

The data file is the support matrix of onnx-tensorrt for the TensorRT release edgevlm targets on
Jetson (its source and version are recorded in the file). The check walks every node -- subgraphs
of If/Loop/Scan and local functions included -- and reports:

* operators the parser does not support, does not know, or that live in another domain
  (``com.microsoft.MatMulNBits`` from an ONNX Runtime int4 bundle, for example);
* an opset outside the parser's range;
* inputs the parser needs as build-time constants that are computed instead;
* Q/DQ zero points TensorRT cannot take (uint8 or non-zero: ONNX Runtime's default static int8).

Needs ``onnx`` (no TensorRT). Named ``trt_ops`` so that nothing here shadows a real library.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgevlm.runtime.errors import EdgeVLMError

DATA = Path(__file__).resolve().parent / "data" / "tensorrt_onnx_ops.yaml"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class OpSupport:
    """The parsed data file."""

    tensorrt: str
    opset_min: int
    opset_max: int
    domains: frozenset[str]
    supported: frozenset[str]
    unsupported: frozenset[str]
    constant_inputs: dict[str, tuple[int, ...]]
    zero_point_types: frozenset[str]
    source: dict

    def describe(self) -> str:
        src = self.source
        return (f"TensorRT {self.tensorrt}'s ONNX parser (export/data/tensorrt_onnx_ops.yaml, from onnx-tensorrt "
                f"{src['file']} @ {src['ref']})")


@functools.lru_cache(maxsize=4)
def load_support(path: str | Path = DATA) -> OpSupport:
    import yaml

    d = yaml.safe_load(Path(path).read_text())
    both = set(d["supported"]) & set(d["unsupported"])
    if both:
        raise ValueError(f"{path}: operators listed as supported and unsupported: {sorted(both)}")
    return OpSupport(
        tensorrt=str(d["tensorrt"]), opset_min=int(d["opset"]["min"]), opset_max=int(d["opset"]["max"]),
        domains=frozenset(d["domains"]), supported=frozenset(d["supported"]),
        unsupported=frozenset(d["unsupported"]),
        constant_inputs={k: tuple(v) for k, v in (d.get("constant_inputs") or {}).items()},
        zero_point_types=frozenset(d["quantization"]["zero_point_types"]), source=dict(d["source"]),
    )


def _load(graph):
    """An onnx.ModelProto from a path or a proto (weights are not needed for the op check, but zero
    points are small initializers that stay inline)."""
    import onnx

    if isinstance(graph, onnx.ModelProto):
        return graph
    return onnx.load(str(graph), load_external_data=False)


def iter_graphs(model) -> Iterator:
    """The main graph, every subgraph attribute (If/Loop/Scan bodies) and local function bodies."""
    import onnx

    stack = [model.graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)
    for fn in model.functions:
        yield fn


def op_types(graph) -> Counter:
    """Counter of (domain, op_type) over all nodes (local functions' own names excluded: a call to a
    local function is expanded by the parser, its body is what counts)."""
    model = _load(graph)
    local = {(f.domain, f.name) for f in model.functions}
    out: Counter = Counter()
    for g in iter_graphs(model):
        for n in g.node:
            if (n.domain, n.op_type) not in local:
                out[(n.domain or "ai.onnx", n.op_type)] += 1
    return out


def _constants(g) -> set[str]:
    names = {t.name for t in g.initializer}
    names |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return names


def _zero_point(g, node, inits: dict):
    """(dtype name, all zero) of a Q/DQ node's zero point; None when absent (means 0, int8)."""
    import onnx
    from onnx import numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return None
    t = inits.get(node.input[2])
    if t is None:
        return ("computed", False)
    return onnx.TensorProto.DataType.Name(t.data_type), not numpy_helper.to_array(t).any()


def check_graph(graph, support: OpSupport | None = None) -> list[str]:
    """Problems TensorRT's parser would have with ``graph`` (a path or ModelProto); [] when none."""
    support = support or load_support()
    model = _load(graph)
    problems = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not support.opset_min <= imp.version <= support.opset_max:
            problems.append(f"opset {imp.version} is outside TensorRT {support.tensorrt}'s range "
                            f"{support.opset_min}..{support.opset_max}")
    for (domain, op), count in sorted(op_types(model).items()):
        where = f"{op} (x{count})" if domain == "ai.onnx" else f"{domain}.{op} (x{count})"
        if domain not in support.domains:
            problems.append(f"{where}: custom-domain operator, TensorRT's parser has no importer for it")
        elif op in support.unsupported:
            problems.append(f"{where}: not supported by TensorRT {support.tensorrt}'s ONNX parser")
        elif op not in support.supported:
            problems.append(f"{where}: not in the support list of TensorRT {support.tensorrt}")
    problems += _check_nodes(model, support)
    return problems


def _check_nodes(model, support: OpSupport) -> list[str]:
    problems, bad_zp, n_qdq = [], Counter(), 0
    for g in iter_graphs(model):
        consts = _constants(g)
        inits = {t.name: t for t in g.initializer}
        for n in g.node:
            for i in support.constant_inputs.get(n.op_type, ()):
                if i < len(n.input) and n.input[i] and n.input[i] not in consts:
                    problems.append(f"{n.op_type} {n.name or n.output[0]!r}: input {i} ({n.input[i]}) must be a "
                                    "constant (initializer or Constant) for TensorRT's parser")
            if n.op_type in QDQ_OPS:
                n_qdq += 1
                zp = _zero_point(g, n, inits)
                if zp is not None and (zp[0] not in support.zero_point_types or not zp[1]):
                    bad_zp[zp[0] + ("" if zp[1] else " non-zero")] += 1
    if bad_zp:  # one line for a whole Q/DQ graph, not one per node
        kinds = ", ".join(f"{k} x{c}" for k, c in sorted(bad_zp.items()))
        problems.append(f"{sum(bad_zp.values())} of {n_qdq} Q/DQ nodes have zero points TensorRT cannot take "
                        f"({kinds}); it takes {'/'.join(sorted(support.zero_point_types))} zero points equal to 0")
    return _dedupe(problems)


def _dedupe(problems: list[str], keep: int = 3) -> list[str]:
    """At most ``keep`` messages per operator type (a graph may repeat one problem many times)."""
    seen: Counter = Counter()
    out = []
    for p in problems:
        kind = p.split(" ", 1)[0]
        seen[kind] += 1
        if seen[kind] <= keep:
            out.append(p)
        elif seen[kind] == keep + 1:
            out.append(f"... and more {kind} nodes like the above")
    return out


def quantization_kind(graph) -> str | None:
    """The explicit quantisation of a graph: None (no Q/DQ), or the Q/DQ element type -- "int8",
    "fp8", "int4", "uint8" (from the zero points; a Q/DQ pair without zero point is int8)."""
    model = _load(graph)
    kinds = set()
    for g in iter_graphs(model):
        inits = {t.name: t for t in g.initializer}
        for n in g.node:
            if n.op_type in QDQ_OPS:
                zp = _zero_point(g, n, inits)
                kinds.add("INT8" if zp is None else zp[0])
    if not kinds:
        return None
    names = {"INT8": "int8", "UINT8": "uint8", "INT4": "int4", "FLOAT8E4M3FN": "fp8"}
    for k in ("UINT8", "FLOAT8E4M3FN", "INT4", "INT8"):  # the most telling one first
        if k in kinds:
            return names[k]
    return sorted(kinds)[0].lower()  # e.g. "computed": a zero point that is not an initializer


def check_bundle(root: Path, manifest, graphs=("vision_encoder", "embed_tokens", "decoder"),
                 support: OpSupport | None = None) -> dict[str, list[str]]:
    """{graph: problems} for an ONNX bundle's graphs."""
    return {g: check_graph(Path(root) / manifest.file(g).path, support) for g in graphs}


def require_supported(report: dict[str, list[str]], support: OpSupport | None = None) -> None:
    """Raise one EdgeVLMError listing every problem of every graph TensorRT cannot parse."""
    support = support or load_support()
    bad = {g: p for g, p in report.items() if p}
    if not bad:
        return
    lines = [f"{g}: {p}" for g, ps in bad.items() for p in ps]
    text = " ".join(lines)
    hint = ""
    if any(k in text for k in ("MatMulInteger", "DynamicQuantizeLinear", "UINT8", "com.microsoft")):
        hint = ("; this ONNX bundle is made for ONNX Runtime (contrib operators or its int8/int4 quantisation): "
                "export a plain fp32 (or --dtype fp16) bundle and let TensorRT quantise (--precision int8)")
    raise EdgeVLMError(f"TensorRT cannot parse this bundle ({support.describe()}): " + "; ".join(lines) + hint)
