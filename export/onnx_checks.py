"""What an ONNX export does with its checks: ``--validate strict`` (the default) fails on the first
check against PyTorch that fails; ``--validate warn`` writes the bundle anyway and lists every
failed check in its manifest (``target_info.failed_checks``) and on stderr. The checks themselves
are ``onnx_validate`` (per graph), ``onnx_quant_check`` (quantised decoders) and ``token_check``.
"""
from __future__ import annotations

from pathlib import Path

from edgevlm.runtime.errors import EdgeVLMError

VALIDATE = ("strict", "warn")


def validate_mode(validate: str) -> str:
    if validate not in VALIDATE:
        raise EdgeVLMError(f"--validate must be one of {', '.join(VALIDATE)}, got {validate!r}")
    return validate


def failures_of(graph) -> list[str]:
    """The failed checks recorded on a source graph (dict) or a bundle graph (OnnxGraph)."""
    report = graph.get("validation_fp32", {}) if isinstance(graph, dict) else graph.validation
    return list(report.get("failures", []))


def check_tokens_recorded(model, writer, manifest, prompts: int, atol: float | None, judge: bool) -> None:
    """The token check of the staged bundle, recorded in its manifest (a failure too, unless ``judge``)."""
    from .token_check import check_tokens

    info = manifest.target_info
    try:
        info.token_check = check_tokens(model, writer.dir, manifest, prompts, atol, threads=1)
    except EdgeVLMError as e:
        if judge:
            raise
        info.failed_checks.append(str(e))


def warn_failed_checks(bundle: Path) -> None:
    """One line on stderr when a ``--validate warn`` export kept failed checks."""
    import sys

    from edgevlm.runtime.manifest import read_manifest

    failed = read_manifest(bundle, verify=False).target_info.failed_checks
    if failed:
        print(f"warning: {len(failed)} export check(s) failed and the bundle was kept (--validate warn); they "
              f"are listed in {Path(bundle) / 'manifest.json'} (target_info.failed_checks); first: {failed[0]}",
              file=sys.stderr)
