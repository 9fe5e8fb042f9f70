"""sfp.seg."""

from sfp._lazy import attach

__getattr__, __dir__ = attach(__name__, ("datasets","distributed","evaluate","metrics","pipeline",))
