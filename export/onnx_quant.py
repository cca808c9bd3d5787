"""Variants of the fp32 graphs: fp16, int8 (dynamic for the decoder's MatMuls, static QDQ for the
vision graph), int4 weight-only (MatMulNBits) for the decoder, and ``.ort`` files for ONNX
Runtime Mobile. All through onnxruntime's own tools; each function reads one .onnx path and writes
another (weights in ``<file>_data`` above EXTERNAL_DATA_BYTES).
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.graph_io import PIXEL_VALUES

from .onnx_io import graph_files, is_large, renormalise, save_model


@dataclass(frozen=True)
class Int8Format:
    """How the int8 graphs store their integers, and on which CPUs ONNX Runtime computes them exactly."""

    name: str
    weight_type: str  # "uint8" (asymmetric per-channel) | "int8" (symmetric per-channel)
    reduce_range: bool  # 7-bit weights
    accurate_on: str
    note: str

    def to_dict(self) -> dict:
        return {"target": self.name, "activation_type": "uint8", "weight_type": self.weight_type,
                "reduce_range": self.reduce_range, "per_channel": True,
                "weight_symmetric": self.weight_type == "int8", "vision_format": "QDQ (static, MinMax)",
                "decoder_format": "operator (dynamic: DynamicQuantizeLinear + MatMulInteger)",
                "accurate_on": self.accurate_on, "note": self.note}


# Measured with benchmarks/int8_formats.py on the tiny model (relative L2 error vs PyTorch on an
# AVX-512 VNNI host / the same binary under qemu -cpu Haswell, AVX2 only): u8u8 decoder 0.023 / 0.023,
# vision 0.011 / 0.011; u8s8 7-bit 0.037 / 0.037, 0.017 / 0.017; u8s8 8-bit 0.025 / 0.095, 0.012 / 0.080.
INT8_FORMATS = {f.name: f for f in (
    Int8Format("portable", "uint8", False, "every CPU ONNX Runtime supports (x86 with or without VNNI, Arm)",
               "u8 x u8: ONNX Runtime's x86 kernels widen to 16 bits before multiplying (no saturation); "
               "the most accurate of the three everywhere, a little slower than u8 x s8 on VNNI CPUs"),
    Int8Format("reduce-range", "int8", True, "every CPU ONNX Runtime supports",
               "u8 x s7: 7-bit weights keep AVX2's 16-bit pair sums in range; u8 x s8 kernel speed on every "
               "x86 CPU, about 1.5x the error of portable"),
    Int8Format("vnni", "int8", False, "x86 with VNNI (AVX512-VNNI, AVX-VNNI, AMX) and Arm",
               "u8 x s8 full range: the fastest on VNNI CPUs; on x86 without VNNI (AVX2, AVX-512F) ONNX "
               "Runtime's VPMADDUBSW kernels saturate and the error grows 4-7x"),
)}
DEFAULT_INT8 = "portable"

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations (fastest on CPU)
ORT_CONFIG = "required_operators_and_types.config"


@contextlib.contextmanager
def quiet_logs():
    """onnxruntime's tools log advice and progress through the root logger; keep errors only."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in (
        "onnxruntime.quantization.matmul_nbits_quantizer", "ort_format_model.utils"))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_fp16(src: str | Path, dst: str | Path) -> list[Path]:
    """All float tensors and float graph inputs/outputs in fp16 (the KV cache too: half the memory).
    Ops ONNX Runtime has no fp16 kernel for stay fp32 behind Casts (the converter's block list)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(src))
    with quiet_logs():
        proto16 = convert_float_to_float16(proto, keep_io_types=False, disable_shape_infer=is_large(src))
    return save_model(proto16, dst)


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def quantize_int8_dynamic(src: str | Path, dst: str | Path, fmt: Int8Format = INT8_FORMATS[DEFAULT_INT8]) -> list[Path]:
    """Dynamic int8 for MatMuls with constant weights (per-channel weights in ``fmt``; uint8
    activations quantised at run time). Attention's activation x activation MatMuls stay fp32."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    with quiet_logs():
        quantize_dynamic(str(src), str(dst), weight_type=_quant_type(fmt.weight_type), op_types_to_quantize=["MatMul"],
                         per_channel=True, reduce_range=fmt.reduce_range, use_external_data_format=is_large(src),
                         extra_options={"MatMulConstBOnly": True,
                                        # shape inference cannot type outputs of com.microsoft ops (GQA)
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})
    return renormalise(dst)


