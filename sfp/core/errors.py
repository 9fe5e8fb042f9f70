"""The errors sfp raises for bad input, and the exit code each one means on the command line.

Every error a user can cause (a wrong argument, a missing file, weights that cannot be
found) is an :class:`SFPError`; its message is one sentence that says what was wrong and what
to do. The command line prints that message and exits with the error's ``exit_code``; only
unexpected errors (bugs) print a traceback. Most subclasses also derive from the built-in
exception of their kind (``ValueError``, ``FileNotFoundError``, ``KeyError``), so code that
catches those keeps working.
"""

from __future__ import annotations

__all__ = ["SFPError", "HookError", "InputError", "RegistryError"]


class SFPError(Exception):
    """Base class of sfp's user-facing errors. ``exit_code`` is the CLI's exit status."""

    exit_code: int = 2


class InputError(SFPError, ValueError):
    """Images given to the visual tower have the wrong type, shape or size."""


class RegistryError(SFPError, ValueError):
    """An unknown name was asked of a registry, or a name was registered twice."""


class HookError(SFPError, ValueError):
    """A hook name does not exist, or a hook returned something that cannot replace the
    tensor at its hook point."""
