"""Helpers shared by the widgets: labels, display images, patch geometry, plotly plumbing.

Nothing here is a widget. The one piece of plotly plumbing worth knowing about:
:func:`sync_figure`. Since plotly 6, ``go.FigureWidget`` is an ``anywidget``; a figure shown
*inside a container* (``VBox``/``HBox``) is rendered from its synced ``_widget_data`` /
``_widget_layout`` traits, which plotly refreshes only in the figure's own
``_repr_mimebundle_`` (not called for children of a container). Edits made between building
the figure and displaying the container would then be missing (plotly/plotly.py#4998).
:class:`SFPWidget` calls :func:`sync_figure` on all its figures whenever it is displayed.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from PIL import Image

from sfp.core.registry import Param
from sfp.models.loading import OPENAI_MEAN, OPENAI_STD
from sfp.models.synthetic import SYNTHETIC_LABEL
from sfp.seg.benchmarks import Settings

__all__ = [
    "SYNTHETIC_LABEL",
    "SFPWidget",
    "describe_source",
    "display_image",
    "is_synthetic",
    "label_colors",
    "colorize_labels",
    "patch_at",
    "patch_centers",
    "png_data_uri",
    "sync_figure",
    "stopwatch",
    "torch_threads",
    "trace_geometry",
]



# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def is_synthetic(obj: Any) -> bool:
    """True for a bundle or trace of the planted-outlier model (its ``provenance``)."""
    return getattr(obj, "provenance", None) == "synthetic"


def describe_source(obj: Any) -> str:
    """Human label of the model behind a bundle or trace, e.g. ``"ViT-B-16 / openai"``,
    followed by its caveat ("synthetic (planted outliers)", "random weights ...") if any."""
    label = str(getattr(obj, "label", None) or getattr(obj, "name", "model"))
    caveat = getattr(obj, "caveat", None)
    if caveat and caveat not in label:
        label = f"{label} — {caveat}"
    return label


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def trace_geometry(trace: Any) -> tuple[tuple[int, int], tuple[int, int], tuple[float, float]]:
    """(grid (gh, gw), image size (H, W) px, patch size (px_h, px_w)) of a recorded trace."""
    grid = (int(trace.grid[0]), int(trace.grid[1]))
    image_size = trace.image_size
    return grid, image_size, (image_size[0] / grid[0], image_size[1] / grid[1])


def _fit(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (3, h, w) to ``size`` the way :func:`sfp.core.io.prepare` would have made it.

    Same aspect ratio (within 1 %): a plain resize. Otherwise: resize so the image covers
    ``size`` (short side), then a centre crop, as ``prepare(..., crop=True)`` does.
    """
    h, w = img.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return img
    if abs(h / w - th / tw) <= 0.01 * (th / tw):
        out = F.interpolate(img[None], size=(th, tw), mode="bilinear", align_corners=False,
                            antialias=True)
        return out[0].clamp(0, 1)
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    out = F.interpolate(img[None], size=(rh, rw), mode="bilinear", align_corners=False,
                        antialias=True)[0]
    top, left = (rh - th) // 2, (rw - tw) // 2
    return out[:, top : top + th, left : left + tw].clamp(0, 1)


