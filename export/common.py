"""What every exporter shares: model loading, tokenizer files, and (from the model layer's
``summary``) the manifest's model summary and library versions. (Named ``common`` so nothing here shadows a real library when a script in
export/ runs by path.)"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from edgevlm.runtime.errors import EdgeVLMError

from edgevlm.runtime.manifest import BundleWriter, FileEntry
from edgevlm.runtime.tokenizer import copy_tokenizer_files
from edgevlm.model.summary import base_manifest, library_versions, model_summary  # noqa: F401 (exporters' API)


def add_model_out_arguments(p) -> None:
    """The two arguments every exporter takes: the model to read and the bundle to write."""
    p.add_argument("--model", required=True, help="model dir or preset")
    p.add_argument("--out", required=True, help="bundle directory to write (written to a temp dir, "
                   "then renamed)")


def load_for_export(model: str, cli_overrides: Sequence[str] = (), **overrides: Any):
    """A model dir or preset, in fp32 eval mode, LoRA already merged (checkpoints store merged weights).

    ``cli_overrides``: ``key=value`` strings from the command line (``llm.num_hidden_layers=2``).
    """
    from edgevlm import load_model
    from edgevlm.runtime.configio import parse_key_values

    overrides.update(parse_key_values(cli_overrides))
    return load_model(model, **overrides).float().eval()


def require_exportable(model, target: str) -> None:
    """EdgeVLMError with the integrator's reason if ``model`` cannot be exported to ``target``."""
    from edgevlm.model.integrators import export_refusal

    name = model.cfg.integrator.name
    reason = export_refusal(name, target)
    if reason:
        raise EdgeVLMError(f"integrator {name!r} cannot be exported to {target}: {reason}")


def model_source(model: str) -> str | None:
    """The absolute model dir recorded in a manifest (None for presets)."""
    return str(Path(model).resolve()) if Path(model).is_dir() else None


def copy_tokenizer(model, writer: BundleWriter) -> list[FileEntry]:
    """The tokenizer travels with the bundle (the runtime's ``TOKENIZER_FILES``, as in a model dir;
    ``tokenizer.json`` is what the runtime reads)."""
    names = copy_tokenizer_files(model.tokenizer_dir, writer.dir)
    return [FileEntry(n, "tokenizer" if n == "tokenizer.json" else "tokenizer_extra") for n in names]
