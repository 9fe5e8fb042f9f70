"""sfp.core."""

from sfp._lazy import attach

__getattr__, __dir__ = attach(__name__, ("errors","forward","hooks","io","outliers","probe","registry",))