class PixelReader(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over preprocessed images (float32 [1, 3, S, S] each)."""

    def __init__(self, pixels: Sequence[np.ndarray], input_name: str = PIXEL_VALUES):
        self._it = iter([{input_name: np.ascontiguousarray(p, dtype=np.float32)} for p in pixels])

    def get_next(self) -> dict | None:
        return next(self._it, None)


def quantize_int8_static(src: str | Path, dst: str | Path, pixels: Sequence[np.ndarray],
                         fmt: Int8Format = INT8_FORMATS[DEFAULT_INT8]) -> list[Path]:
    """Static int8 QDQ (uint8 activations, per-channel weights in ``fmt``) for the MatMuls with weights,
    activation ranges calibrated (MinMax) on ``pixels`` -- real dataset images, preprocessed the
    way the runtime will. Attention's activation x activation MatMuls stay fp32: quantising them
    (and the softmax output) cost ~6x more error on the trained fixture model for ~10% of the FLOPs."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not pixels:
        raise EdgeVLMError("static int8 quantisation needs at least one calibration image")
    large = is_large(src)
    with tempfile.TemporaryDirectory(prefix="edgevlm-qdq-") as tmp, quiet_logs():
        pre = Path(tmp) / "pre.onnx"  # symbolic shape inference + basic fusions, as ORT recommends
        quant_pre_process(str(src), str(pre), save_as_external_data=large, all_tensors_to_one_file=True)
        graph = onnx.load(str(pre), load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        act_x_act = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
        quantize_static(str(pre), str(dst), PixelReader(pixels), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=_quant_type(fmt.weight_type),
                        per_channel=True, reduce_range=fmt.reduce_range,
                        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=act_x_act,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large,
                        calibration_providers=["CPUExecutionProvider"],
                        extra_options={"CalibTensorRangeSymmetric": False, "WeightSymmetric": fmt.weight_type == "int8"})
    return renormalise(dst)


def quantize_int4(src: str | Path, dst: str | Path, block_size: int = INT4_BLOCK_SIZE,
                  accuracy_level: int = INT4_ACCURACY_LEVEL) -> list[Path]:
    """Weight-only int4 (symmetric, per ``block_size`` along K) as com.microsoft MatMulNBits,
    for every MatMul with a constant weight (LM head included)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level)
    with quiet_logs():
        q.process()
    return save_model(q.model.model, dst)


def to_ort_format(graphs: Iterable[str | Path], out_dir: str | Path, target_platform: str = "arm") -> list[Path]:
    """``.ort`` files for ONNX Runtime Mobile plus the reduced-operator config (operators and types
    the graphs need: the input of a reduced ORT build, ``--include_ops_by_config``)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="edgevlm-ort-") as tmp:
        src, dst = Path(tmp) / "onnx", Path(tmp) / "ort"
        src.mkdir()
        for g in graphs:
            if is_large(g):
                raise EdgeVLMError(f"{Path(g).name} is over 2 GB; the .ort format (flatbuffers) cannot hold it: "
                                   "quantise the decoder (--quantize int4 or int8) to use --ort-format")
            for f in graph_files(g):
                shutil.copy2(f, src / f.name)
        with quiet_logs():
            convert_onnx_models_to_ort(src, output_dir=dst, optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform=target_platform, enable_type_reduction=True)
        written = []
        for f in sorted(dst.iterdir()):
            if f.suffix == ".ort" or f.name.endswith(".config"):
                name = ORT_CONFIG if f.name.endswith(".config") else f.name
                shutil.copy2(f, out_dir / name)
                written.append(out_dir / name)
    if not any(f.suffix == ".ort" for f in written):
        raise EdgeVLMError("ONNX Runtime's converter wrote no .ort files")
    return written
