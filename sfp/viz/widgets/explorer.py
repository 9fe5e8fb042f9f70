"""``OutlierExplorer``: one image, one layer, one map, and the tokens a detector flags.

>>> trace = record(bundle, prepare(src, bundle))
>>> OutlierExplorer(trace, src)            # display in Jupyter

The view is the image with a heatmap over its patch grid. Controls (attributes, so that code
and tests can drive them): ``layer_slider``, ``head_dropdown`` (mean over heads or one
head), ``map_dropdown`` (class-token attention, self-attention, token norm, the detector's
score, attention *from* / *to* the selected patch), ``detector_dropdown`` and the detector's
parameters ``top_k_slider``, ``cls_scale_slider``, ``n_neighbors_slider``,
``contamination_slider``, ``threshold_slider`` (only those the detector takes are shown),
``show_flags_checkbox``, ``log_checkbox``, ``opacity_slider``. Clicking a patch selects it
(:meth:`OutlierExplorer.select_patch` does the same from code). Flagged tokens are marked with
red crosses; a ground-truth mask (``truth=``, e.g. ``PlantedTruth.mask`` of
:mod:`sfp.models.synthetic`) with cyan circles.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch

from sfp.core.outliers import (
    DETECTORS,
    FlagCounts,
    MissingInputError,
    OutlierResult,
    available_detectors,
    detect,
    get_detector,
)
from sfp.models.loading import OPENAI_MEAN, OPENAI_STD
from sfp.viz.widgets._common import (
    SFPWidget,
    bind_trace,
    describe_source,
    html_escape,
    image_axes,
    param_slider,
    patch_at,
    patch_centers,
    png_data_uri,
    static_copy,
)

__all__ = ["MAPS", "OutlierExplorer", "layer_slider_for"]

#: Map key -> label shown in the map dropdown.
MAPS: dict[str, str] = {
    "cls": "class-token attention (cls → patch)",
    "self": "self-attention (patch → itself)",
    "norm": "token norm ‖h‖",
    "score": "detector score",
    "from_patch": "attention from the selected patch",
    "to_patch": "attention to the selected patch",
}
_ATTENTION_MAPS = ("cls", "self", "from_patch", "to_patch")
_PATCH_MAPS = ("from_patch", "to_patch")

#: Detector parameter -> (widget attribute, label). A detector gets the sliders whose name is
#: one of its keyword parameters.
#: Short labels of detector parameters (the name itself otherwise).
_PARAM_LABELS = {"n_neighbors": "neighbours", "threshold": "threshold (z)"}

_FLAG_COLOR = "#ff2d2d"
_TRUTH_COLOR = "#00e5ff"
_SELECT_COLOR = "#ffd400"


def layer_slider_for(layers: Sequence[int], value: int, description: str = "layer") -> Any:
    """An ``IntSlider`` over contiguous ``layers``, else a ``SelectionSlider`` over them."""
    layers = list(layers)
    style = {"description_width": "initial"}
    if layers == list(range(layers[0], layers[-1] + 1)):
        return widgets.IntSlider(value=value, min=layers[0], max=layers[-1], step=1,
                                 description=description, continuous_update=False, style=style)
    return widgets.SelectionSlider(options=layers, value=value, description=description,
                                   continuous_update=False, style=style)


class OutlierExplorer(SFPWidget):
    """Explore attention maps, token norms and detector flags of one recorded image.

    Args:
        trace: a :class:`sfp.core.probe.Trace` (``record(bundle, images)``); maps that need
            attention or hidden states the trace did not store are left out.
        image: the image the trace was recorded from (path, PIL, array, or the normalised
            tensor from :func:`sfp.core.io.prepare`); None shows the heatmap alone.
        index: which image of the trace's batch to show.
        layer: initial layer (default: the last recorded layer before the final one).
        map: initial map key (see :data:`MAPS`).
        detector: initial detector name (:func:`sfp.core.outliers.available_detectors`).
        truth: optional ground-truth outlier mask (e.g. ``PlantedTruth.mask``) drawn as circles.
        mean, std: normalisation to undo when ``image`` is a normalised tensor.
        size: figure width in screen pixels.
    """

    def __init__(
        self,
        trace: Any,
        image: Any = None,
        *,
        index: int = 0,
        layer: int | None = None,
        map: str = "cls",
        detector: str = "som",
        truth: Any = None,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        size: int = 460,
    ) -> None:
        super().__init__()
        n = bind_trace(self, trace, index, truth, image, mean, std)
        self.selected_patch: int | None = (self.grid[0] // 2) * self.grid[1] + self.grid[1] // 2
        self.last_error: str | None = None
        self._results: dict[tuple[Any, ...], OutlierResult] = {}

        self._make_controls(layer, map, detector, n, opacity=0.6 if image is not None else 1.0)

        self.figure = go.FigureWidget(self._build_figure(size))
        traces = {t.meta: t for t in self.figure.data}
        self.heatmap = traces["map"]
        self.flag_markers = traces["flagged"]
        self.truth_markers = traces.get("truth")
        self.selection_marker = traces["selected"]
        self.heatmap.on_click(self._on_click)
        if "image" in traces:
            traces["image"].on_click(self._on_click)

        for w in (self.layer_slider, self.head_dropdown, self.map_dropdown,
                  self.detector_dropdown, *self.param_sliders.values(),
                  self.show_flags_checkbox, self.log_checkbox, self.opacity_slider):
            w.observe(self._on_change, names="value")

        title = widgets.HTML(f"<b>{html_escape(describe_source(trace))}</b>")
        self.param_box = widgets.VBox(list(self.param_sliders.values()))
        controls = widgets.VBox(
            [self.layer_slider, self.head_dropdown, self.map_dropdown, self.detector_dropdown,
             self.param_box, self.show_flags_checkbox, self.log_checkbox, self.opacity_slider],
            layout=widgets.Layout(width="390px"),
        )
        self.children = [title, widgets.HBox([controls, self.figure]), self.status]
        self.add_class("sfp-outlier-explorer")
        self.refresh()

    # ------------------------------------------------------------------ state
    @property
    def layer(self) -> int:
        return int(self.layer_slider.value)

    @property
    def head(self) -> int | None:
        """Selected head, None for the mean over heads."""
        h = int(self.head_dropdown.value)
        return None if h < 0 else h

    def _make_controls(self, layer: int | None, map: str, detector: str, n: int,
                       opacity: float) -> None:
        """Layer, head, map and detector controls, the parameter sliders and checkboxes."""
        layers = list(self.trace.layers)
        if layer is None:
            layer = layers[-2] if len(layers) > 1 else layers[0]
        if layer not in layers:
            raise ValueError(f"layer {layer} was not recorded; recorded layers: {layers}")
        self.layer_slider = layer_slider_for(layers, int(layer))

        heads = self.trace.num_heads if self.has_attention else 1
        head_options: list[tuple[str, int]] = [("mean over heads", -1)]
        if heads > 1:
            head_options += [(f"head {h}", h) for h in range(heads)]
        self.head_dropdown = widgets.Dropdown(options=head_options, value=-1, description="head")

        maps = [k for k in MAPS if self.has_attention or k not in _ATTENTION_MAPS]
        if map not in maps:
            raise ValueError(f"map must be one of {maps} for this trace, got {map!r}")
        self.map_dropdown = widgets.Dropdown(  # the column's width: no entry is cut
            options=[(MAPS[k], k) for k in maps], value=map, description="map",
            layout=widgets.Layout(width="100%"),
        )
        usable = [d for d in available_detectors() if self._detector_usable(d)]
        if detector not in usable:
            raise ValueError(f"detector must be one of {usable} for this trace, got {detector!r}")
        self.detector_dropdown = widgets.Dropdown(options=usable, value=detector,
                                                  description="detector")
        self.param_sliders = self._make_param_sliders(n)
        self.show_flags_checkbox = widgets.Checkbox(value=True, description="mark flagged tokens")
        self.log_checkbox = widgets.Checkbox(value=False, description="log10 colour scale")
        self.opacity_slider = widgets.FloatSlider(
            value=opacity, min=0.0, max=1.0, step=0.05,
            description="opacity", continuous_update=False,
        )
        self.status = widgets.HTML()


    def _make_param_sliders(self, n: int) -> dict[str, widgets.Widget]:
        """One slider per numeric detector parameter of :data:`DETECTORS` (``<name>_slider``
        attributes), ranges from the registry, capped by the N = ``n`` patch tokens."""
        out: dict[str, widgets.Widget] = {}
        for entry in DETECTORS.entries():
            for p in entry.params:
                if p.name in out or p.choices is not None or p.low is None:
                    continue
                cap = {"top_k": n, "n_neighbors": max(1, n - 1)}.get(p.name)
                high = p.high if cap is None else min(p.high, cap)
                value = p.default if cap is None else min(p.default, cap)
                out[p.name] = param_slider(p, value, _PARAM_LABELS.get(p.name), high=high)
                setattr(self, f"{p.name}_slider", out[p.name])
        return out

    def _detector_usable(self, name: str) -> bool:
        needs = get_detector(name).needs
        return self.has_attention if needs == "attention" else self.has_hidden

    def detector_params(self) -> dict[str, Any]:
        """Keyword arguments the current detector gets from the sliders."""
        fn = get_detector(self.detector_dropdown.value).fn
        accepted = inspect.signature(fn).parameters
        return {name: w.value for name, w in self.param_sliders.items() if name in accepted}

    def current_result(self) -> OutlierResult | None:
        """The detector's result on the current layer (None when it cannot run).

        Results are memoised per (detector, layer, parameters): moving other controls, or
        clicking patches, does not run the detector again.
        """
        params = self.detector_params()
        key = (self.detector_dropdown.value, self.layer, tuple(sorted(params.items())))
        if key in self._results:
            self.last_error = None
            return self._results[key]
        try:
            result = detect(key[0], self.trace, self.layer, **params)
        except (MissingInputError, ValueError) as exc:
            self.last_error = str(exc)
            return None
        self.last_error = None
        if len(self._results) >= 64:
            self._results.clear()
        self._results[key] = result
        return result

    def current_mask(self) -> np.ndarray:
        """(N,) bool: patches the detector flags on the current layer, for this image."""
        result = self.current_result()
        n = self.grid[0] * self.grid[1]
        if result is None:
            return np.zeros(n, dtype=bool)
        return result.mask[self.index].cpu().numpy().astype(bool)

    def current_flag_counts(self) -> FlagCounts | None:
        """Candidates that passed the detector's criterion vs kept flags, current layer."""
        result = self.current_result()
        return None if result is None else result.flag_counts(self.index)

    def _per_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, ...) -> (B, ...): the selected head, or the mean over heads."""
        return x.mean(1) if self.head is None else x[:, self.head]

    def map_values(self, key: str | None = None) -> torch.Tensor:
        """Per-patch values (B, N) of a map (default: the selected one) at the current layer."""
        key = key or self.map_dropdown.value
        tr, layer = self.trace, self.layer
        if key == "cls":
            return self._per_head(tr.cls_attention(layer))
        if key == "self":
            return self._per_head(tr.self_attention(layer))
        if key == "norm":
            return tr.token_norms(layer)[:, 1:]
        if key == "score":
            result = self.current_result()
            if result is None:
                return torch.full((tr.batch_size, tr.num_patches), float("nan"))
            return result.scores
        p = self.selected_patch if self.selected_patch is not None else 0
        attn = self._per_head(tr.attention(layer))  # (B, T, T)
        if key == "from_patch":
            return attn[:, 1 + p, 1:]
        if key == "to_patch":
            return attn[:, 1:, 1 + p]
        raise ValueError(f"unknown map {key!r}; one of {list(MAPS)}")

    def current_map(self) -> np.ndarray:
        """(gh, gw) float: the heatmap values now shown (before any log scaling)."""
        values = self.map_values()
        return self.trace.to_grid(values.float())[self.index].cpu().numpy()

    # ------------------------------------------------------------------ figure
    def _build_figure(self, size: int) -> go.Figure:
        h, w = self.image_size
        gh, gw = self.grid
        ph, pw = self.patch_px
        data: list[Any] = []
        if self.image_rgb is not None:
            data.append(go.Image(source=png_data_uri(self.image_rgb), name="image",
                                 meta="image", hoverinfo="skip"))
        idx = np.arange(gh * gw).reshape(gh, gw)
        data.append(go.Heatmap(
            z=np.zeros((gh, gw)), x0=pw / 2, dx=pw, y0=ph / 2, dy=ph, name="map", meta="map",
            colorscale="Inferno", customdata=idx, opacity=self.opacity_slider.value,
            hovertemplate="patch %{customdata}<br>value %{z:.4g}<extra></extra>",
            # A fixed place and label format: a colour bar whose labels grow would push the
            # margin and shrink the image, leaving a strip under it.
            colorbar={"thickness": 12, "len": 0.9, "x": 1.0, "xanchor": "left", "xpad": 6,
                      "tickformat": ".3~g"},
        ))
        marker_size = max(6, min(22, int(0.55 * size / max(gh, gw))))
        data.append(go.Scatter(
            x=[], y=[], mode="markers", name="flagged", meta="flagged", customdata=[],
            marker={"symbol": "x", "size": marker_size, "color": _FLAG_COLOR,
                    "line": {"width": 1, "color": "white"}},
            hovertemplate="flagged patch %{customdata}<extra></extra>",
        ))
        if self.truth is not None:
            tx, ty = patch_centers(np.flatnonzero(self.truth), self.grid, self.patch_px)
            data.append(go.Scatter(
                x=tx, y=ty, mode="markers", name="planted (ground truth)", meta="truth",
                customdata=np.flatnonzero(self.truth),
                marker={"symbol": "circle-open", "size": marker_size + 6,
                        "color": _TRUTH_COLOR, "line": {"width": 2}},
                hovertemplate="planted outlier %{customdata}<extra></extra>",
            ))
        data.append(go.Scatter(
            x=[], y=[], mode="markers", name="selected patch", meta="selected", customdata=[],
            marker={"symbol": "square-open", "size": marker_size + 8, "color": _SELECT_COLOR,
                    "line": {"width": 2}},
            hovertemplate="selected patch %{customdata}<extra></extra>",
        ))
        fig = go.Figure(data=data)
        fig.update_layout(
            width=size + 120, height=int(size * h / w) + 90,
            margin={"l": 10, "r": 110, "t": 50, "b": 10, "autoexpand": False},
            plot_bgcolor="white",
            legend={"orientation": "h", "y": -0.02, "yanchor": "top"},
            xaxis={"range": [0, w]}, yaxis={"range": [h, 0]},
            clickmode="event", dragmode=False,
        )
        image_axes(fig)
        return fig

    def refresh(self) -> None:
        """Recompute the heatmap, the flags and the selection from the controls."""
        key = self.map_dropdown.value
        self.head_dropdown.disabled = key in ("norm", "score")
        accepted = inspect.signature(get_detector(self.detector_dropdown.value).fn).parameters
        for name, w in self.param_sliders.items():
            w.layout.display = "" if name in accepted else "none"

        z = self.current_map()
        shown = z
        log = self.log_checkbox.value and key != "score"
        if log:
            shown = np.log10(np.clip(z, 1e-8, None))
        mask = self.current_mask()
        flagged = np.flatnonzero(mask)
        fx, fy = patch_centers(flagged, self.grid, self.patch_px)
        show_flags = self.show_flags_checkbox.value
        title = self._title(self.current_flag_counts())
        with self.figure.batch_update():
            self.heatmap.z = shown
            self.heatmap.opacity = self.opacity_slider.value
            self.heatmap.colorbar.title.text = "log10" if log else ""
            self.flag_markers.x = fx if show_flags else []
            self.flag_markers.y = fy if show_flags else []
            self.flag_markers.customdata = flagged if show_flags else []
            self.flag_markers.name = f"flagged ({self.detector_dropdown.value})"
            self.figure.layout.title.text = title
            self._draw_selection()
        self.status.value = self._status_html(mask)

    def _draw_selection(self) -> None:
        p = self.selected_patch
        if p is None:
            self.selection_marker.x, self.selection_marker.y = [], []
            self.selection_marker.customdata = []
            return
        sx, sy = patch_centers([p], self.grid, self.patch_px)
        self.selection_marker.x, self.selection_marker.y = sx, sy
        self.selection_marker.customdata = [p]

    def _title(self, counts: FlagCounts | None) -> str:
        key = self.map_dropdown.value
        head = "" if key in ("norm", "score") else (
            ", mean over heads" if self.head is None else f", head {self.head}"
        )
        what = MAPS[key]
        if key == "score":
            what = f"{self.detector_dropdown.value} score"
        if key in _PATCH_MAPS:
            what += f" {self.selected_patch}"
        return (
            f"{describe_source(self.trace)}<br><sup>layer {self.layer}: {what}{head} · "
            f"{self.detector_dropdown.value}: {counts.short if counts else 'nothing'}</sup>"
        )

    def _status_html(self, mask: np.ndarray) -> str:
        det = self.detector_dropdown.value
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in self.detector_params().items())
        flagged = np.flatnonzero(mask).tolist()
        fc = self.current_flag_counts()
        if fc is not None and fc.none_above:
            counted = "<b style='color:#b00'>no outlier above the criterion</b>"
        else:
            counted = (fc.text if fc is not None else f"{len(flagged)} flagged") + f" {flagged}"
        parts = [f"<b>{det}</b>({params}) at layer {self.layer}: {counted}"]
        if get_detector(det).needs == "attention":
            parts.append(f"(layer {self.layer}'s attention is computed from the output of "
                         f"block {self.layer - 1}: it reacts one layer after the norms jump)")
        if self.last_error:
            parts.append(f"<span style='color:#b00'>{html_escape(self.last_error)}</span>")
        if self.truth is not None:
            truth = set(np.flatnonzero(self.truth).tolist())
            hit = len(truth & set(flagged))
            parts.append(f"planted (ground truth): {sorted(truth)}; recovered {hit}/{len(truth)}")
        p = self.selected_patch
        if p is not None:
            r, c = divmod(p, self.grid[1])
            norm = float(self.trace.token_norms(self.layer)[self.index, 1 + p])
            bits = [f"selected patch {p} (row {r}, col {c}): ‖h‖ = {norm:.3g}"]
            if self.has_attention:
                cls = float(self._per_head(self.trace.cls_attention(self.layer))[self.index, p])
                bits.append(f"cls attention = {cls:.3g}")
            bits.append("flagged" if mask[p] else "not flagged")
            parts.append(", ".join(bits))
        return "<br>".join(parts)

    # ------------------------------------------------------------------ events
    def _on_change(self, change: dict[str, Any]) -> None:
        self.refresh()

    def _on_click(self, trace: Any, points: Any, state: Any = None) -> None:
        xs, ys = list(getattr(points, "xs", []) or []), list(getattr(points, "ys", []) or [])
        if not xs or not ys:
            return
        p = patch_at(float(xs[0]), float(ys[0]), self.grid, self.patch_px)
        if p is not None:
            self.select_patch(p)

    def select_patch(self, index: int | None) -> None:
        """Select patch ``index`` (row-major) as a click on it would; None clears it."""
        if index is not None:
            index = int(index)
            if not 0 <= index < self.grid[0] * self.grid[1]:
                raise ValueError(f"patch index must be in 0..{self.grid[0] * self.grid[1] - 1}")
        self.selected_patch = index
        if self.map_dropdown.value in _PATCH_MAPS:
            self.refresh()
        else:
            with self.figure.batch_update():
                self._draw_selection()
            self.status.value = self._status_html(self.current_mask())

    # ------------------------------------------------------------------ export
    def figure_widgets(self) -> list[go.FigureWidget]:
        return [self.figure]

    def to_figure(self) -> go.Figure:
        """The current view as a static ``go.Figure`` (for exported HTML)."""
        return static_copy(self.figure)
