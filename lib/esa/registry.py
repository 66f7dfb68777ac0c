"""One registry shape for every extension point: named entries, each with a one-line definition.

A `Registry` is a read-only mapping from name to entry (so `name in R`, `R[name]`, `", ".join(R)` read as
they would on a dict), plus `register`, which refuses a second entry under a name already taken, and
`lookup`, which turns an unknown name into the standard one-line `EsaError` listing the accepted ones.
Metrics, perturbations, controls, pruning methods, attacks, roles, protections and models all use it, so
adding a method is one `register(...)` call wherever the method lives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from esa.errors import unknown

T = TypeVar("T")


class DuplicateEntry(ValueError):
    """A second entry under a name a registry already holds (a programming error, not a bad input)."""


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind, in registration order.

    `kind` names the entries in errors ("metric", "pruning method"). An entry's definition is the
    `definition=` given to `register`, else `describe(entry)` when the registry has one (entries whose
    one-line text has another name, e.g. a role's `hypothesis`), else the entry's own `definition` attribute.
    `base`, when given, is checked on every entry (a wrong type is caught at import, not at use).
    """

    def __init__(self, kind: str, entries: Iterable[T] = (), *, base: type | tuple[type, ...] | None = None,
                 key: Callable[[T], str] = lambda e: e.name,  # type: ignore[attr-defined]
                 describe: Callable[[T], str] | None = None) -> None:
        self.kind = kind
        self._base = base
        self._key = key
        self._describe = describe
        self._entries: dict[str, T] = {}
        self._definitions: dict[str, str] = {}
        for e in entries:
            self.register(e)

    def register(self, entry: T, name: str | None = None, definition: str | None = None) -> T:
        """Add `entry` under `name` (default: the entry's name); returns it, so it works as a decorator."""
        name = self._key(entry) if name is None else name
        if name in self._entries:
            raise DuplicateEntry(f"{self.kind} {name!r} is registered already; pick another name")
        if self._base is not None and not isinstance(entry, self._base):
            raise TypeError(f"{self.kind} {name!r} is a {type(entry).__name__}, not a {self._base}")
        self._entries[name] = entry
        if definition is None:
            definition = self._describe(entry) if self._describe else getattr(entry, "definition", None)
        if definition:
            self._definitions[name] = str(definition)
        return entry

    @contextlib.contextmanager
    def patched(self, entry: T, name: str | None = None, definition: str | None = None) -> Iterator[T]:
        """`entry` under `name` for the length of a with-block (a new name, or a stand-in for a registered
        one), then the registry exactly as it was: what tests use instead of writing into the mapping."""
        name = self._key(entry) if name is None else name
        saved = (self._entries.copy(), self._definitions.copy())
        self._entries.pop(name, None)
        self._definitions.pop(name, None)
        try:
            yield self.register(entry, name, definition)
        finally:
            self._entries, self._definitions = saved

    def lookup(self, name: str) -> T:
        """The entry, or one EsaError naming the unknown value and the accepted ones."""
        if name not in self._entries:
            raise unknown(self.kind, name, self._entries)
        return self._entries[name]

    def definition(self, name: str) -> str:
        self.lookup(name)
        return self._definitions.get(name, "")

    def definitions(self) -> dict[str, str]:
        return {n: self._definitions.get(n, "") for n in self._entries}

    def names(self) -> list[str]:
        return list(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def merged(kind: str, *parts: Mapping[str, T]) -> Registry[T]:
    """One registry holding every entry of `parts` (a name in two of them is a DuplicateEntry)."""
    out: Registry[T] = Registry(kind, key=lambda e: "")
    for part in parts:
        for name, entry in part.items():
            d = part.definition(name) if isinstance(part, Registry) else None
            out.register(entry, name, d or None)
    return out
