"""Quantise an f16 LLM GGUF with llama.cpp's own quantiser (``llama_cpp.llama_model_quantize``).

Row-quantised types need each row length (a tensor's first dimension in ggml order) divisible by
the block size: 32 for q4_0/q8_0, 256 for the k-quants. llama.cpp quantises tensors that do not
fit with a fallback type (for k-quants a 32-block type), so a "q4_k_m" file can hold q5_0/q8_0
rows; ``tensor_types`` reports what each file really holds.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from edgevlm.runtime.errors import EdgeVLMError

# quant name -> llama.cpp LLAMA_FTYPE_MOSTLY_* value name
QUANT_TYPES = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


def check_quant_types(quants) -> list[str]:
    """Validated, de-duplicated, order kept."""
    out: list[str] = []
    for q in quants:
        q = str(q).lower()
        if q not in QUANT_TYPES:
            raise EdgeVLMError(f"unknown quant type {q!r}; valid: {', '.join(QUANT_TYPES)}")
        if q not in out:
            out.append(q)
    if not out:
        raise EdgeVLMError(f"no quant type given; valid: {', '.join(QUANT_TYPES)}")
    return out


def quantize(src: Path, dst: Path, quant: str, n_threads: int = 0) -> None:
    """``src`` (f16 GGUF) -> ``dst`` in ``quant``; EdgeVLMError if llama.cpp refuses."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not Path(dst).is_file():
        raise EdgeVLMError(f"llama.cpp could not quantise {src.name} to {quant} (status {rc})")


def tensor_types(path: Path) -> dict[str, int]:
    """ggml type name -> number of tensors of that type in a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def llama_cpp_versions() -> dict[str, str]:
    """llama-cpp-python's version and the llama.cpp version string its library reports."""
    import importlib.metadata

    import llama_cpp

    out = {"llama_cpp_python": importlib.metadata.version("llama_cpp_python")}
    try:
        out["llama_cpp"] = llama_cpp.llama_version().decode()
    except AttributeError:  # older bindings
        out["llama_cpp"] = "unknown"
    return out
