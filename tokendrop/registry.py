"""A small typed registry: one per kind of thing (methods, adapters), with did-you-mean errors."""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

from .checks import UsageError, UsageTypeError

T = TypeVar("T")


def did_you_mean(name: str, choices) -> str:
    """' Did you mean 'x'?' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str):
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        if not isinstance(name, str):
            raise UsageTypeError(f"{self.kind} must be given by name (a str), got {type(name).__name__}")
        if name not in self._entries:
            raise UsageError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)} "
                f"Valid choices: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self):
        return self._entries.items()
