"""Lazy attribute access for sfp's packages, so ``import sfp`` stays cheap.

``attach(__name__, submodules, exports)`` returns the ``__getattr__`` and ``__dir__`` of a
package: ``pkg.sub`` imports the submodule ``pkg.sub`` on first access, ``pkg.Name``
imports the module that defines ``Name`` (``exports = {"Name": "pkg.module"}``), and
``pkg.short`` returns a module that lives deeper (``modules = {"short": "pkg.layer.short"}``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def attach(
    package: str,
    submodules: Iterable[str],
    exports: Mapping[str, str] | None = None,
    modules: Mapping[str, str] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    subs = frozenset(submodules)
    names = dict(exports or {})
    shortcuts = dict(modules or {})

    def __getattr__(name: str) -> Any:
        if name in subs:
            return importlib.import_module(f"{package}.{name}")
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        if name in shortcuts:
            return importlib.import_module(shortcuts[name])
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(subs | set(names) | set(shortcuts))

    return __getattr__, __dir__
