"""Interactive views (ipywidgets + plotly ``FigureWidget``) for Jupyter.

- :class:`OutlierExplorer` — one image, one layer: attention / norm / detector-score maps,
  flagged tokens, click a patch to see where it attends.
- :class:`PropagationView` — layer-by-layer norm, class-token attention and outlier counts;
  select a token to follow it across layers.
- :class:`StageComparison` — segmentations of CLIP, +SOM, +SAE and full SFP side by side.
- :class:`ThresholdTuner` — sliders for SFP's thresholds with live segmentations and mIoU.
- :class:`NeuronView` — register neurons of one image; toggle zeroing them or a test-time
  register and watch the norms, class-token attention and segmentation.

Every widget exposes its controls as attributes (``explorer.layer_slider``, ...), so code and
tests can drive them, and has ``to_figure()``: a static plotly ``Figure`` of the current view
for exported HTML. Works in JupyterLab 4 and Notebook 7 (plotly >= 6 needs ``anywidget``).
Anything computed from :mod:`sfp.models.synthetic` is labelled "synthetic (planted outliers)".
See ``docs/widgets.md``.
"""

from sfp.viz.widgets._common import SYNTHETIC_LABEL, SFPWidget, describe_source
from sfp.viz.widgets.explorer import MAPS, OutlierExplorer
from sfp.viz.widgets.neurons import NeuronView
from sfp.viz.widgets.propagation import PropagationView
from sfp.viz.widgets.stages import StageComparison
from sfp.viz.widgets.tuner import ThresholdTuner

__all__ = [
    "MAPS",
    "NeuronView",
    "SYNTHETIC_LABEL",
    "OutlierExplorer",
    "PropagationView",
    "SFPWidget",
    "StageComparison",
    "ThresholdTuner",
    "describe_source",
]
