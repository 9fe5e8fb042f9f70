"""``PropagationView``: how outliers appear and persist, layer by layer.

Left: curves over the layers of one recorded image — the largest and median patch-token norm,
the largest (and median) class-token attention to a patch, and how many patches each detector
flags. Right: a map of one layer (token norm or class-token attention), chosen with
``layer_slider``; a dashed line on the curves marks that layer. Selecting a token (click it on
the map, or :meth:`PropagationView.select_token`) draws its own norm and class-token attention
on the curves and marks, on a fourth panel, the layers at which each detector flags it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from sfp.core.outliers import LayerStats, available_detectors, get_detector, layer_statistics
from sfp.models.loading import OPENAI_MEAN, OPENAI_STD
from sfp.viz.widgets._common import (
    SFPWidget,
    bind_trace,
    describe_source,
    html_escape,
    image_axes,
    patch_at,
    patch_centers,
    png_data_uri,
    static_copy,
)
from sfp.viz.widgets.explorer import layer_slider_for

__all__ = ["PropagationView"]

_MAPS = {"norm": "token norm ‖h‖", "cls": "class-token attention (mean over heads)"}
_DETECTOR_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
#: (dash, marker, width) per detector position: lines that lie on top of each other (l2 and
#: lof both flag 10 per layer) stay visible, the wider ones drawn first.
_DETECTOR_LINES = (("solid", "circle", 4.0), ("dash", "square", 3.0), ("dot", "triangle-up", 2.2),
                   ("dashdot", "diamond", 1.6), ("longdash", "x", 1.4), ("solid", "cross", 1.2))
#: One legend per subplot row (plotly's legend, legend2, ...), beside its row.
_LEGEND_Y = {1: 1.0, 2: 0.66, 3: 0.33}
_SELECT_COLOR = "#e6ab02"


class PropagationView(SFPWidget):
    """Layer-by-layer outlier statistics of one image of a trace, with a layer map.

    Args:
        trace: a :class:`sfp.core.probe.Trace` with hidden states (and attention, for the
            class-token curves and the ``"som"`` detector) of the layers to show.
        image: optional image under the map (see :class:`sfp.viz.widgets.OutlierExplorer`).
        index: which image of the trace's batch.
        detectors: detectors whose counts are drawn (default: every registered one the trace
            has inputs for).
        params: optional ``{detector: {param: value}}`` for the detectors.
        truth: optional ground-truth outlier mask drawn on the map.
        layer: initial layer of the map (default: the second to last recorded).
    """

    def __init__(
        self,
        trace: Any,
        image: Any = None,
        *,
        index: int = 0,
        detectors: Sequence[str] | None = None,
        params: Mapping[str, Mapping[str, Any]] | None = None,
        truth: Any = None,
        layer: int | None = None,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        size: int = 380,
    ) -> None:
        super().__init__()
        n = bind_trace(self, trace, index, truth, image, mean, std)
        if not trace.has_hidden:
            raise ValueError(
                "PropagationView needs hidden states; record(bundle, images, "
                "store=('attention', 'hidden'))"
            )
        self.layers = list(trace.layers)
        if detectors is None:
            detectors = [
                d for d in available_detectors()
                if get_detector(d).needs == "hidden" or self.has_attention
            ]
        params = dict(params or {})
        if "lof" in detectors and "lof" not in params and n <= 30:
            params["lof"] = {"n_neighbors": max(1, n - 2)}
        self.detectors = list(detectors)
        self.stats: LayerStats = layer_statistics(trace, self.layers, self.detectors, params)
        self.selected_token: int | None = None

        self._cls, self._norms = self._per_layer_curves()
        self._make_controls(layer, n)

        self.curves = go.FigureWidget(self._build_curves())
        self.map_figure = go.FigureWidget(self._build_map(size))
        self._curve = {t.meta: t for t in self.curves.data}
        self._map = {t.meta: t for t in self.map_figure.data}
        self._map["map"].on_click(self._on_click)
        if "image" in self._map:
            self._map["image"].on_click(self._on_click)

        for w in (self.layer_slider, self.map_dropdown, self.mark_dropdown):
            w.observe(lambda _c: self.refresh(), names="value")
        self.token_input.observe(self._on_token_input, names="value")
        self.clear_button.on_click(lambda _b: self.select_token(None))

        title = widgets.HTML(f"<b>{html_escape(describe_source(trace))}</b> — propagation of "
                             "outliers across layers")
        controls = widgets.HBox([self.layer_slider, self.map_dropdown, self.mark_dropdown,
                                 self.token_input, self.clear_button],
                                layout=widgets.Layout(flex_flow="row wrap"))
        self.children = [title, controls, widgets.HBox([self.curves, self.map_figure]),
                         self.status]
        self.add_class("sfp-propagation-view")
        self.refresh()

    def _per_layer_curves(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(class-token attention (L, N) or None, patch norms (L, N)) of the shown image."""
        b, trace = self.index, self.trace
        cls = None
        if self.has_attention:
            cls = torch.stack([trace.cls_attention(l).mean(1)[b] for l in self.layers])
            cls = cls.float().cpu().numpy()
        norms = torch.stack([trace.token_norms(l)[b, 1:] for l in self.layers])
        return cls, norms.float().cpu().numpy()

    def _make_controls(self, layer: int | None, n: int) -> None:
        layer = layer if layer is not None else (
            self.layers[-2] if len(self.layers) > 1 else self.layers[0]
        )
        self.layer_slider = layer_slider_for(self.layers, int(layer))
        maps = [k for k in _MAPS if self.has_attention or k == "norm"]
        self.map_dropdown = widgets.Dropdown(options=[(_MAPS[k], k) for k in maps],
                                             value="norm", description="map")
        self.mark_dropdown = widgets.Dropdown(options=["none", *self.detectors],
                                              value=self.detectors[0] if self.detectors
                                              else "none", description="mark")
        self.token_input = widgets.BoundedIntText(value=-1, min=-1, max=n - 1,
                                                  description="token (-1 = none)",
                                                  style={"description_width": "initial"})
        self.clear_button = widgets.Button(description="clear selection")
        self.status = widgets.HTML()

    # ------------------------------------------------------------------ data
    @property
    def layer(self) -> int:
        return int(self.layer_slider.value)

    def token_curves(self, token: int) -> dict[str, np.ndarray]:
        """Per-layer values of one patch: ``norm`` (L,), ``cls`` (L,) (NaN without attention),
        and ``flagged_<detector>`` (L,) bool."""
        out = {"norm": self._norms[:, token]}
        out["cls"] = (self._cls[:, token] if self._cls is not None
                      else np.full(len(self.layers), np.nan))
        for d in self.detectors:
            out[f"flagged_{d}"] = self.stats.masks[d][:, self.index, token].cpu().numpy()
        return out

    def map_values(self) -> np.ndarray:
        """(gh, gw) values of the map at the current layer."""
        i = self.layers.index(self.layer)
        src = self._norms if self.map_dropdown.value == "norm" else self._cls
        assert src is not None
        return src[i].reshape(self.grid)

    # ------------------------------------------------------------------ figures
    def _build_curves(self) -> go.Figure:
        rows = 4
        fig = make_subplots(
            rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.05,
            row_heights=[0.3, 0.3, 0.22, 0.18],
            subplot_titles=("patch-token norm", "class-token attention to a patch",
                            "outliers flagged (count)", "selected token flagged by"),
        )
        x = self.layers
        st, b = self.stats, self.index
        fig.add_trace(go.Scatter(x=x, y=st.max_norm[:, b].cpu().numpy(), name="max norm",
                                 meta="max_norm", mode="lines+markers", legend="legend",
                                 line={"color": "#444"}), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=st.median_norm[:, b].cpu().numpy(), name="median norm",
                                 meta="median_norm", mode="lines", legend="legend",
                                 line={"color": "#999", "dash": "dot"}), row=1, col=1)
        if self._cls is not None:
            fig.add_trace(go.Scatter(x=x, y=self._cls.max(1), name="max cls attention",
                                     meta="max_cls", mode="lines+markers", legend="legend2",
                                     line={"color": "#444"}), row=2, col=1)
            fig.add_trace(go.Scatter(x=x, y=np.median(self._cls, 1), name="median cls attn.",
                                     meta="median_cls", mode="lines", legend="legend2",
                                     line={"color": "#999", "dash": "dot"}), row=2, col=1)
        n = self.grid[0] * self.grid[1]
        for i, d in enumerate(self.detectors):
            color = _DETECTOR_COLORS[i % len(_DETECTOR_COLORS)]
            dash, symbol, width = _DETECTOR_LINES[i % len(_DETECTOR_LINES)]
            fig.add_trace(go.Scatter(x=x, y=st.counts[d][:, b].cpu().numpy(), name=f"{d} kept",
                                     meta=f"count_{d}", mode="lines+markers", legend="legend3",
                                     line={"color": color, "dash": dash, "width": width},
                                     marker={"symbol": symbol, "size": 5 + width}),
                          row=3, col=1)
            passed = st.passed.get(d)
            if passed is not None and (passed[:, b] > st.counts[d][:, b]).any() \
                    and not (passed[:, b] >= n).all():
                fig.add_trace(go.Scatter(x=x, y=passed[:, b].cpu().numpy(), legend="legend3",
                                         name=f"{d}: passed its criterion",
                                         meta=f"count_passed_{d}", mode="lines+markers",
                                         line={"color": color, "dash": "dot", "width": 1},
                                         marker={"symbol": "x-thin-open", "size": 6}),
                              row=3, col=1)
            fig.add_trace(go.Scatter(x=[], y=[], name=f"flagged by {d}", meta=f"flag_{d}",
                                     mode="markers", showlegend=False,
                                     marker={"symbol": "square", "size": 10, "color": color}),
                          row=4, col=1)
        sel = {"color": _SELECT_COLOR, "width": 3}
        fig.add_trace(go.Scatter(x=[], y=[], name="selected token", meta="sel_norm",
                                 mode="lines+markers", line=sel, legend="legend"), row=1, col=1)
        fig.add_trace(go.Scatter(x=[], y=[], name="selected token (cls attn.)", meta="sel_cls",
                                 mode="lines+markers", line=sel, showlegend=False),
                      row=2, col=1)
        fig.update_yaxes(type="category", categoryorder="array",
                         categoryarray=list(self.detectors), row=4, col=1)
        fig.update_xaxes(title_text="layer (output of block l)", dtick=1, row=rows, col=1)
        fig.update_layout(
            width=700, height=640, margin={"l": 50, "r": 10, "t": 40, "b": 40},
            **_row_legends(),
            shapes=[{"type": "line", "xref": "x", "yref": "paper", "x0": 0, "x1": 0,
                     "y0": 0, "y1": 1, "line": {"dash": "dash", "color": "#888", "width": 1}}],
        )
        return fig

    def _build_map(self, size: int) -> go.Figure:
        h, w = self.image_size
        gh, gw = self.grid
        ph, pw = self.patch_px
        data: list[Any] = []
        if self.image_rgb is not None:
            data.append(go.Image(source=png_data_uri(self.image_rgb), meta="image", name="image",
                                 hoverinfo="skip"))
        data.append(go.Heatmap(
            z=np.zeros((gh, gw)), x0=pw / 2, dx=pw, y0=ph / 2, dy=ph, meta="map", name="map",
            colorscale="Viridis", opacity=0.65 if self.image_rgb is not None else 1.0,
            customdata=np.arange(gh * gw).reshape(gh, gw),
            hovertemplate="token %{customdata}<br>%{z:.4g}<extra></extra>",
            colorbar={"thickness": 10},
        ))
        ms = max(6, min(20, int(0.5 * size / max(gh, gw))))
        data.append(go.Scatter(x=[], y=[], mode="markers", meta="flagged", name="flagged",
                               customdata=[], marker={"symbol": "x", "size": ms,
                                                      "color": "#ff2d2d"}))
        if self.truth is not None:
            idx = np.flatnonzero(self.truth)
            tx, ty = patch_centers(idx, self.grid, self.patch_px)
            data.append(go.Scatter(x=tx, y=ty, mode="markers", meta="truth",
                                   name="planted (ground truth)", customdata=idx,
                                   marker={"symbol": "circle-open", "size": ms + 6,
                                           "color": "#00e5ff", "line": {"width": 2}}))
        data.append(go.Scatter(x=[], y=[], mode="markers", meta="selected", name="selected",
                               customdata=[], marker={"symbol": "square-open", "size": ms + 8,
                                                      "color": _SELECT_COLOR,
                                                      "line": {"width": 2}}))
        fig = go.Figure(data=data)
        fig.update_layout(width=size + 80, height=int(size * h / w) + 110,
                          margin={"l": 10, "r": 10, "t": 60, "b": 10},
                          xaxis={"range": [0, w]}, yaxis={"range": [h, 0]},
                          legend={"orientation": "h", "y": -0.02, "yanchor": "top"},
                          dragmode=False)
        image_axes(fig)
        return fig

    # ------------------------------------------------------------------ update
    def refresh(self) -> None:
        """Redraw the map, the layer line and the selected token's curves."""
        layer_i = self.layers.index(self.layer)
        z = self.map_values()
        det = self.mark_dropdown.value
        flagged = (np.flatnonzero(self.stats.masks[det][layer_i, self.index].cpu().numpy())
                   if det != "none" else np.array([], dtype=np.int64))
        fx, fy = patch_centers(flagged, self.grid, self.patch_px)
        with self.map_figure.batch_update():
            self._map["map"].z = z
            self._map["flagged"].x, self._map["flagged"].y = fx, fy
            self._map["flagged"].customdata = flagged
            self._map["flagged"].name = f"flagged by {det}"
            self.map_figure.layout.title.text = (
                f"{describe_source(self.trace)}<br><sup>layer {self.layer}: "
                f"{_MAPS[self.map_dropdown.value]}</sup>"
            )
            self._draw_selected_on_map()
        with self.curves.batch_update():
            self.curves.layout.shapes[0].x0 = self.layer
            self.curves.layout.shapes[0].x1 = self.layer
            self._draw_selected_curves()
        self.status.value = self._status_html(flagged)

    def _draw_selected_on_map(self) -> None:
        t = self.selected_token
        m = self._map["selected"]
        if t is None:
            m.x, m.y, m.customdata = [], [], []
        else:
            sx, sy = patch_centers([t], self.grid, self.patch_px)
            m.x, m.y, m.customdata = sx, sy, [t]

    def _draw_selected_curves(self) -> None:
        t = self.selected_token
        c = self._curve
        if t is None:
            c["sel_norm"].x, c["sel_norm"].y = [], []
            c["sel_cls"].x, c["sel_cls"].y = [], []
            for d in self.detectors:
                c[f"flag_{d}"].x, c[f"flag_{d}"].y = [], []
            return
        vals = self.token_curves(t)
        c["sel_norm"].x, c["sel_norm"].y = self.layers, vals["norm"]
        c["sel_norm"].name = f"token {t}"
        if self._cls is not None:
            c["sel_cls"].x, c["sel_cls"].y = self.layers, vals["cls"]
        for d in self.detectors:
            at = [l for l, f in zip(self.layers, vals[f"flagged_{d}"], strict=True) if f]
            c[f"flag_{d}"].x, c[f"flag_{d}"].y = at, [d] * len(at)

    def _status_html(self, flagged: np.ndarray) -> str:
        det = self.mark_dropdown.value
        if det in self.stats.masks:
            fc = self.stats.flag_counts(det, self.layer, self.index)
            counted = ("no outlier above the criterion" if fc.none_above
                       else f"{fc.text} {flagged.tolist()}")
            parts = [f"layer {self.layer}, {det}: {counted}"]
            if get_detector(det).needs == "attention":
                parts.append(f"(layer {self.layer}'s attention is computed from the output of "
                             f"block {self.layer - 1}: it reacts one layer after the norms)")
        else:
            parts = [f"layer {self.layer}: {len(flagged)} flagged by {det} {flagged.tolist()}"]
        t = self.selected_token
        if t is not None:
            vals = self.token_curves(t)
            by = {d: [l for l, f in zip(self.layers, vals[f"flagged_{d}"], strict=True) if f]
                  for d in self.detectors}
            first = [l for ls in by.values() for l in ls]
            parts.append(
                f"token {t} (row {t // self.grid[1]}, col {t % self.grid[1]}): flagged at "
                + "; ".join(f"{d}: {ls or '-'}" for d, ls in by.items())
                + (f" (first at layer {min(first)})" if first else "")
            )
        return "<br>".join(parts)

    # ------------------------------------------------------------------ events
    def _on_click(self, trace: Any, points: Any, state: Any = None) -> None:
        xs, ys = list(getattr(points, "xs", []) or []), list(getattr(points, "ys", []) or [])
        if xs and ys:
            p = patch_at(float(xs[0]), float(ys[0]), self.grid, self.patch_px)
            if p is not None:
                self.select_token(p)

    def _on_token_input(self, change: dict[str, Any]) -> None:
        v = int(change["new"])
        want = None if v < 0 else v
        if want != self.selected_token:
            self.select_token(want)

    def select_token(self, token: int | None) -> None:
        """Highlight patch ``token`` (row-major) across all layers; None clears."""
        n = self.grid[0] * self.grid[1]
        if token is not None and not 0 <= int(token) < n:
            raise ValueError(f"token must be a patch index in 0..{n - 1}, got {token}")
        self.selected_token = None if token is None else int(token)
        if self.token_input.value != (-1 if token is None else int(token)):
            self.token_input.value = -1 if token is None else int(token)
        self.refresh()

    # ------------------------------------------------------------------ export
    def figure_widgets(self) -> list[go.FigureWidget]:
        return [self.curves, self.map_figure]

    def to_figure(self) -> go.Figure:
        """Curves and map side by side in one static ``go.Figure``."""
        fig = make_subplots(
            rows=4, cols=2, shared_xaxes=False, column_widths=[0.55, 0.45],
            specs=[[{}, {"rowspan": 4}], [{}, None], [{}, None], [{}, None]],
            row_heights=[0.3, 0.3, 0.22, 0.18], vertical_spacing=0.05,
        )
        row_of = {"max_norm": 1, "median_norm": 1, "sel_norm": 1, "max_cls": 2, "median_cls": 2,
                  "sel_cls": 2}
        for tr in static_copy(self.curves).data:
            meta = str(tr.meta)
            row = row_of.get(meta, 3 if meta.startswith("count_") else 4)
            fig.add_trace(tr, row=row, col=1)
        for tr in static_copy(self.map_figure).data:
            if not isinstance(tr, go.Image):
                tr.showlegend = False
            if isinstance(tr, go.Heatmap):
                tr.colorbar = {"thickness": 10, "x": 1.02}
            fig.add_trace(tr, row=1, col=2)
        fig.update_yaxes(type="category", categoryorder="array",
                         categoryarray=list(self.detectors), row=4, col=1)
        fig.update_xaxes(dtick=1, col=1)
        # the map subplot is the second axis pair
        fig.layout.xaxis2.update(showticklabels=False, showgrid=False, zeroline=False,
                                 range=[0, self.image_size[1]])
        fig.layout.yaxis2.update(showticklabels=False, showgrid=False, zeroline=False,
                                 range=[self.image_size[0], 0], scaleanchor="x2")
        fig.update_layout(
            width=1000, height=640, **_row_legends(x=0.56),
            title=f"{describe_source(self.trace)} — layer {self.layer}",
            shapes=[{"type": "line", "xref": "x", "yref": "paper", "x0": self.layer,
                     "x1": self.layer, "y0": 0, "y1": 1,
                     "line": {"dash": "dash", "color": "#888", "width": 1}}],
        )
        return fig


def _row_legends(x: float = 1.02) -> dict[str, Any]:
    """Layout entries of one legend per curve row (norms, class attention, counts), each
    beside its own subplot, so entries of different subplots are not merged."""
    return {("legend" if r == 1 else f"legend{r}"): {
        "x": x, "xanchor": "left", "y": y, "yanchor": "top", "font": {"size": 10},
        "bgcolor": "rgba(255,255,255,0.8)"} for r, y in _LEGEND_Y.items()}
