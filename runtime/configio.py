"""Nested dataclasses <-> plain dicts / YAML, and generic ``key=value`` overrides.

Used for model configs, training recipes and benchmark matrices, so every config in the project
reads, writes and overrides the same way. The runtime reads bundle manifests through ``from_dict``,
so PyYAML, imported here, is one of the runtime's dependencies (setup.cfg's install_requires).
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from .errors import EdgeVLMError

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """Dataclass (possibly nested) -> plain dict/list/scalars, ready for JSON or YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and not isinstance(value, tp):
        return from_dict(tp, value, where)  # a mapping, or an error naming ``where``
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin in (list, dict) and not isinstance(value, (list, tuple) if origin is list else dict):
        raise EdgeVLMError(f"config {where}: expected a {'list' if origin is list else 'mapping'}, "
                           f"got {type(value).__name__}")
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, arg = typing.get_args(tp) or (Any, Any)
        return {k: _convert(arg, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:  # Optional[X]: checked as X
            return _convert(args[0], value, where)
        for arg in args:
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value, where)
            if typing.get_origin(arg) is tuple and isinstance(value, (list, tuple)):
                return tuple(value)
    if tp in (int, float, bool, str):
        return _scalar(tp, value, where)
    return value


def _scalar(tp: type, value: Any, where: str) -> Any:
    """Coerce YAML/CLI scalars to the annotated type (``lr=1e-3`` reads as a string in YAML 1.1)."""
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    try:
        if tp is float and not isinstance(value, bool):
            return float(value)
        if tp is int and not isinstance(value, (bool, float)):
            return int(value)
        if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    except ValueError:
        pass
    raise EdgeVLMError(f"config {where}: expected {tp.__name__}, got {value!r}")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Plain dict -> dataclass ``cls``; unknown keys are an error naming the key."""
    if not isinstance(data, dict):
        raise EdgeVLMError(f"config {where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise EdgeVLMError(
            f"config {where or cls.__name__}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
        )
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise EdgeVLMError(f"config {where or cls.__name__}: missing key(s) {', '.join(missing)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def load_yaml(cls: type[T], path: str | Path) -> T:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise EdgeVLMError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise EdgeVLMError(f"config file {path} is not valid YAML: {e}") from None
    return from_dict(cls, data, where=str(path))


def dump_yaml(obj: Any, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def parse_key_values(items: Iterable[str], what: str = "override") -> dict[str, Any]:
    """``["lr=1e-3", "lora.enabled=true"]`` -> ``{"lr": 0.001, "lora.enabled": True}``: values
    parsed as YAML scalars, an empty value as ``""``; ``what`` names the option in errors."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise EdgeVLMError(f"{what} {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
    return out


def apply_overrides(obj: T, overrides: list[str] | dict[str, Any]) -> T:
    """Return a copy of dataclass ``obj`` with dotted ``key=value`` overrides applied.

    Values are parsed as YAML scalars (``lr=1e-3``, ``lora.enabled=true``, ``stop=[a, b]``).
    """
    items = overrides if isinstance(overrides, dict) else parse_key_values(overrides)
    data = to_dict(obj)
    for key, value in items.items():
        node: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = _child(node, p, key)
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = value
            continue
        if not isinstance(node, dict) or (last not in node and not _is_free_dict(obj, parts)):
            raise EdgeVLMError(f"override {key!r}: unknown key {last!r}")
        node[last] = value
    return from_dict(type(obj), data)


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict) or part not in node:
        raise EdgeVLMError(f"override {key!r}: no config section {part!r}")
    return node[part]


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise EdgeVLMError(f"override {key!r}: {part!r} is not an index below {len(node)}")
    return int(part)


def _is_free_dict(obj: Any, parts: list[str]) -> bool:
    """True when the parent of ``parts[-1]`` is a free-form dict field (e.g. integrator kwargs)."""
    node = obj
    for p in parts[:-1]:
        if dataclasses.is_dataclass(node):
            node = getattr(node, p, None)
        elif isinstance(node, list) and p.isdigit():
            node = node[int(p)]
        else:
            node = (node or {}).get(p)
    return isinstance(node, dict)
