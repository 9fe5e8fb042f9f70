"""sfp: Self-adaptive Feature Purification (SFP) for CLIP ViTs.

Also the instruments to study attention outliers: probes, detectors, figures and widgets.
The names below are imported lazily, so ``import sfp`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "sfp.models",
    "ModelBundle": "sfp.models",
    "WeightsUnavailableError": "sfp.models",
    "ModelLoadError": "sfp.models",
    "ImageError": "sfp.io",
    "load_image": "sfp.io",
    "record": "sfp.probe",
    "Trace": "sfp.probe",
    "embed_queries": "sfp.text",
    "SFPConfig": "sfp.config",
    "SFPEncoder": "sfp.purify",
    "make_encoder": "sfp.encoders",
    "Segmenter": "sfp.segment",
    "planted_model": "sfp.synthetic",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sfp' has no attribute {name!r}")
