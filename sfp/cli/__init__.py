"""The ``sfp`` command line (see :mod:`sfp.cli.app`)."""

from sfp.cli.app import main

__all__ = ["main"]
