"""A tiny name -> object registry, used for integrators, exporters and backends."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import EdgeVLMError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. Duplicate names and unknown names raise clear errors."""

    def __init__(self, kind: str, hint: str = ""):
        self.kind = kind
        self.hint = hint  # appended to the unknown-name error
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

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise EdgeVLMError(f"unknown {self.kind} {name!r}; valid: {valid}" + (f"; {self.hint}" if self.hint
                                                                                   else "")) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) in registration order."""
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
