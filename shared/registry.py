"""One registry-by-name helper for models and strategies (as Opacus' `create_accountant`).

A second registration under a taken name is an error, so two plug-ins cannot silently replace
each other; an unknown name is an error listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Factories by name; `kind` ("model", "strategy") names them in errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make `factory` available as `name` (lower case); refuses a taken name."""
        key = name.lower()

        def add(factory: T) -> T:
            taken = self._factories.get(key)
            if taken is not None and taken is not factory:
                raise ValueError(f"{self.kind} name {name!r} is already registered to {taken!r}")
            self._factories[key] = factory
            return factory

        return add

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._factories[key]

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._factories
