"""The ``sfp`` command line: the parser, the subcommands, and the one error policy.

Each subcommand module (:mod:`sfp.cli.seg`, :mod:`sfp.cli.stats`, :mod:`sfp.cli.figures`,
:mod:`sfp.cli.demo`)
exposes ``register(subparsers)``, which adds its parsers with ``set_defaults(func=...)``;
``func(args) -> int`` runs the command and simply raises on failure. :func:`main` turns every
known error into one line ``sfp <command>: error: <message>`` and an exit code:

=============================================  =====
error                                          exit
=============================================  =====
:class:`sfp.models.loading.WeightsUnavailableError`  3
any other :class:`sfp.core.errors.SFPError`    2
``FileNotFoundError``, ``ValueError``          2
``KeyboardInterrupt`` (Ctrl-C)                 130
=============================================  =====

With ``-v`` the traceback is printed too; any other exception is a bug and shows its
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from sfp import __version__
from sfp.cli import demo, figures, seg, stats
from sfp.core.errors import SFPError

__all__ = ["build_parser", "exit_code", "main"]

_COMMANDS = (seg, stats, figures, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfp",
        description=(
            "SFP (Self-adaptive Feature Purification) for CLIP ViTs: open-vocabulary "
            "segmentation and tools to study attention outliers."
        ),
    )
    parser.add_argument("--version", action="version", version=f"sfp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log more detail (and show tracebacks of errors)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def exit_code(exc: BaseException) -> int | None:
    """The exit code of a known error (see the module docstring), None for a bug."""
    if isinstance(exc, SFPError):
        return exc.exit_code
    if isinstance(exc, (FileNotFoundError, ValueError)):
        return 2
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (SFPError, FileNotFoundError, ValueError, KeyboardInterrupt) as exc:
        code = exit_code(exc)
        assert code is not None
        if args.verbose:
            traceback.print_exception(exc)
        what = "interrupted." if isinstance(exc, KeyboardInterrupt) else f"error: {exc}"
        print(f"sfp {args.command}: {what}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
