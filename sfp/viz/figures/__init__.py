"""Analysis figures: see attention outliers in CLIP ViTs and what each SFP stage does.

Six families, each a matplotlib builder (static: PNG/SVG) and a plotly builder (interactive,
standalone offline HTML), computed from a :class:`sfp.core.probe.Trace` or a bundle and an image:

1. :func:`outlier_grid` — attention matrices and maps across layers, outlier masks and their
   removal (the released notebook's picture; supplement Fig. 1);
2. :func:`propagation`, :func:`norm_maps` — norms, class-token attention, detector counts and
   persistence per layer;
3. :func:`detector_agreement` — Jaccard overlap of som / l2 / lof / norm_z per layer;
4. :func:`stage_ablation` — CLIP, +SOM, +SOM+SAE, SFP and baselines side by side (paper
   Fig. 3);
5. :func:`layerwise_purification` (paper Fig. 5) and :func:`som_detections` (supplement
   Fig. 2);
6. :func:`outlier_sources_figure` — where outliers come from: top-3 activation magnitudes
   per layer, register-neuron maps, norm maps original / neurons zeroed / test-time
   registers; :func:`dataset_figure` draws an ``sfp stats`` file with seaborn.

Heavy work (forwards, detectors) lives in the ``*_data`` functions; the builders only draw,
so one computation feeds both the static and the interactive figure::

    view = image_view(bundle, "photo.jpg")
    trace = record(bundle, view.pixels)
    d = outlier_grid_data(trace, view.rgb, layers=[2, 4, 6, 8, 10])
    save_figure(outlier_grid(d), "out/grid")                      # out/grid.png, .svg
    write_plotly_page("out/grid.html", [("grid", outlier_grid_plotly(d))], title="grid")

:func:`render_image` writes all of them for one image (``sfp figures`` and ``sfp demo`` use
it). Every title names the paper figure, the model and weights (``bundle.label``) and the layers;
figures of :mod:`sfp.models.synthetic` models say "synthetic (planted outliers)".
"""

from sfp.viz.figures.ablation import (
    StageAblationData,
    stage_ablation,
    stage_ablation_data,
    stage_ablation_plotly,
)
from sfp.viz.figures.agreement import (
    AgreementData,
    agreement_data,
    detector_agreement,
    detector_agreement_plotly,
    jaccard,
)
from sfp.viz.figures.export import external_urls, save_figure, write_html_page, write_plotly_page
from sfp.viz.figures.layerwise import (
    LayerwiseData,
    SOMDetections,
    default_purification_layers,
    layerwise_data,
    layerwise_purification,
    layerwise_purification_plotly,
    som_detections,
    som_detections_data,
    som_detections_plotly,
)
from sfp.viz.figures.outlier_grid import (
    OutlierGridData,
    outlier_grid,
    outlier_grid_data,
    outlier_grid_plotly,
)
from sfp.viz.figures.propagation import (
    PropagationData,
    norm_maps,
    norm_maps_plotly,
    propagation,
    propagation_data,
    propagation_plotly,
)
from sfp.viz.figures.render import (
    FigureResult,
    ImageReport,
    render_image,
    render_som_detections,
)
from sfp.viz.figures.sources import (
    SourcesData,
    coactivation_clustermap,
    dataset_figure,
    neuron_coactivation,
    outlier_sources_data,
    outlier_sources_figure,
)
from sfp.viz.figures.style import SYNTHETIC_TAG, pca_rgb
from sfp.viz.figures.views import ImageView, default_layers, image_view

__all__ = [
    "SYNTHETIC_TAG",
    "AgreementData",
    "FigureResult",
    "ImageReport",
    "ImageView",
    "LayerwiseData",
    "OutlierGridData",
    "PropagationData",
    "SOMDetections",
    "SourcesData",
    "StageAblationData",
    "agreement_data",
    "default_layers",
    "coactivation_clustermap",
    "dataset_figure",
    "default_purification_layers",
    "detector_agreement",
    "detector_agreement_plotly",
    "external_urls",
    "image_view",
    "jaccard",
    "layerwise_data",
    "layerwise_purification",
    "layerwise_purification_plotly",
    "neuron_coactivation",
    "norm_maps",
    "norm_maps_plotly",
    "outlier_grid",
    "outlier_grid_data",
    "outlier_grid_plotly",
    "outlier_sources_data",
    "outlier_sources_figure",
    "pca_rgb",
    "propagation",
    "propagation_data",
    "propagation_plotly",
    "render_image",
    "render_som_detections",
    "save_figure",
    "som_detections",
    "som_detections_data",
    "som_detections_plotly",
    "stage_ablation",
    "stage_ablation_data",
    "stage_ablation_plotly",
    "write_html_page",
    "write_plotly_page",
]
