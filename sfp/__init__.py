"""sfp: Self-adaptive Feature Purification (SFP) for CLIP ViTs.

Also the instruments to study attention outliers: probes, detectors, figures and widgets.
The package is layered, each layer building only on the ones before it::

    sfp.core     the visual forward with hook points, probes, outlier detectors, registries
    sfp.models   loading CLIP models, text queries, the planted-outlier model
    sfp.methods  dense encoders (SFP and baselines), SFP presets, the stage ladder
    sfp.seg      the segmentation pipeline, benchmarks, metrics, evaluation
    sfp.viz      figures, widgets, the demo report
    sfp.cli      the ``sfp`` command line

Everything here is imported lazily (``import sfp`` stays cheap): ``sfp.core.probe`` or
``sfp.record`` import their module on first use. The most used modules also have short
names: ``sfp.io``, ``sfp.probe``, ``sfp.hooks``, ``sfp.neurons``, ``sfp.outliers``, ``sfp.text``,
``sfp.synthetic``, ``sfp.figures`` and ``sfp.widgets`` are ``sfp.core.io`` and so on.
"""

from __future__ import annotations

from sfp._lazy import attach

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "sfp.models.loading",
    "ModelBundle": "sfp.models.loading",
    "WeightsUnavailableError": "sfp.models.loading",
    "ModelLoadError": "sfp.models.loading",
    "SFPError": "sfp.core.errors",
    "ImageError": "sfp.core.io",
    "load_image": "sfp.core.io",
    "hook_names": "sfp.core.forward",
    "run_with_hooks": "sfp.core.forward",
    "record": "sfp.core.probe",
    "Trace": "sfp.core.probe",
    "embed_queries": "sfp.models.text",
    "planted_model": "sfp.models.synthetic",
    "SFPConfig": "sfp.methods.config",
    "SFPEncoder": "sfp.methods.purify",
    "make_encoder": "sfp.methods.encoders",
    "Segmenter": "sfp.seg.pipeline",
}

# Short names for modules that live one layer down (``sfp.io`` is ``sfp.core.io``).
_MODULES = {
    "io": "sfp.core.io",
    "probe": "sfp.core.probe",
    "hooks": "sfp.core.hooks",
    "neurons": "sfp.core.neurons",
    "outliers": "sfp.core.outliers",
    "text": "sfp.models.text",
    "synthetic": "sfp.models.synthetic",
    "figures": "sfp.viz.figures",
    "widgets": "sfp.viz.widgets",
}

__all__ = ["__version__", *_EXPORTS]

__getattr__, __dir__ = attach(__name__, ("core", "models", "methods", "seg", "viz", "cli"),
                              _EXPORTS, _MODULES)
