"""How far a correct ONNX export's fp32 and fp16 graphs stray from PyTorch, and how far damaged ones do.

The export checks (``export/onnx_validate.py``: ``TOLERANCES``) must pass every correct export on
every CPU class and thread count, and fail every damaged one. This measures both sides on one
model, so the bounds can be set from data with a stated margin:

    python benchmarks/export_noise.py --model tiny --out benchmarks/results/export_noise/tiny.jsonl
    python benchmarks/export_noise.py --model mobilevlm-1.7b --out benchmarks/results/export_noise/mobilevlm-1.7b.jsonl

Noise: the fp32 graphs (vision, embeddings, the traced decoder and the GroupQueryAttention decoder
that quantised bundles build on) and the fp16 ones, each run by ONNX Runtime and PyTorch on the
export validation's own cases, for every pair of thread counts (1 and all cores, on both sides:
summation order follows the thread split). Damage: the same checks on a decoder with one weight
matrix perturbed (noise of 5% of its std) and on vision graphs exported from a tower that selects
the wrong layer or keeps CLS instead of the last patch. Each JSONL row is one (graph, variant,
threads, case) with the largest |ort - torch|, the relative L2 error and the reference's scale,
and whether the current ``TOLERANCES`` pass it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import types
from pathlib import Path


def thread_pairs() -> list[tuple[int, int]]:
    n = os.cpu_count() or 1
    counts = sorted({1, n})
    return [(t, o) for t in counts for o in counts]


def measure_graph(model, graph: str, path: Path, variant: str, label: str, gqa: bool = False,
                  pairs: list[tuple[int, int]] | None = None) -> list[dict]:
    """One row per (torch threads, ort threads, case) for ``path`` against the torch module."""
    import torch

    from edgevlm.export.onnx_validate import validate_graph

    rows = []
    saved = torch.get_num_threads()
    for torch_threads, ort_threads in pairs or thread_pairs():
        torch.set_num_threads(torch_threads)
        report = validate_graph(model, graph, path, variant, gqa=gqa, judge=False, threads=ort_threads,
                                per_output=True)
        for case, c in report["cases"].items():
            rows.append({"graph": label, "checked_as": graph, "variant": variant, "torch_threads": torch_threads,
                         "ort_threads": ort_threads, "case": case, **c})
    torch.set_num_threads(saved)
    return rows


def noise_rows(model, work: Path) -> list[dict]:
    from edgevlm.export import onnx_quant as q
    from edgevlm.export.onnx_graphs import build_gqa_decoder, export_graphs
    from edgevlm.export.onnx_io import release_memory

    graphs = export_graphs(model, work / "fp32")
    rows = []
    for name, info in graphs.items():
        rows += measure_graph(model, name, info["path"], "fp32", name)
        fp16 = work / "fp16" / Path(info["path"]).name
        fp16.parent.mkdir(exist_ok=True)
        q.to_fp16(info["path"], fp16)
        rows += measure_graph(model, name, fp16, "fp16", name)
        release_memory()
    gqa = work / "gqa" / "decoder_model_merged.onnx"
    gqa.parent.mkdir()
    build_gqa_decoder(model, gqa)
    rows += measure_graph(model, "decoder", gqa, "fp32", "decoder_gqa", gqa=True)
    return rows


def damage_rows(model, work: Path) -> list[dict]:
    """The checks on damaged exports, at all-core threads (the export's own setting)."""
    import shutil

    import torch

    from edgevlm.export.onnx_graphs import export_graphs
    from edgevlm.export.onnx_io import copy_graph

    n = os.cpu_count() or 1
    pairs = [(n, 0)]
    rows = []
    decoder = work / "damaged" / "decoder_model_merged.onnx"
    decoder.parent.mkdir(parents=True)
    copy_graph(work / "fp32" / "decoder_model_merged.onnx", decoder)
    perturb_largest_weight(decoder, rel=0.05)
    rows += measure_graph(model, "decoder", decoder, "fp32", "decoder: one weight perturbed 5%", pairs=pairs)
    shutil.rmtree(decoder.parent)
    for kind, label in VISION_DAMAGE.items():
        with damaged_vision(model.vision_tower, kind), torch.no_grad():
            path = export_graphs(model, work / "damaged", graphs=("vision_encoder",))["vision_encoder"]["path"]
        rows += measure_graph(model, "vision_encoder", path, "fp32", label, pairs=pairs)
        shutil.rmtree(work / "damaged")
    return [{**r, "damaged": True} for r in rows]


VISION_DAMAGE = {"select_layer": "vision: select layer off by one", "cls": "vision: CLS kept, last patch dropped"}


@contextlib.contextmanager
def damaged_vision(tower, kind: str):
    """The vision tower, damaged the way an exporter can get it wrong (``VISION_DAMAGE``), inside
    the block: an export made there is a damaged export of the unchanged model."""
    saved = tower.layers_used
    if kind == "select_layer":
        tower.layers_used -= 1
    else:
        _keep_cls(tower)
    try:
        yield tower
    finally:
        tower.layers_used = saved
        tower.__dict__.pop("forward", None)


def _keep_cls(tower) -> None:
    """A tower whose features are positions 0..N-1 (CLS first) instead of 1..N: the off-by-one slice."""
    def forward(self, pixel_values):  # [B, 3, H, W] -> [B, N, Dv]
        vm = self.vision_tower.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(self.dtype)))  # [B, 1 + N, Dv]
        for layer in vm.encoder.layers[: self.layers_used]:
            h = layer(h, None, None)[0]
        return h[:, :-1]

    tower.forward = types.MethodType(forward, tower)


