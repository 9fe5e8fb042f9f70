"""Segmentation: the one pipeline, the benchmark table, datasets, metrics, evaluation.

- :mod:`~sfp.seg.pipeline` — ``Segmenter`` (used by the CLI, the figures and the widgets);
- :mod:`~sfp.seg.benchmarks` — ``BENCHMARKS``: layout, classes, background, settings;
- :mod:`~sfp.seg.datasets` — readers; :mod:`~sfp.seg.metrics` — mIoU as mmseg computes it;
- :mod:`~sfp.seg.evaluate`, :mod:`~sfp.seg.distributed` — resumable, sharded evaluation.
"""

from sfp._lazy import attach

__getattr__, __dir__ = attach(
    __name__, ("benchmarks", "datasets", "distributed", "evaluate", "metrics", "pipeline")
)
