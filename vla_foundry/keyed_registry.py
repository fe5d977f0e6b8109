"""A table of classes keyed by a string, filled by a class decorator.

The model registry, the batch-handler registry, the params classes and the pipelines are
each one of these, so duplicate and unknown keys fail the same way everywhere.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from vla_foundry.errors import unknown_key_error

C = TypeVar("C")


class KeyedRegistry(Generic[C]):
    def __init__(self, kind: str, fix: str = "", key_attribute: str = ""):
        self.kind = kind
        self.fix = fix
        self.key_attribute = key_attribute  # set on each registered class to its key
        self._table: dict[str, C] = {}

    def register(self, key: str) -> Callable[[C], C]:
        if not isinstance(key, str) or not key:
            raise ValueError(f"{self.kind} key must be a non-empty string; got {key!r}")

        def decorator(cls: C) -> C:
            if key in self._table:
                owner = self._table[key]
                raise ValueError(f"{self.kind} {key!r} is already registered (by {owner.__module__}."
                                 f"{owner.__qualname__}); each key may be registered once")
            if self.key_attribute:
                setattr(cls, self.key_attribute, key)
            self._table[key] = cls
            return cls

        return decorator

    def get(self, key: str) -> C:
        if key not in self._table:
            raise unknown_key_error(self.kind, key, list(self._table), self.fix)
        return self._table[key]

    def keys(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, key: object) -> bool:
        return key in self._table