def perturb_largest_weight(path: Path, rel: float = 0.05, seed: int = 0) -> str:
    """Damage an ONNX file in place: Gaussian noise of ``rel`` x its std on the largest 2-D float
    weight (a MatMul weight, not an embedding table gathered by id). Returns the tensor's name."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    gathered = {n.input[0] for n in proto.graph.node if n.op_type == "Gather"}
    floats = [t for t in proto.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT
              and t.name not in gathered]
    t = max(floats, key=lambda t: t.dims[0] * t.dims[1])
    w = numpy_helper.to_array(t)
    w = w + np.random.default_rng(seed).standard_normal(w.shape).astype(w.dtype) * rel * w.std()
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save_model(proto, str(path), save_as_external_data=external, location=Path(path).name + ".data")
    return t.name


def summarize(rows: list[dict]) -> list[str]:
    """Per graph and variant: the worst case over threads and cases, and its error over the bound."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["graph"], r["variant"]), []).append(r)
    lines = [f"{'graph':38s} {'variant':7s} {'rel L2':>9s} {'|d|/scale':>9s} {'/bound':>8s} passed"]
    for (graph, variant), rs in groups.items():
        worst = {k: max(r[k] for r in rs) for k in ("rel_l2_all", "max_rel_all", "bound_ratio")}
        lines.append(f"{graph:38s} {variant:7s} {worst['rel_l2_all']:9.3g} {worst['max_rel_all']:9.3g} "
                     f"{worst['bound_ratio']:8.3g} {sum(r['passed'] for r in rs)}/{len(rs)}")
    return lines


def rejudge(row: dict) -> float:
    """A stored row's ``bound_ratio`` under the ``TOLERANCES`` in force now (every output)."""
    from edgevlm.export.onnx_validate import TOLERANCES, bound_ratio

    tol = TOLERANCES[row["variant"]][row["checked_as"]]
    return max(bound_ratio(tol, err) for err in row["outputs"].values())


def gate(rows: list[dict], margin: float) -> list[str]:
    """What breaks the checks' promise: a correct export within ``margin`` of its bound (or over
    it), a damaged one under ``margin`` times its bound."""
    bad = [f"correct {r['graph']} {r['variant']} {r['case']} at {r['bound_ratio']:.3g} of its bound"
           for r in rows if not r.get("damaged") and r["bound_ratio"] > 1 / margin]
    return bad + [f"damaged {r['graph']} {r['case']} at only {r['bound_ratio']:.3g} x its bound"
                  for r in rows if r.get("damaged") and r["bound_ratio"] < margin]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="preset or model dir")
    p.add_argument("--out", required=True, help="JSONL file (replaced)")
    p.add_argument("--no-damage", action="store_true", help="measure the correct export only")
    p.add_argument("--margin", type=float, default=5.0,
                   help="exit 1 unless every correct export is under 1/MARGIN of its bound and every damaged "
                        "one over MARGIN times it (default 5)")
    args = p.parse_args(argv)

    import torch

    from edgevlm import load_model
    from edgevlm.runtime.hostcpu import cpu_class

    model = load_model(args.model).eval()
    meta = {"model": args.model, "cpu_class": cpu_class(), "cores": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="export-noise-") as tmp, torch.no_grad():
        rows = noise_rows(model, Path(tmp))
        if not args.no_damage:
            rows += damage_rows(model, Path(tmp))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({**meta, **r}) + "\n" for r in rows))
    print("\n".join(summarize(rows)))
    print(f"wrote {out} ({len(rows)} rows)")
    problems = gate(rows, args.margin)
    print("\n".join(problems) or f"gate: every correct export within 1/{args.margin:g} of its bound, every "
          f"damaged one over {args.margin:g} x")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
