"""Shared look of the analysis figures: fonts, colour maps, titles, map panels, PCA colours.

Every figure is built on a :class:`matplotlib.figure.Figure` created here (no pyplot state, so
building figures in a loop or a server leaks nothing) inside :func:`figure_style`, with
constrained layout so colour bars and titles never overlap.

Titles follow one rule (:func:`figure_title`): *what* is shown, *which paper figure* it
corresponds to, *which model and weights* (``bundle.label``) and *which layer(s)*; a model from
:mod:`sfp.models.synthetic` is always named "synthetic (planted outliers)".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib as mpl
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from sfp.models.synthetic import SYNTHETIC_LABEL

__all__ = [
    "ATTENTION_CMAP",
    "ATTENTION_UNIT",
    "DETECTOR_COLORS",
    "DETECTOR_STYLES",
    "MASK_CMAP",
    "NORM_CMAP",
    "NORM_UNIT",
    "SYNTHETIC_TAG",
    "add_colorbar",
    "detector_line",
    "figure_style",
    "log_ticks",
    "set_log_ticks",
    "figure_title",
    "mark_patches",
    "mark_point",
    "model_tag",
    "new_figure",
    "pca_rgb",
    "plotly_colorscale",
    "plotly_image",
    "plotly_title",
    "show_map",
    "data_or_build",
    "to_numpy",
    "wrap_title",
]

#: Wording every figure of the planted-outlier model carries (it is ``bundle.pretrained``).
SYNTHETIC_TAG = SYNTHETIC_LABEL
#: Colour-bar labels (the units of what is shown).
ATTENTION_UNIT = "attention prob."
NORM_UNIT = "token L2 norm ‖h‖₂"
ATTENTION_CMAP = "viridis"
OVERLAY_CMAP = "jet"
NORM_CMAP = "magma"
MASK_CMAP = mpl.colors.ListedColormap(["#2b2d42", "#ffd166"], name="sfp_mask")
#: One fixed colour per detector, used by every line plot.
DETECTOR_COLORS = {
    "som": "#d62728",
    "l2": "#1f77b4",
    "lof": "#2ca02c",
    "norm_z": "#9467bd",
}
#: Marker and line style per detector, so that lines lying on top of each other stay visible.
DETECTOR_STYLES = {
    "som": ("o", "-"),
    "l2": ("s", "--"),
    "lof": ("^", "-."),
    "norm_z": ("D", ":"),
}
OUTLIER_EDGE = "white"


def detector_line(name: str, index: int = 0, count: int = 1, spread: float = 0.18) -> dict:
    """Keyword arguments for ``ax.plot`` of detector ``name``: colour, marker, line style, and
    ``dx``, a small horizontal offset (index of count lines) that keeps equal values apart."""
    marker, ls = DETECTOR_STYLES.get(name, ("o", "-"))
    dx = (index - (count - 1) / 2) * (spread / max(count - 1, 1)) if count > 1 else 0.0
    return {"color": DETECTOR_COLORS.get(name), "marker": marker, "linestyle": ls,
            "markersize": 5, "dx": dx}

_RC: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8.5,
    "figure.titlesize": 12,
    "figure.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.interpolation": "nearest",
    "svg.fonttype": "none",  # keep text as text in SVG (editable, searchable)
}


@contextmanager
def figure_style(**overrides: Any) -> Iterator[None]:
    """Context in which figures get the toolkit's fonts and defaults (rcParams)."""
    with mpl.rc_context({**_RC, **overrides}):
        yield


def new_figure(width: float, height: float, **kwargs: Any) -> Figure:
    """A pyplot-free figure of ``width x height`` inches with constrained layout."""
    kwargs.setdefault("layout", "constrained")
    return Figure(figsize=(width, height), **kwargs)


