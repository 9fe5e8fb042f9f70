"""``NeuronView``: where one image's outliers come from, and what removing them changes.

Top: the register neurons found on the image (:func:`sfp.core.neurons.outlier_sources`) in
``neuron_select``, a layer in ``layer_slider`` and an intervention in ``intervention``
(none / register neurons zeroed / test-time register). Panels: the max and median patch norm
per layer (the selected layer dashed), the selected neuron's activation map, the patch-norm map
and the class-token attention map of the selected layer, and, when ``classes`` are given, the
segmentation. Every intervention is computed once when the view is built (one forward each,
plus one segmentation each), so switching the intervention, the layer or the neuron only
redraws (``benchmarks/neuron_view_latency.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sfp.core import io
from sfp.core import neurons as nr
from sfp.core.probe import record
from sfp.viz.widgets._common import (
    SFPWidget,
    colorize_labels,
    describe_source,
    html_escape,
    label_colors,
    png_data_uri,
    static_copy,
)

__all__ = ["INTERVENTIONS", "NeuronView"]

#: The interventions the view offers: key -> label.
INTERVENTIONS = {"none": "original", "zero": "register neurons zeroed",
                 "ttr": "test-time register"}


class NeuronView(SFPWidget):
    """Register neurons of one image and interventions on them (see the module doc).

    Args:
        bundle: a loaded model. image: a path, (H, W, 3) array or (3, H, W) tensor in [0, 1].
        size: short side, then centre crop (default 224).
        neurons: the neurons to intervene on (default: the top 2 found on the image).
        top: neurons listed in ``neuron_select``.
        classes: class names for the segmentation panel (None: no segmentation).
        segmenter_kwargs: extra :class:`sfp.seg.pipeline.Segmenter` arguments.
    """

    def __init__(self, bundle: Any, image: Any, *, size: int = 224, neurons: Any = None,
                 top: int = 6, classes: str | Sequence[str] | None = None,
                 segmenter_kwargs: dict[str, Any] | None = None, height: int = 330) -> None:
        super().__init__()
        self.add_class("sfp-neuron-view")
        self.bundle = bundle
        rgb = io.load_image(image)
        rgb = io.center_crop(io.resize_short_side(rgb, size), size)
        self.rgb = (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        x = io.normalize(rgb, bundle)[None].to(bundle.device)
        src = nr.outlier_sources(bundle, x)
        self.sources = src
        self.found = src.register_neurons(top)
        self.neurons = nr.neuron_map(self.found[:2] if neurons is None else neurons)
        hooks = {"none": None, "zero": nr.ablate_neurons(self.neurons),
                 "ttr": nr.ttr_hooks(bundle, self.neurons)}
        self.traces = {k: record(bundle, x, heads="mean", store=("attention", "hidden", "mlp"),
                                 fwd_hooks=h) for k, h in hooks.items()}
        self.grid = self.traces["none"].grid
        self.num_layers = self.traces["none"].num_layers
        self.segmentations: dict[str, str] = {}  # PNG data URIs
        if classes is not None:
            from sfp.seg.pipeline import Segmenter

            kw = {"method": "clip", "short_side": size, "crop": size, "stride": size // 2,
                  **(segmenter_kwargs or {})}
            for k, h in hooks.items():
                seg = Segmenter(bundle, classes, fwd_hooks=h, **kw).predict(self.rgb)
                colors = label_colors(len(seg.class_names))
                self.segmentations[k] = png_data_uri(
                    colorize_labels(seg.labels.numpy(), colors, self.rgb))
        self._curves = {k: self._norm_curves(t) for k, t in self.traces.items()}
        self.layer_slider = widgets.IntSlider(value=self.num_layers - 1, min=1,
                                              max=self.num_layers, description="layer",
                                              continuous_update=True)
        options = [(f"layer {l} · neuron {n} · score {s:.3g}", (l, n)) for l, n, s in self.found]
        self.neuron_select = widgets.Dropdown(options=options, value=options[0][1],
                                              description="neuron")
        self.intervention = widgets.ToggleButtons(
            options=[(v, k) for k, v in INTERVENTIONS.items()], value="none",
            description="intervene")
        self.status = widgets.HTML()
        self.fig = self._build_figure(height)
        for w in (self.layer_slider, self.neuron_select, self.intervention):
            w.observe(lambda change: self.update(), names="value")
        self.update()
        caption = widgets.HTML(
            f"<b>Where outliers come from</b> · {html_escape(describe_source(bundle))} · "
            f"intervening on {html_escape(str(self.neurons))}")
        self.children = [caption, widgets.HBox([self.intervention]),
                         widgets.HBox([self.layer_slider, self.neuron_select]), self.fig,
                         self.status]

    # ---------------------------------------------------------------------------------------

    def _norm_curves(self, trace: Any) -> tuple[np.ndarray, np.ndarray]:
        n = self.grid[0] * self.grid[1]
        mx, md = [], []
        for layer in range(1, self.num_layers + 1):
            norms = trace.token_norms(layer)[0, 1 : 1 + n]
            mx.append(float(norms.max()))
            md.append(float(norms.median()))
        return np.array(mx), np.array(md)

    def _panels(self) -> list[str]:
        titles = ["norm per layer", "neuron", "norm ‖h‖", "cls attention"]
        return titles + (["segmentation"] if self.segmentations else [])

    def _build_figure(self, height: int) -> go.FigureWidget:
        titles = self._panels()
        fig = go.FigureWidget(make_subplots(rows=1, cols=len(titles), subplot_titles=titles,
                                            horizontal_spacing=0.04))
        layers = list(range(1, self.num_layers + 1))
        fig.add_trace(go.Scatter(x=layers, y=layers, name="max", mode="lines+markers"), 1, 1)
        fig.add_trace(go.Scatter(x=layers, y=layers, name="median", mode="lines"), 1, 1)
        fig.add_trace(go.Scatter(x=[1, 1], y=[1, 1], name="layer", mode="lines",
                                 line={"dash": "dash", "color": "grey"}), 1, 1)
        z = np.zeros(self.grid)
        for col, cs, meta in ((2, "Magma", "neuron"), (3, "Viridis", "norm"),
                              (4, "Hot", "cls")):
            fig.add_trace(go.Heatmap(z=z, colorscale=cs, showscale=False, meta=meta), 1, col)
            fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=col)
            fig.update_xaxes(showticklabels=False, row=1, col=col)
        if self.segmentations:
            fig.add_trace(go.Image(source=self.segmentations["none"]), 1, 5)
            fig.update_xaxes(showticklabels=False, row=1, col=5)
            fig.update_yaxes(showticklabels=False, row=1, col=5)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_layout(height=height, margin={"l": 30, "r": 10, "t": 40, "b": 30},
                          showlegend=False)
        return fig

    def update(self) -> None:
        """Redraw for the current controls (no forward)."""
        key = self.intervention.value
        layer = int(self.layer_slider.value)
        nl, nn = self.neuron_select.value
        trace = self.traces[key]
        n = self.grid[0] * self.grid[1]
        mx, md = self._curves[key]
        act = trace.mlp(nl)[0, 1 : 1 + n, nn].reshape(self.grid).numpy()
        norms = trace.token_norms(layer)[0, 1 : 1 + n].reshape(self.grid).numpy()
        cls = trace.mean_attention(layer)[0, 0, 1 : 1 + n].reshape(self.grid).numpy()
        ratio = float(norms.max() / np.median(norms))
        with self.fig.batch_update():
            d = self.fig.data
            d[0].y, d[1].y = mx, md
            d[2].x, d[2].y = [layer, layer], [float(md.min()) * 0.8, float(mx.max()) * 1.2]
            d[3].z, d[4].z, d[5].z = act, norms, cls
            if self.segmentations:
                d[6].source = self.segmentations[key]
        extra = ""
        if key == "ttr":
            reg = float(trace.token_norms(layer)[0, -1])
            extra = f" · register norm {reg:.3g}"
        self.status.value = (f"{INTERVENTIONS[key]} · layer {layer}: max / median patch norm "
                             f"{ratio:.3g}{extra}")

    def figure_widgets(self) -> list[go.FigureWidget]:
        return [self.fig]

    def to_figure(self) -> go.Figure:
        return static_copy(self.fig)
