"""sfp.methods."""

from sfp._lazy import attach

__getattr__, __dir__ = attach(__name__, ("baselines","config","encoders","purify",))
