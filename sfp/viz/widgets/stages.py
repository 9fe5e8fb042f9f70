"""``StageComparison``: segmentations of CLIP, +SOM, +SOM+SAE and full SFP side by side.

>>> StageComparison(bundle, "astronaut.png", "person; rocket; sky; grass")

Each panel segments the same image with :class:`sfp.seg.pipeline.Segmenter` (sliding windows,
post-processing) and one encoder. The default panels are the stage ladder of
:mod:`sfp.methods.stages` (``CLIP``, ``+SOM``, ``+SOM+SAE``, ``SFP``), the same stages the
stage-ablation figure shows.

Baselines (``"sclip"``, ``"naclip"``, ...) can be added with ``baselines=`` or the
``baselines_select`` control. The tokens SFP's detector flags (computed per sliding window on
the same crops) are drawn on every panel: as red circles on CLIP and the baselines (found,
not mitigated) and as red crosses on the SFP stages (mitigated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from sfp.core.io import load_image
from sfp.methods.config import SFPConfig
from sfp.methods.encoders import available_methods
from sfp.methods.purify import SFPEncoder
from sfp.methods.stages import stage_ladder
from sfp.seg.benchmarks import Settings
from sfp.seg.pipeline import Segmentation, Segmenter
from sfp.viz.widgets._common import (
    SFPWidget,
    describe_source,
    fixed_image_axes,
    html_escape,
    label_colors,
    labels_uri,
    static_copy,
    stopwatch,
    widget_settings,
)

__all__ = ["StageComparison", "legend_html"]

StageSpec = tuple[str, Any]
"""``(method, config)`` as :class:`sfp.seg.pipeline.Segmenter` takes them."""


def legend_html(class_names: Sequence[str], colors: np.ndarray, present: Sequence[int],
                extra: Mapping[int, str] | None = None) -> str:
    """HTML swatches of the classes ``present`` (``extra[c]`` is appended to class c's name)."""
    items = []
    for c in present:
        r, g, b = (int(v) for v in colors[c])
        note = f" {html_escape(extra[c])}" if extra and c in extra else ""
        items.append(
            f"<span style='display:inline-block;margin-right:12px'>"
            f"<span style='display:inline-block;width:12px;height:12px;background:rgb({r},{g},{b});"
            f"border:1px solid #333;vertical-align:middle'></span> "
            f"{html_escape(class_names[c])}{note}</span>"
        )
    return "".join(items)


class StageComparison(SFPWidget):
    """Side-by-side segmentations of SFP's stages (and chosen baselines) on one image.

    Args:
        bundle: the model (:func:`sfp.models.loading.load_model` or
            :func:`sfp.models.synthetic.planted_model`).
        image: a path, PIL image, (H, W, 3) array or (3, H, W) tensor in [0, 1].
        classes: anything :class:`sfp.seg.pipeline.Segmenter` takes (``"cat; dog; grass"``, ...).
        config: the full SFP configuration the stages are derived from (default official).
        stages: name -> (method, config); default the stage ladder of ``config``
            (:func:`sfp.methods.stages.stage_ladder`).
        baselines: extra encoder methods to show (e.g. ``("sclip", "naclip")``).
        templates: prompt templates of every panel's Segmenter (``"simple"``: one prompt per
            name, fast; None for the 80 OpenAI templates).
        settings: segmentation settings (default :data:`~sfp.viz.widgets._common.WIDGET_SETTINGS`:
            the released protocol with a 224 px short side); ``**overrides`` change single
            fields (``short_side=336``, ``logit_scale=50``, ...).
        panel_size: width of one panel in screen pixels (at most; panels shrink so that
            ``max_width`` holds two of them).
        max_width: screen pixels the figure may take (JupyterLab's output area is about
            1068 px wide): panels wrap onto further rows instead of overflowing it.
    """

    def __init__(
        self,
        bundle: Any,
        image: Any,
        classes: Any,
        *,
        config: SFPConfig | None = None,
        stages: Mapping[str, StageSpec] | None = None,
        baselines: Sequence[str] = (),
        templates: Any = "simple",
        settings: Settings | None = None,
        panel_size: int = 240,
        max_width: int = 1040,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.bundle = bundle
        self.config = SFPConfig.official() if config is None else config
        self.stages: dict[str, StageSpec] = dict(stages) if stages else {
            name: (method, cfg) for name, method, cfg in stage_ladder(self.config)}
        self.settings = widget_settings(settings, overrides, bundle)
        self.seg_kwargs: dict[str, Any] = {"templates": templates,
                                           **self.settings.as_kwargs()}
        self.classes = classes
        self.image = load_image(image)  # (3, H, W) in [0, 1]
        self.image_rgb = (self.image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        self.panel_size = int(panel_size)
        self.max_width = int(max_width)
        self.segmentations: dict[str, Segmentation] = {}
        self.timings: dict[str, float] = {}
        self._segmenters: dict[str, Segmenter] = {}

        choices = [m for m in available_methods() if m not in ("sfp", "clip")]
        unknown = [b for b in baselines if b not in choices]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; choose from {choices}")
        self.baselines_select = widgets.SelectMultiple(
            options=choices, value=tuple(baselines), description="baselines", rows=min(4, len(
                choices) or 1)
        )
        self.opacity_slider = widgets.FloatSlider(value=0.55, min=0.0, max=1.0, step=0.05,
                                                  description="opacity",
                                                  continuous_update=False)
        self.show_outliers_checkbox = widgets.Checkbox(value=True,
                                                       description="mark SFP's outliers")
        self.legend = widgets.HTML()
        self.status = widgets.HTML()

        self.outlier_points, self.outlier_patch_px = self._find_outliers()
        self.figure = go.FigureWidget()
        self._rebuild()

        self.baselines_select.observe(lambda _c: self._rebuild(), names="value")
        self.opacity_slider.observe(lambda _c: self.refresh(), names="value")
        self.show_outliers_checkbox.observe(lambda _c: self.refresh(), names="value")

        title = widgets.HTML(
            f"<b>{html_escape(describe_source(bundle))}</b> — SFP stage by stage "
            f"(config: <code>{html_escape(self.config.to_code())}</code>)"
        )
        controls = widgets.HBox([self.opacity_slider, self.show_outliers_checkbox,
                                 self.baselines_select])
        self.children = [title, controls, self.figure, self.legend, self.status]
        self.add_class("sfp-stage-comparison")

    # ------------------------------------------------------------------ computing
    @property
    def panels(self) -> list[str]:
        """Names of the panels shown, in order (stages, then the selected baselines)."""
        return [*self.stages, *self.baselines_select.value]

    def spec(self, name: str) -> StageSpec:
        """(method, config) of a panel."""
        return self.stages[name] if name in self.stages else (name, None)

    def segmenter(self, name: str) -> Segmenter:
        """The :class:`Segmenter` of a panel (built on first use)."""
        if name not in self._segmenters:
            method, config = self.spec(name)
            self._segmenters[name] = Segmenter(self.bundle, self.classes, method=method,
                                               config=config, **self.seg_kwargs)
        return self._segmenters[name]

    def segmentation(self, name: str) -> Segmentation:
        """The segmentation of a panel (computed on first use, then cached)."""
        if name not in self.segmentations:
            with stopwatch() as t:
                self.segmentations[name] = self.segmenter(name).predict(self.image)
            self.timings[name] = t[0]
        return self.segmentations[name]

    def _find_outliers(self) -> tuple[np.ndarray, tuple[float, float]]:
        """Centres (K, 2) x, y in original-image pixels of the patches SFP's detector flags,
        over the Segmenter's sliding windows, and the patch size (h, w) in original pixels."""
        if not self.config.som:
            return np.zeros((0, 2)), (1.0, 1.0)
        seg = self.segmenter(next(n for n, (m, _) in self.stages.items() if m == "sfp"))
        prep = seg.prepare(self.image)
        h, w = prep.pixels.shape[-2:]
        sy, sx = prep.size[0] / h, prep.size[1] / w
        encoder = SFPEncoder(self.bundle, self.config)
        p = self.bundle.patch_size
        points: list[tuple[float, float]] = []
        with torch.no_grad():
            for crops, windows in prep.batches(seg.batch_size):
                st = encoder.stages(crops)
                for idx, (y0, x0, _, _) in zip(st.indices, windows, strict=True):
                    for i in idx.tolist():
                        r, c = divmod(i, st.grid[1])
                        points.append(((x0 + (c + 0.5) * p) * sx, (y0 + (r + 0.5) * p) * sy))
        pts = np.unique(np.round(np.asarray(points, dtype=np.float64), 3), axis=0) if points \
            else np.zeros((0, 2))
        return pts, (p * sy, p * sx)

    # ------------------------------------------------------------------ drawing
    def grid_shape(self, n: int) -> tuple[int, int, int]:
        """(rows, columns, panel width in px) for ``n`` panels within ``max_width``: one row
        while ``n`` panels of ``panel_size`` fit, else as many columns as fit (panels shrunk
        to at least half of ``panel_size`` first), then further rows."""
        usable = max(1, self.max_width - 20)
        if n * self.panel_size <= usable:
            return 1, max(n, 1), self.panel_size
        panel = max(self.panel_size // 2, usable // max(n, 1))
        cols = max(1, min(n, usable // panel))
        if cols < n:  # wrapping anyway: keep the panels as large as the columns allow
            panel = min(self.panel_size, usable // cols)
        return -(-n // cols), cols, panel

    def _rebuild(self) -> None:
        """Recreate the figure for the current panel list."""
        names = self.panels
        for name in names:
            self.segmentation(name)
        n = len(names)
        h0, w0 = self.image_rgb.shape[:2]
        rows, cols, panel = self.grid_shape(n)
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=names,
                            horizontal_spacing=0.01, vertical_spacing=0.08 if rows > 1 else 0)
        for i, name in enumerate(names, start=1):
            row, col = divmod(i - 1, cols)
            row, col = row + 1, col + 1
            fig.add_trace(go.Image(source="", name=name, meta=f"image:{name}",
                                   hoverinfo="skip"), row=row, col=col)
            mitigated = self.spec(name)[0] == "sfp" and bool(
                getattr(self.spec(name)[1], "som", False))
            fig.add_trace(go.Scatter(
                x=[], y=[], mode="markers", meta=f"outliers:{name}",
                name="outliers (mitigated)" if mitigated else "outliers (found, not mitigated)",
                legendgroup="mitigated" if mitigated else "found",
                showlegend=False,
                marker=({"symbol": "x", "size": 9, "color": "#ff2d2d",
                         "line": {"width": 1, "color": "white"}} if mitigated else
                        {"symbol": "circle-open", "size": 10, "color": "#ff2d2d",
                         "line": {"width": 2, "color": "#ff2d2d"}}),
                hovertemplate="flagged patch<extra></extra>",
            ), row=row, col=col)
            fixed_image_axes(fig, i, h0, w0)
        width = panel * cols + 20
        fig.update_layout(width=width, height=rows * (int(panel * h0 / w0) + 40) + 70,
                          margin={"l": 10, "r": 10, "t": 70, "b": 10},
                          title={"text": describe_source(self.bundle), "font": {"size": 13}},
                          dragmode=False)
        new = go.FigureWidget(fig)
        if isinstance(getattr(self, "figure", None), go.FigureWidget) and self.children:
            self.children = tuple(new if c is self.figure else c for c in self.children)
        self.figure = new
        self.refresh()

    def refresh(self) -> None:
        """Redraw overlays and outlier marks (no recomputation)."""
        names = self.panels
        first = next(iter(self.segmentations.values()))
        colors = label_colors(max(s.num_classes for s in self.segmentations.values()),
                              first.class_names)
        alpha = self.opacity_slider.value
        show = self.show_outliers_checkbox.value
        by_meta = {t.meta: t for t in self.figure.data}
        pts = self.outlier_points
        present: set[int] = set()
        with self.figure.batch_update():
            for name in names:
                seg = self.segmentations[name]
                labels = seg.labels.cpu().numpy()
                present.update(int(c) for c in np.unique(labels))
                by_meta[f"image:{name}"].source = labels_uri(labels, colors, self.image_rgb,
                                                             alpha)
                m = by_meta[f"outliers:{name}"]
                m.x = pts[:, 0] if show and len(pts) else []
                m.y = pts[:, 1] if show and len(pts) else []
        first = next(iter(self.segmentations.values()))
        self.legend.value = legend_html(first.class_names, colors, sorted(present))
        times = ", ".join(f"{n}: {self.timings.get(n, 0):.2f} s" for n in names)
        self.status.value = (
            f"{len(pts)} patches flagged by {html_escape(self.config.detector)} "
            f"(crosses: mitigated by the panel's method; circles: found by SFP's detector but "
            f"left in by that method). "
            f"Segmentation time — {times}"
        )

    # ------------------------------------------------------------------ export
    def figure_widgets(self) -> list[go.FigureWidget]:
        return [self.figure]

    def to_figure(self) -> go.Figure:
        """The panels as a static ``go.Figure``."""
        return static_copy(self.figure)