def data_or_build(
    source: Any, data_type: type, build: Any, args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``source`` if it already is ``data_type``, else ``build(source, *args, **kwargs)``.

    Options (non-None ``args``, any ``kwargs``) only make sense when building, so giving them
    with ready data is a TypeError.
    """
    kwargs = kwargs or {}
    if isinstance(source, data_type):
        if kwargs or any(a is not None for a in args):
            raise TypeError(
                f"pass either {data_type.__name__} or a trace with options, not both"
            )
        return source
    return build(source, *args, **kwargs)


def to_numpy(x: Any) -> np.ndarray:
    """Tensor / array-like -> float numpy array (on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def model_tag(label: str, is_synthetic: bool = False) -> str:
    """``bundle.label``, with the synthetic warning appended when the label lacks it."""
    if is_synthetic and SYNTHETIC_TAG not in label:
        return f"{label} — {SYNTHETIC_TAG}"
    return label


def figure_title(
    what: str,
    *,
    paper_ref: str | None,
    label: str,
    is_synthetic: bool = False,
    layers: str | None = None,
    detail: str | None = None,
) -> str:
    """Title of up to three lines: ``what — paper_ref`` / ``model: label · layers`` /
    ``detail``.

    label is ``bundle.label`` (e.g. ``"ViT-B-16 / openai"``); layers is free text such as
    ``"layers 1, 6, 8, 11"``; detail names settings (detector, head, ...).
    """
    head = f"{what} — {paper_ref}" if paper_ref else what
    tail = f"model: {model_tag(label, is_synthetic)}"
    if is_synthetic:
        tail += " (NOT a pretrained CLIP)"
    if layers:
        tail += f" · {layers}"
    lines = [head, tail] + ([detail] if detail else [])
    return "\n".join(lines)


def wrap_title(text: str, width: int = 110) -> str:
    """Wrap each line of a title at ``width`` characters (long labels, e.g. file paths)."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def _extent(grid: Sequence[int], patch_px: float) -> tuple[float, float, float, float]:
    gh, gw = grid
    return (0.0, gw * patch_px, gh * patch_px, 0.0)


def show_map(
    ax: Axes,
    values: Any,
    *,
    image: np.ndarray | None = None,
    patch_px: float | None = None,
    cmap: str | Colormap = ATTENTION_CMAP,
    norm: Normalize | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.55,
    smooth: bool = True,
) -> AxesImage:
    """Draw a per-patch map ``values`` (gh, gw) on ``ax``, alone or over ``image`` (H, W, 3).

    The map is drawn at grid resolution (its image data stays (gh, gw)); over an image it is
    stretched to the patch grid's pixel extent (``patch_px`` pixels per patch, default
    H // gh) and, with ``smooth``, interpolated bilinearly for display, as the released
    notebook's upsampled overlays. Axis ticks are hidden; the aspect ratio is the grid's
    (non-square grids stay non-square). Returns the map's AxesImage (for a colour bar).
    """
    values = to_numpy(values).astype(np.float32)
    if values.ndim != 2:
        raise ValueError(f"values must be a (gh, gw) map, got shape {values.shape}")
    ax.set_xticks([])
    ax.set_yticks([])
    kw: dict[str, Any] = {"cmap": cmap, "norm": norm}
    if norm is None:
        kw.update(vmin=vmin, vmax=vmax)
    if image is None:
        im = ax.imshow(values, interpolation="nearest", aspect="equal", **kw)
        return im
    img = np.clip(to_numpy(image), 0, 1)
    px = patch_px if patch_px is not None else img.shape[0] / values.shape[0]
    h, w = img.shape[:2]
    ax.imshow(img, extent=(0, w, h, 0), aspect="equal", interpolation="antialiased")
    im = ax.imshow(
        values,
        extent=_extent(values.shape, px),
        alpha=alpha,
        interpolation="bilinear" if smooth else "nearest",
        aspect="equal",
        **kw,
    )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return im


def log_ticks(vmin: float, vmax: float, max_ticks: int = 7) -> list[float]:
    """Readable ticks for a log axis from ``vmin`` to ``vmax``: 1-2-5 x 10^k values inside
    the range, thinned to at most ``max_ticks`` (always at least the two ends' neighbours)."""
    vmin, vmax = float(vmin), float(vmax)
    if not (vmin > 0 and vmax > vmin):
        return [v for v in (vmin, vmax) if v > 0]
    ticks = []
    for k in range(int(np.floor(np.log10(vmin))), int(np.ceil(np.log10(vmax))) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**k
            if vmin <= v <= vmax:
                ticks.append(v)
    while len(ticks) > max_ticks:
        ticks = ticks[::2]
    if len(ticks) < 2:
        ticks = [vmin, vmax]
    return ticks


def set_log_ticks(axis: Any, vmin: float, vmax: float) -> None:
    """Put :func:`log_ticks` on a matplotlib Axis (e.g. ``ax.yaxis``), no minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axis.set_major_locator(FixedLocator(log_ticks(vmin, vmax)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def add_colorbar(fig: Figure, im: Any, ax: Axes | Sequence[Axes], label: str | None = None,
                 **kwargs: Any) -> Any:
    """A slim colour bar beside ``ax`` with an optional unit ``label``."""
    kwargs.setdefault("shrink", 0.95)
    kwargs.setdefault("pad", 0.02)
    kwargs.setdefault("aspect", 18)
    cb = fig.colorbar(im, ax=ax, **kwargs)
    cb.ax.tick_params(labelsize=7.5, length=2)
    cb.ax.yaxis.get_offset_text().set_fontsize(7)
    if label:
        cb.set_label(label, fontsize=8)
    return cb


def mark_patches(
    ax: Axes,
    mask: Any,
    *,
    patch_px: float | None = None,
    color: str = OUTLIER_EDGE,
    linewidth: float = 1.1,
) -> int:
    """Outline flagged patches (mask (gh, gw) bool) with boxes; returns how many were drawn.

    ``patch_px`` None: the axes show the grid itself (one data unit per patch, as
    :func:`show_map` without an image); else pixels per patch of an image underneath.
    """
    mask = to_numpy(mask).astype(bool)
    ys, xs = np.nonzero(mask)
    for y, x in zip(ys, xs, strict=True):
        if patch_px is None:
            xy, size = (x - 0.5, y - 0.5), 1.0
        else:
            xy, size = (x * patch_px, y * patch_px), patch_px
        ax.add_patch(
            Rectangle(xy, size, size, fill=False, edgecolor=color, linewidth=linewidth,
                      zorder=5)
        )
    return int(len(ys))


def mark_point(ax: Axes, row: int, col: int, *, patch_px: float | None = None,
               color: str = "red") -> None:
    """A star on patch (row, col): grid coordinates, or image pixels with ``patch_px``."""
    if patch_px is None:
        x, y = col, row
    else:
        x, y = (col + 0.5) * patch_px, (row + 0.5) * patch_px
    ax.plot(x, y, marker="*", markersize=11, color=color, markeredgecolor="white",
            markeredgewidth=0.8, zorder=6, linestyle="none")


def _top_components(x: torch.Tensor, k: int, iterations: int = 30) -> torch.Tensor:
    """The k leading principal axes (k, C) of centred rows x (M, C), float64.

    Subspace iteration on the scatter matrix from a deterministic start (the axes of largest
    variance), then Rayleigh-Ritz: only matrix products and small factorisations, so it is
    fast and reproducible whatever LAPACK build and thread load the machine has (a full
    eigendecomposition or SVD of a 768 x 768 matrix can take seconds on a busy CPU).
    """
    scatter = x.T @ x  # (C, C)
    c = scatter.shape[0]
    if c <= 16:
        _, vecs = torch.linalg.eigh(scatter)
        return vecs.flip(-1)[:, :k].T
    p = min(c, k + 5)
    start = torch.argsort(torch.diagonal(scatter), descending=True)[:p]
    q, _ = torch.linalg.qr(scatter[:, start])
    for _ in range(iterations):
        q, _ = torch.linalg.qr(scatter @ q)
    vals, vecs = torch.linalg.eigh(q.T @ scatter @ q)
    order = torch.argsort(vals, descending=True)[:k]
    return (q @ vecs[:, order]).T


def pca_rgb(*token_sets: Any, percentile: float = 1.0) -> list[np.ndarray]:
    """Colour tokens by their first three principal components, shared across ``token_sets``.

    Each argument is (N_i, C) tokens; the PCA basis and the colour scaling are fitted on all of
    them together so that equal colours mean equal directions in every panel. Each component
    is clipped to its [percentile, 100 - percentile] range and mapped to [0, 1].
    Returns one (N_i, 3) float array per argument.
    """
    arrays = [to_numpy(t).astype(np.float64) for t in token_sets]
    if not arrays:
        return []
    allx = torch.from_numpy(np.concatenate(arrays, axis=0))
    centred = allx - allx.mean(dim=0, keepdim=True)
    comps = _top_components(centred, 3).numpy()  # (<=3, C)
    # Sign fixed so results are reproducible: the largest-magnitude loading is positive.
    comps = comps * np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])[:, None]
    centred = centred.numpy()
    proj = centred @ comps.T
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo = np.percentile(proj, percentile, axis=0)
    hi = np.percentile(proj, 100 - percentile, axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    out, start = [], 0
    for a in arrays:
        out.append(rgb[start : start + len(a)].astype(np.float32))
        start += len(a)
    return out


def plotly_image(rgb: np.ndarray, quality: int = 88) -> Any:
    """A plotly ``go.Image`` of an (H, W, 3) image in [0, 1], embedded as a JPEG data URI
    (an order of magnitude smaller in the HTML than a pixel array; no network access)."""
    import base64
    import io as _io

    import plotly.graph_objects as go
    from PIL import Image

    arr = (np.clip(to_numpy(rgb), 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return go.Image(source=uri, hoverinfo="skip")


def plotly_colorscale(cmap: str | Colormap, n: int = 11) -> list[list[Any]]:
    """A matplotlib colour map as a plotly colour scale (``n`` stops), so the static and the
    interactive version of a figure use the same colours."""
    cm = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    stops = np.linspace(0.0, 1.0, n)
    return [[float(t), "rgb({},{},{})".format(*(int(round(255 * v)) for v in cm(t)[:3]))]
            for t in stops]


def plotly_title(fig: Any, text: str) -> Any:
    """Give a plotly figure ``text`` (newlines allowed) as its title, wrapped to the figure's
    width, below plotly's tool bar, with a top margin that fits it so it never overlaps the
    subplot titles; returns the figure."""
    width = fig.layout.width or 900
    keep = SYNTHETIC_TAG.replace(" ", "\0")  # the caveat is never split over two lines
    text = wrap_title(text.replace(SYNTHETIC_TAG, keep), max(40, int(width / 7.5)))
    text = text.replace("\0", " ")  # (14 px font: no line wider than the figure)
    lines = text.count("\n") + 1
    fig.update_layout(  # below plotly's tool bar (about 30 px at the top right)
        title={"text": text.replace("\n", "<br>"), "x": 0.5, "xanchor": "center",
               "y": 1.0, "yref": "container", "yanchor": "top", "pad": {"t": 46},
               "font": {"size": 14}},
        margin={"t": 70 + 21 * lines},
    )
    return fig
