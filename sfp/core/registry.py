"""One registry mechanism for everything sfp looks up by name: detectors, encoder methods,
SFP presets, template sets.

An :class:`Entry` carries the registered object and its metadata: a display name for figure
labels, a one-line description for ``--help`` and docs, and its tunable :class:`Param`\\ s
(default and slider range). Sliders, CLI choices and figure labels read these instead of
restating them::

    DETECTORS.register("som", som, display="SOM", needs="attention",
                       params=(Param("top_k", 10, low=1, high=50),))
    DETECTORS.get("som").defaults()      # {"top_k": 10}
    DETECTORS.names()                     # ("som", ...)

Names are matched case-insensitively with "-" and "_" alike; unknown names raise
:class:`~sfp.core.errors.RegistryError` listing the registered names and close matches.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sfp.core.errors import RegistryError

__all__ = ["Entry", "Param", "Registry", "signature_defaults"]

T = TypeVar("T")


@dataclass(frozen=True)
class Param:
    """One tunable parameter of a registered object.

    default: its default value. low, high, step: the range a slider offers (numbers only);
    choices: the values a dropdown offers. doc: a few words for tooltips and ``--help``.
    """

    name: str
    default: Any
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    doc: str = ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object with its metadata (see the module docstring)."""

    name: str
    value: T
    display: str
    doc: str = ""
    params: tuple[Param, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        """``{param name: default}`` of the entry's parameters."""
        return {p.name: p.default for p in self.params}

    def param(self, name: str) -> Param:
        """The parameter called ``name`` (RegistryError naming the known ones if absent)."""
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise RegistryError(f"{self.display} has no parameter {name!r} (parameters: {known}).")

    def __getitem__(self, key: str) -> Any:
        """Metadata lookup: ``entry["needs"]``."""
        return self.meta[key]


def _key(name: Any, kind: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a {kind} is named by a string, got {type(name).__name__}.")
    return name.strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Named objects of one kind, in registration order (see the module docstring).

    kind: what the entries are, for messages ("detector", "encoder method", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        value: T,
        *,
        display: str | None = None,
        doc: str = "",
        params: Sequence[Param] = (),
        overwrite: bool = False,
        **meta: Any,
    ) -> Entry[T]:
        """Add ``value`` under ``name``; returns its :class:`Entry`.

        Raises RegistryError for an empty name, or a name already registered (unless
        ``overwrite``).
        """
        key = _key(name, self.kind)
        if not key:
            raise RegistryError(f"a {self.kind} name must not be empty.")
        if key in self._entries and not overwrite:
            raise RegistryError(
                f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it."
            )
        entry = Entry(name=name.strip(), value=value, display=display or name.strip(), doc=doc,
                      params=tuple(params), meta=dict(meta))
        self._entries[key] = entry
        return entry

    def get(self, name: str) -> Entry[T]:
        """The entry called ``name``; RegistryError with the known names and close matches."""
        key = _key(name, self.kind)
        entry = self._entries.get(key)
        if entry is None:
            names = self.names()
            close = difflib.get_close_matches(key, list(self._entries), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(self._entries[c].name) for c in close)}?" \
                if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(names) or 'none'}."
            )
        return entry

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(e.name for e in self._entries.values())

    def entries(self) -> tuple[Entry[T], ...]:
        return tuple(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name, self.kind) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> dict[str, Entry[T]]:
        """A copy of the table, for :meth:`restore` (tests register and then clean up)."""
        return dict(self._entries)

    def restore(self, snapshot: Mapping[str, Entry[T]]) -> None:
        self._entries = dict(snapshot)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def signature_defaults(fn: Callable[..., Any], skip: int = 1) -> dict[str, Any]:
    """Keyword defaults of ``fn`` after its first ``skip`` positional parameters."""
    out: dict[str, Any] = {}
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        if i < skip or p.default is inspect.Parameter.empty:
            continue
        out[p.name] = p.default
    return out
