"""Reading and writing ONNX files the bundle's way, for every ONNX exporter module (as
``gguf_io`` is for the GGUF writers): which files a graph is made of, where weights go (a
``<file>_data`` side file above EXTERNAL_DATA_BYTES, required near the 2 GB protobuf cap), and
re-saving what onnxruntime's tools wrote by that rule. ``onnx`` is imported by the functions only.
"""
from __future__ import annotations

import os
from pathlib import Path

LARGE_MODEL_BYTES = 1_800_000_000  # near the 2 GB protobuf cap: weights must go to a side file
# Graphs with more weight bytes than this keep them in <file>_data: required over 2 GB, and worth it
# above a few hundred MB: ONNX Runtime maps the file instead of parsing a copy (int4 mobilevlm-1.7b
# decoder: peak RSS 1.39 GB instead of 1.62 GB at the same decode speed).
EXTERNAL_DATA_BYTES = 256 * 2**20


def graph_files(path: str | os.PathLike) -> list[Path]:
    """The .onnx file and the external-data files its initializers point at."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    extra: list[Path] = []
    for init in iter_tensors(proto):
        if init.data_location == onnx.TensorProto.EXTERNAL:
            loc = next(e.value for e in init.external_data if e.key == "location")
            p = path.parent / loc
            if p not in extra:
                extra.append(p)
    return [path, *extra]


def iter_tensors(proto):
    """Initializers and Constant-node tensors of the main graph (where exporters put weights)."""
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.t.ByteSize():
                yield attr.t


def _tensor_bytes(proto) -> int:
    return sum(t.ByteSize() for t in iter_tensors(proto))


def is_large(path: str | Path) -> bool:
    return sum(p.stat().st_size for p in graph_files(path)) > LARGE_MODEL_BYTES


def save_model(proto, path: str | Path) -> list[Path]:
    """Save ``proto``; weights go to ``<file>_data`` above EXTERNAL_DATA_BYTES. Returns the files written."""
    import onnx

    path = Path(path)
    large = _tensor_bytes(proto) > EXTERNAL_DATA_BYTES
    if large:
        data = path.with_name(path.name + "_data")
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return graph_files(path)


def copy_graph(src: str | Path, dst: str | Path) -> list[Path]:
    """Re-save ``src`` as ``dst`` so that external data (if any) follows the bundle's naming."""
    import onnx

    return save_model(onnx.load(str(src)), dst)


def renormalise(path: str | Path) -> list[Path]:
    """onnxruntime's quantizers choose external data their own way; re-save by our rule if it differs."""
    files = graph_files(path)
    size = sum(f.stat().st_size for f in files)
    if len(files) == 1 and size <= EXTERNAL_DATA_BYTES:
        return files
    import onnx

    proto = onnx.load(str(path))
    for extra in files[1:]:
        extra.unlink()
    return save_model(proto, path)


def release_memory() -> None:
    """Hand freed heap memory back to the OS between export steps. A 1.7B export loads several
    multi-GB graphs one after another; glibc keeps their freed arenas, so without this the
    process's RSS ratchets up to the sum of them (the int8 export was killed at ~24 GB)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
