"""A tiny name -> object registry, used for integrators, exporters and backends.

``modules`` (name -> module path) makes entries lazy: the first ``get`` of such a name imports the
module, which registers the name (``add``) as it is imported. ``provide`` adds a lazy entry later,
so a higher layer can offer an entry of its own in a low layer's registry without the low layer
naming it (the ``edgevlm`` package provides the runtime's ``torch`` backend from the model layer).
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, Mapping, TypeVar

from .errors import EdgeVLMError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. Duplicate names and unknown names raise clear errors."""

    def __init__(self, kind: str, hint: str = "", modules: Mapping[str, str] | None = None):
        self.kind = kind
        self.hint = hint  # appended to the unknown-name error
        self.modules = dict(modules or {})  # lazy entries: name -> the module that registers it
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def provide(self, name: str, module: str) -> None:
        """A lazy entry: ``module`` registers ``name`` when the first ``get`` imports it."""
        if self.modules.get(name, module) != module:
            raise ValueError(f"{self.kind} {name!r} is already provided by {self.modules[name]}")
        self.modules[name] = module

    def get(self, name: str) -> T:
        if name not in self._items and name in self.modules:
            self._import(name)
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none)"
            raise EdgeVLMError(f"unknown {self.kind} {name!r}; valid: {valid}" + (f"; {self.hint}" if self.hint
                                                                                   else "")) from None

    def _import(self, name: str) -> None:
        """Import the module that provides the lazy entry ``name``; it must register it."""
        module = self.modules[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise EdgeVLMError(f"{self.kind} {name!r} needs {module}, which cannot be imported here ({e})"
                               + (f"; {self.hint}" if self.hint else "")) from None
        if name not in self._items:
            raise RuntimeError(f"importing {module} did not register {self.kind} {name!r}")

    def names(self) -> list[str]:
        """Registered and lazy names, sorted."""
        return sorted({*self._items, *self.modules})

    def items(self) -> list[tuple[str, T]]:
        """(name, object) in registration order."""
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self.modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