def display_image(
    image: Any,
    size: tuple[int, int] | None = None,
    *,
    index: int = 0,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> np.ndarray:
    """An image as ``(H, W, 3)`` uint8 for display.

    image: anything :func:`sfp.core.io.load_image` reads (path, PIL, numpy, tensor in [0, 1]), or a
    normalised batch ``(B, 3, H, W)`` / ``(3, H, W)`` as :func:`sfp.core.io.prepare` returns
    (recognised by values outside [0, 1]; undone with ``mean``/``std``; ``index`` picks the
    image of a batch). size: ``(H, W)`` to fit to (see :func:`_fit`), None = as is.
    """
    from sfp.core.io import load_image

    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4:
            t = t[index]
        if t.ndim == 3 and t.shape[0] == 3 and (t.min() < 0 or t.max() > 1):
            m = torch.tensor(list(mean), dtype=t.dtype).view(3, 1, 1)
            s = torch.tensor(list(std), dtype=t.dtype).view(3, 1, 1)
            t = (t * s + m).clamp(0, 1)
        img = load_image(t)
    else:
        img = load_image(image)
    if size is not None:
        img = _fit(img, (int(size[0]), int(size[1])))
    return (img.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Patch geometry (patches row-major on a gh x gw grid; pixel coordinates, y downwards)
# --------------------------------------------------------------------------------------------


def patch_centers(
    indices: Sequence[int] | np.ndarray, grid: tuple[int, int], patch_px: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres ``(xs, ys)`` of patch ``indices`` on ``grid``; patch_px = (ph, pw)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    rows, cols = np.divmod(idx, grid[1])
    return (cols + 0.5) * patch_px[1], (rows + 0.5) * patch_px[0]


def patch_at(
    x: float, y: float, grid: tuple[int, int], patch_px: tuple[float, float]
) -> int | None:
    """Index of the patch under pixel ``(x, y)``, or None outside the grid."""
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return None
    col, row = int(math.floor(x / patch_px[1])), int(math.floor(y / patch_px[0]))
    if 0 <= row < grid[0] and 0 <= col < grid[1]:
        return row * grid[1] + col
    return None


# --------------------------------------------------------------------------------------------
# Segmentation colours
# --------------------------------------------------------------------------------------------

def label_colors(n: int, class_names: Sequence[str] | None = None) -> np.ndarray:
    """``(n, 3)`` uint8 colours of classes 0..n-1: :func:`sfp.seg.pipeline.class_palette` of
    the class list (as ``Segmentation.overlay`` uses), so widgets and saved overlays agree;
    black only for a "background" class 0."""
    from sfp.seg.pipeline import class_palette

    return np.asarray(class_palette(class_names)[np.arange(n) % 256], dtype=np.uint8)


def colorize_labels(
    labels: np.ndarray, colors: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.55
) -> np.ndarray:
    """Label map ``(H, W)`` int -> ``(H, W, 3)`` uint8, blended over ``image`` when given.

    Labels outside ``0..len(colors)-1`` (e.g. 255 = ignore) are drawn grey.
    """
    lab = np.asarray(labels)
    valid = (lab >= 0) & (lab < len(colors))
    rgb = np.full((*lab.shape, 3), 128, dtype=np.float32)
    rgb[valid] = colors[lab[valid]]
    if image is not None:
        rgb = alpha * rgb + (1 - alpha) * np.asarray(image, dtype=np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# plotly / ipywidgets plumbing
# --------------------------------------------------------------------------------------------


def sync_figure(fig: go.FigureWidget) -> None:
    """Copy a FigureWidget's current data/layout into the traits its views render from.

    Needed when the figure is displayed as a child of a container (see the module doc).
    """
    fig._widget_layout = deepcopy(fig._layout_obj._props)
    fig._widget_data = deepcopy(fig._data)


def image_axes(fig: go.Figure, n: int = 1) -> None:
    """Make the axes of image subplots 1..n pixel-true: y downwards, square pixels, no ticks."""
    for i in range(1, n + 1):
        suffix = "" if i == 1 else str(i)
        fig.layout[f"xaxis{suffix}"].update(
            showticklabels=False, showgrid=False, zeroline=False, constrain="domain"
        )
        fig.layout[f"yaxis{suffix}"].update(
            showticklabels=False, showgrid=False, zeroline=False, autorange="reversed",
            scaleanchor=f"x{suffix}", constrain="domain",
        )


def truth_vector(truth: Any, index: int, num_patches: int, images: Any = None
                 ) -> np.ndarray | None:
    """A ground-truth outlier mask as (N,) bool.

    truth: a tensor/array of shape (N,), (B, N), (gh, gw) or (B, gh, gw) (e.g.
    ``PlantedTruth.mask(images)``), or a :class:`sfp.models.synthetic.PlantedTruth` itself, whose
    ``mask(images)`` is then evaluated on ``images`` (normalised (B, 3, H, W)).
    """
    if truth is None:
        return None
    if callable(getattr(truth, "mask", None)):
        if not (isinstance(images, torch.Tensor) and images.ndim == 4):
            raise ValueError(
                "truth is a PlantedTruth: pass truth=truth.mask(images), or pass the normalised "
                "images (B, 3, H, W) as the image argument so the mask can be computed"
            )
        truth = truth.mask(images)
    arr = truth.detach().cpu().numpy() if isinstance(truth, torch.Tensor) else np.asarray(truth)
    arr = arr.astype(bool)
    if arr.size == num_patches:
        return arr.reshape(num_patches)
    if arr.ndim >= 2 and arr[index].size == num_patches:
        return arr[index].reshape(num_patches)
    raise ValueError(
        f"truth must hold one flag per patch (N={num_patches}) per image, got shape {arr.shape}"
    )


def bind_trace(widget: Any, trace: Any, index: int, truth: Any, image: Any,
               mean: Sequence[float], std: Sequence[float]) -> int:
    """Attach ``trace`` (image ``index`` of its batch) to a trace widget: sets ``trace``,
    ``index``, ``grid``, ``image_size``, ``patch_px``, ``has_attention``, ``has_hidden``,
    ``truth`` (see :func:`truth_vector`) and ``image_rgb`` (the image to draw under the maps,
    ``mean`` / ``std`` undone for a normalised tensor; None without an image); returns the
    number of patches N."""
    widget.trace = trace
    widget.index = int(index)
    widget.grid, widget.image_size, widget.patch_px = trace_geometry(trace)
    n = widget.grid[0] * widget.grid[1]
    widget.has_attention = trace.has_attention
    widget.has_hidden = trace.has_hidden
    widget.truth = truth_vector(truth, widget.index, n, image)
    widget.image_rgb = None if image is None else display_image(
        image, widget.image_size, index=widget.index, mean=mean, std=std)
    return n


def fixed_image_axes(fig: go.Figure, k: int, height: int, width: int) -> None:
    """Axes of subplot ``k`` (1-based) spanning an ``height x width`` image: y downwards,
    square pixels, no ticks, fixed ranges (images given as data URIs have no extent)."""
    suffix = "" if k == 1 else str(k)
    fig.layout[f"xaxis{suffix}"].update(range=[0, width], showticklabels=False, showgrid=False,
                                        zeroline=False)
    fig.layout[f"yaxis{suffix}"].update(range=[height, 0], showticklabels=False, showgrid=False,
                                        zeroline=False, scaleanchor=f"x{suffix}")


def labels_uri(labels: np.ndarray, colors: np.ndarray, image: np.ndarray | None = None,
               alpha: float = 0.55) -> str:
    """A label map painted (over ``image``, see :func:`colorize_labels`) as a PNG data URI
    for ``go.Image(source=...)``."""
    return png_data_uri(colorize_labels(labels, colors, image, alpha))


def png_data_uri(rgb: np.ndarray) -> str:
    """``(H, W, 3)`` uint8 -> a ``data:image/png;base64,...`` URI for ``go.Image(source=...)``.

    Much cheaper to send to the browser than ``go.Image(z=...)`` (a JSON list of pixels).
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG",
                                                                     compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def static_copy(fig: go.Figure) -> go.Figure:
    """A plain ``go.Figure`` with the same data and layout (no widget, no callbacks)."""
    return go.Figure(data=list(fig.data), layout=fig.layout)


class SFPWidget(widgets.VBox):
    """Base of the sfp widgets: a ``VBox`` whose plotly figures stay in sync when displayed.

    Subclasses list their FigureWidgets in :meth:`figure_widgets` and implement
    :meth:`to_figure` (a static ``go.Figure`` of the current view, for exported HTML).
    """

    def figure_widgets(self) -> list[go.FigureWidget]:
        """The FigureWidgets inside this widget."""
        return []

    def to_figure(self) -> go.Figure:  # pragma: no cover - abstract
        """A static plotly Figure of what the widget shows now."""
        raise NotImplementedError

    def sync(self) -> None:
        """Push every figure's current state to its widget traits (see :func:`sync_figure`)."""
        for fig in self.figure_widgets():
            sync_figure(fig)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        self.sync()
        return super()._repr_mimebundle_(**kwargs)

    def save_html(self, path: str, **kwargs: Any) -> str:
        """Write :meth:`to_figure` as a standalone HTML file that works offline (plotly.js is
        inlined; nothing is loaded from the network); returns the path."""
        self.to_figure().write_html(path, include_plotlyjs=True, **kwargs)
        return path


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, then restore the previous count.

    Post-processing works on small tensors (Q x H x W); with several intra-op threads on a
    busy CPU, thread wake-ups cost more than the work (measured 3-4x slower on 2 cores), so
    the tuner runs it on one thread.
    """
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` -> ``t[0]`` is the elapsed time in seconds."""
    out = [0.0]
    start = time.perf_counter()
    try:
        yield out
    finally:
        out[0] = time.perf_counter() - start


def html_escape(text: str) -> str:
    """Escape ``text`` for an ``ipywidgets.HTML`` value."""
    return (
        str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    )


#: Segmentation settings of the widgets: the released protocol's, with a 224 px short side
#: (one 224 crop for a square image: interactive speed on a CPU).
WIDGET_SETTINGS = Settings(short_side=224)


def widget_settings(settings: Settings | None, overrides: Mapping[str, Any],
                    bundle: Any = None) -> Settings:
    """``settings`` (default :data:`WIDGET_SETTINGS`; for the toy CLIP the toy benchmark's, one
    128 px window) with ``overrides`` (its field names: short_side, crop, stride, logit_scale,
    prob_thd, area_thd, max_long_side) applied."""
    if settings is None and getattr(bundle, "is_toy", False):
        from sfp.seg.benchmarks import get_benchmark

        settings = get_benchmark("toy").settings
    base = WIDGET_SETTINGS if settings is None else settings
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Settings)})
    if unknown:
        fields = ", ".join(f.name for f in dataclasses.fields(Settings))
        raise TypeError(f"unknown segmentation setting(s) {unknown}; settings are {fields}.")
    return dataclasses.replace(base, **overrides)


#: Keyword arguments every slider shares: update on release, long descriptions fit.
SLIDER_KW: dict[str, Any] = {"continuous_update": False,
                             "style": {"description_width": "initial"}}


def param_slider(param: Param, value: Any, description: str | None = None, *,
                 low: float | None = None, high: float | None = None) -> widgets.Widget:
    """A slider (or dropdown, for a choice) for a registered parameter, with the range the
    registry gives it; ``low`` / ``high`` narrow or widen that range."""
    desc = description or param.name
    if param.choices is not None:
        return widgets.Dropdown(options=list(param.choices), value=value, description=desc)
    lo = param.low if low is None else low
    hi = param.high if high is None else high
    if isinstance(param.default, int) and not isinstance(param.default, bool):
        return widgets.IntSlider(value=int(value), min=int(lo), max=int(hi),
                                 step=int(param.step or 1), description=desc, **SLIDER_KW)
    return widgets.FloatSlider(value=float(value), min=lo, max=hi, step=param.step or 0.01,
                               description=desc, **SLIDER_KW)
