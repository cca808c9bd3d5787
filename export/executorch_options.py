"""The ExecuTorch export's options, without torch: the CLI's parser is built on machines (a Jetson)
that have none, so ``edgevlm export --help`` must not import the lowering code."""
from __future__ import annotations

from edgevlm.runtime.errors import EdgeVLMError

QUANTIZE = ("fp32", "8da4w", "int8")
GROUP_SIZE = 32  # 8da4w weight group (every LLaMA width here is a multiple of it)


def check_quantize(quantize: str, group_size: int = GROUP_SIZE) -> str:
    if quantize not in QUANTIZE:
        raise EdgeVLMError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if group_size < 1 or group_size & (group_size - 1):
        raise EdgeVLMError(f"--group-size must be a power of two, got {group_size}")
    return quantize
