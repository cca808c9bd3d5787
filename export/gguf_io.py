"""What both GGUF writers share: tensor conversion and the write sequence of gguf-py's writer."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np


def to_numpy(t) -> np.ndarray:
    """A torch tensor as float32 numpy (the writers pick f16/f32 per tensor afterwards)."""
    return t.detach().float().cpu().numpy()


def write_gguf(path, arch: str, add_metadata: Callable, tensors: Iterable[tuple[str, np.ndarray]]) -> int:
    """Write a GGUF file: ``add_metadata(writer)`` then every (name, array); returns the tensor count."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    add_metadata(w)
    n = 0
    for name, arr in tensors:
        w.add_tensor(name, np.ascontiguousarray(arr))
        n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n
