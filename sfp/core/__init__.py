"""The foundation: the visual forward with hook points, probes, detectors, registries.

- :mod:`~sfp.core.forward` — the one forward of an open_clip ViT; ``run_with_hooks``;
- :mod:`~sfp.core.hooks` — hook-point names and hook sets;
- :mod:`~sfp.core.probe` — ``record(...) -> Trace``;
- :mod:`~sfp.core.neurons` — register neurons, massive channels, interventions;
- :mod:`~sfp.core.outliers` — detectors (``DETECTORS``), mitigation, layer statistics;
- :mod:`~sfp.core.registry` — the one registry mechanism; :mod:`~sfp.core.errors` — errors;
- :mod:`~sfp.core.io` — image loading and normalisation.
"""

from sfp._lazy import attach

__getattr__, __dir__ = attach(
    __name__, ("errors", "forward", "hooks", "io", "neurons", "outliers", "probe", "registry")
)
