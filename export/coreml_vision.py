"""The Core ML vision encoder, and the tracing + conversion step both packages share.

    VisionEncoder.mlpackage   pixel_values [1, 3, S, S] fp16 -> image_features [1, M, D] fp16
                              (vision tower + integrator: features already in the LLM's embedding space)

``trace_and_convert`` turns converter failures on an op (one Core ML has no conversion for, say
``erfinv`` in an integrator, or one whose conversion fails) into an ``EdgeVLMError`` that names the
op, its module scope and the package being converted.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.graph_io import IMAGE_FEATURES, PIXEL_VALUES

# coremltools' torch frontend: the message of a missing op conversion, and the log line it writes
# (logger "coremltools") naming the op and its module scope whenever any op's conversion fails
_NOT_IMPLEMENTED = re.compile(r"convert function for op '([^']+)' not implemented")
_FAILED_AT = re.compile(r"converting '([^']+)' op \(located at: '([^']*)'\)")
_HINTS = {"int": "often a traced shape computation such as x.shape[-1] // 2; use a Python int instead"}


class _FailedOpLog(logging.Handler):
    """Remembers the last op coremltools reports as failed while this handler is attached."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.op: tuple[str, str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if m := _FAILED_AT.search(record.getMessage()):
            self.op = (m.group(1), m.group(2))


class VisionEncoder(nn.Module):
    """Vision tower + integrator: pixel_values [1, 3, S, S] -> image_features [1, M, D]."""

    def __init__(self, model):
        super().__init__()
        self.vision_tower = model.vision_tower
        self.integrator = model.integrator

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.integrator(self.vision_tower(pixel_values))  # [1, N, Dv] -> [1, M, D]


def conversion_error(exc: BaseException, failed: tuple[str, str] | None, what: str) -> EdgeVLMError | None:
    """An EdgeVLMError naming the op (and where it sits) when coremltools failed on one, else None."""
    import coremltools as ct

    m = _NOT_IMPLEMENTED.search(str(exc))
    op = m.group(1) if m else (failed[0] if failed else None)
    if op is None:
        return None
    where = f" (at {failed[1]})" if failed and failed[0] == op and failed[1] else ""
    if m:
        return EdgeVLMError(f"Core ML cannot convert op {op!r}{where} used by the {what}: coremltools "
                            f"{ct.__version__} has no conversion for it. Rewrite that part with supported ops "
                            "or register a composite op (coremltools' register_torch_op)")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    hint = f" ({_HINTS[op]})" if op in _HINTS else ""
    return EdgeVLMError(f"Core ML conversion of op {op!r}{where} in the {what} failed: {type(exc).__name__}: "
                        f"{first}{hint}")


def trace_and_convert(module: nn.Module, example: Sequence[torch.Tensor], inputs: list, outputs: list,
                      what: str, states: list | None = None, **convert_kwargs: Any):
    """``torch.jit.trace`` + ``ct.convert`` to an fp16 ML Program for iOS 18 (skip_model_load, so
    this works where Core ML cannot run). Unconvertible ops -> EdgeVLMError naming the op."""
    import coremltools as ct

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shape arithmetic (intended here)
        try:
            traced = torch.jit.trace(module.eval(), tuple(example), check_trace=False)
        except Exception as e:  # noqa: BLE001 -- untraceable Python in a user module
            raise EdgeVLMError(f"cannot trace the {what} for Core ML export: {type(e).__name__}: {e}") from e
        failed = _FailedOpLog()
        logging.getLogger("coremltools").addHandler(failed)
        try:
            return ct.convert(traced, inputs=inputs, outputs=outputs, states=states or None,
                              convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                              compute_precision=ct.precision.FLOAT16, skip_model_load=True,
                              **convert_kwargs)
        except Exception as e:  # noqa: BLE001 -- the converter raises bare RuntimeError/ValueError/...
            err = conversion_error(e, failed.op, what)
            if err is None:
                raise
            raise err from e
        finally:
            logging.getLogger("coremltools").removeHandler(failed)


def convert_vision(model):
    """Convert vision tower + integrator for one [1, 3, S, S] image."""
    import coremltools as ct

    s = model.cfg.vision.image_size
    example = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    inputs = [ct.TensorType(name=PIXEL_VALUES, shape=(1, 3, s, s), dtype=np.float16)]
    outputs = [ct.TensorType(name=IMAGE_FEATURES, dtype=np.float16)]
    what = f"vision encoder (integrator {model.cfg.integrator.name!r})"
    return trace_and_convert(VisionEncoder(model), [example], inputs, outputs, what)


def vision_io_spec(model) -> dict:
    s = model.cfg.vision.image_size
    return {"inputs": {PIXEL_VALUES: [1, 3, s, s]},
            "outputs": {IMAGE_FEATURES: [1, model.n_visual_tokens, model.cfg.llm.hidden_size]},
            "dtype": "float16"}
