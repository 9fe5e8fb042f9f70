"""sfp.cli."""

from sfp.cli.app import main

__all__ = ["main"]
