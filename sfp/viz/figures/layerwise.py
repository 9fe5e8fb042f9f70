"""Layer-wise purification (paper Fig. 5) and SOM's detections over images (supplement Fig. 2).

:func:`layerwise_purification`: the patch tokens of layers 2..9 (of 12; scaled for other
depths) of a plain forward, row (a), and of the paper preset's forward, where SOM purifies
every block's output and the purified tokens are what the next block receives, row (b)
("the influence of outliers is mitigated layer by layer"). Each map is the tokens' L2 norm
over the image, one colour scale per layer shared by both rows (``mode="norm"``), or their
first three principal components as RGB, one basis per layer shared by both rows
(``mode="pca"``). Row (b) outlines what SOM flagged at that layer.

:func:`som_detections`: for several images, row (a) the image with its patch-norm map at the
detection layer, row (b) the patches SOM flags there — it adapts the number of outliers to the
image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from sfp.viz.figures import style
from sfp.viz.figures.views import CropFigureData, ImageView, image_view

__all__ = [
    "PAPER_CRITERION_NOTE",
    "LayerwiseData",
    "SOMDetections",
    "default_purification_layers",
    "layerwise_data",
    "layerwise_purification",
    "layerwise_purification_plotly",
    "som_detections",
    "som_detections_data",
    "som_detections_plotly",
]

PAPER_REF = "paper Fig. 5"
SUPP_REF = "supplement Fig. 2"


def default_purification_layers(num_layers: int) -> list[int]:
    """Paper Fig. 5's layers 2..9 of 12, scaled to ``num_layers`` blocks (duplicates
    dropped; layers stay in 1..L-1)."""
    from sfp.methods.config import derive_layer

    out: list[int] = []
    for layer in range(2, 10):
        d = derive_layer(layer, num_layers)
        if d not in out:
            out.append(d)
    return out


#: Said wherever a figure shows the paper's criterion (eq. 4) without the release's factor:
#: before the outliers appear it flags about half of the patches (on the planted ViT-B/16,
#: 72-127 of 196 in each of layers 1-5 over 4 photos and 4 scenes, 128-167 in layer 6, whose
#: attention holds the planted competition head, then exactly the 10 planted ones from layer
#: 7 on).
PAPER_CRITERION_NOTE = ("eq. 4 without the release's factor 1.5 and top-10 flags about half "
                        "the tokens of early layers")


def paper_criterion_note(cls_scale: float, top_k: int | None) -> str:
    """:data:`PAPER_CRITERION_NOTE` when SOM runs with the paper's criterion (factor 1, no
    top-k), else ""."""
    return PAPER_CRITERION_NOTE if float(cls_scale) == 1.0 and top_k is None else ""


def _view(bundle: Any, image: Any) -> ImageView:
    return image if isinstance(image, ImageView) else image_view(bundle, image)


@dataclass
class LayerwiseData(CropFigureData):
    """Plain and purified patch tokens of one image.

    layers: the L' layers shown. raw: (L', N, C) plain forward's patch tokens. purified:
    (L', N, C) the SOM-purified tokens of the per-layer-SOM forward (= its raw output where
    SOM flags nothing or does not run). masks: (L', gh, gw) bool, SOM's detections in that
    forward (False where it did not run). image: (H, W, 3). config: the configuration text.
    criterion_note: :data:`PAPER_CRITERION_NOTE` when SOM used the paper's criterion, else "".
    """

    layers: list[int]
    raw: np.ndarray
    purified: np.ndarray
    masks: np.ndarray
    criterion_note: str = ""
    counts: list[Any] = field(default_factory=list)  # per layer FlagCounts, or None (no SOM)

    def flag_text(self, k: int) -> str:
        """Passed vs kept at the k-th layer shown (:class:`sfp.core.outliers.FlagCounts`)."""
        fc = self.counts[k] if k < len(self.counts) else None
        if fc is None:
            return f"{int(self.masks[k].sum())} flagged"
        return fc.short

    def norm_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """(L', gh, gw) L2 norms of the raw and the purified tokens."""
        shape = (len(self.layers), *self.grid)
        return (np.linalg.norm(self.raw, axis=-1).reshape(shape),
                np.linalg.norm(self.purified, axis=-1).reshape(shape))

    def pca_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """(L', gh, gw, 3) PCA colours of raw and purified tokens, one basis per layer."""
        raw, pur = [], []
        for k in range(len(self.layers)):
            a, b = style.pca_rgb(self.raw[k], self.purified[k])
            raw.append(a.reshape(*self.grid, 3))
            pur.append(b.reshape(*self.grid, 3))
        return np.stack(raw), np.stack(pur)


def layerwise_data(
    bundle: Any,
    image: ImageView | Any,
    *,
    layers: Sequence[int] | None = None,
    config: Any = None,
    plain_trace: Any = None,
) -> LayerwiseData:
    """Run the plain forward and the per-layer-SOM forward (default ``SFPConfig.paper()``;
    any configuration with ``som_start`` before its detect layer works) on one image.

    plain_trace: a :class:`sfp.core.probe.Trace` of this image (hidden states at ``layers``) to
    reuse instead of running the plain forward again.
    """
    from sfp.core.outliers import mitigate
    from sfp.core.probe import record
    from sfp.methods.config import SFPConfig
    from sfp.methods.purify import SFPEncoder

    view = _view(bundle, image)
    cfg = SFPConfig.paper() if config is None else config
    layers = list(layers) if layers is not None else default_purification_layers(
        bundle.num_layers)
    plain = plain_trace if plain_trace is not None else record(
        bundle, view.pixels, layers=layers, store=("hidden",))
    st = SFPEncoder(bundle, cfg).stages(view.pixels, trace=True)
    grid = tuple(int(g) for g in st.grid)
    raw, pur, masks, counts = [], [], [], []
    for layer in layers:
        raw.append(plain.hidden(layer)[0, 1:].float())
        if st.trace is not None and layer in st.trace.layers:
            h = st.trace.hidden(layer)[:, 1:].float()
        else:  # pragma: no cover - stages(trace=True) records 1..L-1
            raise ValueError(f"layer {layer} is not recorded by the SFP forward (1..L-1)")
        m = st.masks.get(layer)
        counts.append(st.flag_counts(layer) if m is not None else None)
        if m is not None:
            h = mitigate(h, grid, m)
            masks.append(style.to_numpy(m[0]).reshape(grid))
        else:
            masks.append(np.zeros(grid, dtype=bool))
        pur.append(h[0])
    return LayerwiseData(
        layers=layers,
        raw=np.stack([style.to_numpy(t) for t in raw]).astype(np.float32),
        purified=np.stack([style.to_numpy(t) for t in pur]).astype(np.float32),
        masks=np.stack(masks).astype(bool),
        grid=grid,  # type: ignore[arg-type]
        image=view.rgb,
        name=view.name,
        label=bundle.label,
        is_synthetic=bundle.is_synthetic,
        config=repr(cfg),
        criterion_note=paper_criterion_note(cfg.cls_scale, cfg.top_k)
        if cfg.detector == "som" else "",
        counts=counts,
    )


def _range(layers: Sequence[int]) -> str:
    return f"layers {layers[0]}–{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


def layerwise_purification(data: LayerwiseData, *, mode: str = "norm",
                           over_image: bool = True) -> Figure:
    """Paper Fig. 5: row (a) without SOM, row (b) with per-layer SOM, one column per layer.

    mode: "norm" (L2 norm, a shared colour scale per layer with its colour bar under the
    column) or "pca" (PCA RGB, one basis per layer). over_image: draw the maps over the
    image (as the paper does) or alone.
    """
    if mode not in ("norm", "pca"):
        raise ValueError(f"mode must be 'norm' or 'pca', got {mode!r}")
    d = data
    n = len(d.layers)
    gh, gw = d.grid
    px = d.image.shape[0] / gh
    img_w = 1.75
    with style.figure_style():
        fig = style.new_figure(img_w * n + 1.2,
                               (img_w * gh / gw + 0.3) * 2 + (1.75 if mode == "norm" else 1.3))
        axes = fig.subplots(2, n, squeeze=False)
        if mode == "norm":
            raw, pur = d.norm_maps()
            for k in range(n):
                norm = Normalize(vmin=float(min(raw[k].min(), pur[k].min())),
                                 vmax=float(max(raw[k].max(), pur[k].max())))
                im = None
                for r, maps in enumerate((raw, pur)):
                    im = style.show_map(axes[r, k], maps[k],
                                        image=d.image if over_image else None,
                                        patch_px=px, cmap=style.OVERLAY_CMAP, norm=norm,
                                        alpha=0.6)
                cb = style.add_colorbar(fig, im, [axes[0, k], axes[1, k]], "‖h‖₂",
                                        location="bottom", shrink=0.9, aspect=12, pad=0.01)
                cb.ax.tick_params(labelsize=7, rotation=0)
                cb.ax.xaxis.set_major_locator(_MaxTicks(3))
        else:
            raw, pur = d.pca_maps()
            for k in range(n):
                for r, maps in enumerate((raw, pur)):
                    ax = axes[r, k]
                    if over_image:
                        ax.imshow(d.image, aspect="equal")
                        ax.imshow(maps[k], extent=(0, gw * px, gh * px, 0), alpha=0.75,
                                  aspect="equal", interpolation="nearest")
                        ax.set_xlim(0, d.image.shape[1])
                        ax.set_ylim(d.image.shape[0], 0)
                    else:
                        ax.imshow(maps[k], aspect="equal", interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
        for k, layer in enumerate(d.layers):
            axes[0, k].set_title(f"Layer {layer}", fontsize=10, fontweight="bold")
            style.mark_patches(axes[1, k], d.masks[k], patch_px=px if over_image else None)
            axes[1, k].text(0.5, -0.04, d.flag_text(k), transform=axes[1, k].transAxes,
                            ha="center", va="top", fontsize=8)
        axes[0, 0].set_ylabel("(a) without SOM", fontsize=10)
        axes[1, 0].set_ylabel("(b) per-layer SOM", fontsize=10)
        unit = ("colour: token L2 norm ‖h‖₂ (scale per layer, shared by (a) and (b))"
                if mode == "norm" else "colour: first 3 principal components (basis per layer)")
        fig.suptitle(style.wrap_title(style.figure_title(
            f"Layer-wise purification — {d.name}", paper_ref=PAPER_REF, label=d.label,
            is_synthetic=d.is_synthetic, layers=_range(d.layers),
            detail=f"{d.config} · white boxes: SOM's detections · {unit}"
                   + (f" · {d.criterion_note}" if d.criterion_note else "")), 125))
    return fig


class _MaxTicks:
    """A MaxNLocator factory that keeps tick labels from crowding a narrow colour bar."""

    def __new__(cls, n: int):  # type: ignore[misc]
        from matplotlib.ticker import MaxNLocator

        return MaxNLocator(nbins=n, min_n_ticks=2)


def layerwise_purification_plotly(data: LayerwiseData):
    """Interactive version: two rows of norm heatmaps (hover: norm, flagged or not)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    d = data
    n = len(d.layers)
    raw, pur = d.norm_maps()
    fig = make_subplots(rows=2, cols=n, subplot_titles=[*(f"Layer {lay}" for lay in d.layers),
                                                        *(d.flag_text(k) for k in range(n))],
                        horizontal_spacing=0.01, vertical_spacing=0.04)
    scale = style.plotly_colorscale(style.OVERLAY_CMAP)  # the static figure's colour map
    for k in range(n):
        lo = float(min(raw[k].min(), pur[k].min()))
        hi = float(max(raw[k].max(), pur[k].max()))
        x0, x1 = fig.get_subplot(2, k + 1).xaxis.domain
        bar = {"orientation": "h", "x": (x0 + x1) / 2, "xanchor": "center", "len": x1 - x0,
               "y": fig.get_subplot(2, k + 1).yaxis.domain[0] - 0.01, "yanchor": "top",
               "thickness": 8, "tickfont": {"size": 9}, "nticks": 3,
               "title": {"text": "‖h‖₂" if k == 0 else "", "side": "top"}}
        for r, maps in enumerate((raw, pur), start=1):
            fig.add_trace(go.Heatmap(z=maps[k], zmin=lo, zmax=hi, colorscale=scale,
                                     showscale=r == 2, colorbar=bar,
                                     customdata=d.masks[k].astype(int),
                                     hovertemplate="row %{y}, col %{x}<br>‖h‖₂ %{z:.3g}"
                                     "<br>flagged: %{customdata}<extra></extra>"),
                          row=r, col=k + 1)
            sp = fig.get_subplot(r, k + 1)
            fig.update_yaxes(autorange="reversed", showticklabels=False,
                             scaleanchor=sp.xaxis.plotly_name.replace("axis", ""),
                             row=r, col=k + 1)
            fig.update_xaxes(showticklabels=False, row=r, col=k + 1)
    for k in range(n):  # row (b): SOM's flags of that layer, white boxes as in the PNG
        fy, fx = np.nonzero(d.masks[k])
        fig.add_trace(go.Scatter(x=fx, y=fy, mode="markers", showlegend=False,
                                 marker={"symbol": "square-open", "size": 9, "color": "white",
                                         "line": {"width": 1.5}},
                                 hovertemplate="flagged by SOM<extra></extra>"),
                      row=2, col=k + 1)
    fig.update_yaxes(title_text="(a) without SOM", row=1, col=1)
    fig.update_yaxes(title_text="(b) per-layer SOM", row=2, col=1)
    gh, gw = d.grid
    title = style.figure_title(f"Layer-wise purification — {d.name}", paper_ref=PAPER_REF,
                               label=d.label, is_synthetic=d.is_synthetic,
                               layers=_range(d.layers), detail=d.criterion_note or None)
    fig.update_layout(width=max(900, 150 * n), height=int(2 * 150 * gh / gw) + 250,
                      template="plotly_white", margin={"b": 70})
    return style.plotly_title(fig, title)


# --------------------------------------------------------------------------------------------
# Supplement Fig. 2
# --------------------------------------------------------------------------------------------


@dataclass
class SOMDetections:
    """SOM's detections on several images at one layer.

    names: image names. images: list of (H, W, 3). norms: list of (gh, gw) patch norms at the
    layer. masks: list of (gh, gw) bool. params: the detector's keyword arguments.
    """

    layer: int
    names: list[str]
    images: list[np.ndarray]
    norms: list[np.ndarray]
    masks: list[np.ndarray]
    params: dict[str, Any]
    label: str
    is_synthetic: bool

    @property
    def criterion_note(self) -> str:
        """:data:`PAPER_CRITERION_NOTE` when the detections use the paper's criterion."""
        from sfp.core.outliers import som
        from sfp.core.registry import signature_defaults

        p = {**signature_defaults(som), **self.params}
        return paper_criterion_note(p["cls_scale"], p["top_k"])


def som_detections_data(
    bundle: Any,
    images: Sequence[ImageView | Any],
    *,
    layer: int | None = None,
    params: dict[str, Any] | None = None,
    traces: Sequence[Any] | None = None,
) -> SOMDetections:
    """SOM at ``layer`` (default L-1, the official detect layer) of the plain forward of each
    image; params: SOM's keyword arguments (default the paper's eq. 4: ``cls_scale=1.0,
    top_k=None``). traces: already recorded traces of the images (attention and norms at
    ``layer``), one per image, to reuse."""
    from sfp.core.outliers import detect
    from sfp.core.probe import record

    layer = bundle.num_layers - 1 if layer is None else int(layer)
    params = {"cls_scale": 1.0, "top_k": None} if params is None else dict(params)
    names, imgs, norms, masks = [], [], [], []
    if traces is not None and len(traces) != len(images):
        raise ValueError(f"{len(traces)} traces for {len(images)} images")
    for i, img in enumerate(images):
        view = _view(bundle, img)
        tr = traces[i] if traces is not None else record(bundle, view.pixels, layers=[layer],
                                                          heads="mean")
        res = detect("som", tr, layer, **params)
        names.append(view.name)
        imgs.append(view.rgb)
        norms.append(style.to_numpy(tr.to_grid(tr.token_norms(layer))[0]))
        masks.append(style.to_numpy(res.mask[0]).reshape(tr.grid).astype(bool))
    return SOMDetections(layer=layer, names=names, images=imgs, norms=norms, masks=masks,
                         params=params, label=bundle.label, is_synthetic=bundle.is_synthetic)


def _som_title(d: SOMDetections) -> str:
    params = ", ".join(f"{k}={v}" for k, v in d.params.items())
    note = d.criterion_note
    return style.figure_title("SOM's outlier detections on several images", paper_ref=SUPP_REF,
                              label=d.label, is_synthetic=d.is_synthetic,
                              layers=f"layer {d.layer}",
                              detail=f"som({params})" + (f" · {note}" if note else ""))


def som_detections(data: SOMDetections) -> Figure:
    """Supplement Fig. 2: row (a) each image with its patch-norm map, row (b) SOM's mask."""
    d = data
    n = len(d.names)
    img_w = 2.4
    aspect = max(m.shape[0] / m.shape[1] for m in d.masks)
    with style.figure_style():
        fig = style.new_figure((img_w + 0.8) * n + 0.8, (img_w * aspect + 0.45) * 2 + 1.1)
        axes = fig.subplots(2, n, squeeze=False)
        for k in range(n):
            gh = d.masks[k].shape[0]
            px = d.images[k].shape[0] / gh
            im = style.show_map(axes[0, k], d.norms[k], image=d.images[k], patch_px=px,
                                cmap=style.OVERLAY_CMAP, alpha=0.55)
            style.add_colorbar(fig, im, axes[0, k], style.NORM_UNIT if k == n - 1 else None)
            axes[0, k].set_title(d.names[k], fontsize=10, fontweight="bold")
            style.show_map(axes[1, k], d.masks[k].astype(np.float32), cmap="plasma", vmin=0,
                           vmax=1)
            axes[1, k].set_title(f"{int(d.masks[k].sum())} flagged (yellow)", fontsize=9)
        axes[0, 0].set_ylabel("(a) features with outliers", fontsize=10)
        axes[1, 0].set_ylabel("(b) detected by SOM", fontsize=10)
        fig.suptitle(style.wrap_title(_som_title(d), 110))
    return fig


def som_detections_plotly(data: SOMDetections):
    """Interactive version of :func:`som_detections`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    d = data
    n = len(d.names)
    fig = make_subplots(rows=2, cols=n, subplot_titles=[*d.names,
                        *[f"{int(m.sum())} flagged" for m in d.masks]],
                        horizontal_spacing=0.02, vertical_spacing=0.06)
    for k in range(n):
        px = d.images[k].shape[0] / d.masks[k].shape[0]
        fig.add_trace(style.plotly_image(d.images[k]),
                      row=1, col=k + 1)
        fig.add_trace(go.Heatmap(z=d.norms[k], x0=px / 2, dx=px, y0=px / 2, dy=px,
                                 colorscale="Jet", opacity=0.5, showscale=False,
                                 hovertemplate="‖h‖₂ %{z:.3g}<extra></extra>"),
                      row=1, col=k + 1)
        fig.add_trace(go.Heatmap(z=d.masks[k].astype(int), colorscale="Plasma", zmin=0, zmax=1,
                                 showscale=False,
                                 hovertemplate="row %{y}, col %{x}: %{z}<extra></extra>"),
                      row=2, col=k + 1)
        for r in (1, 2):
            sp = fig.get_subplot(r, k + 1)
            fig.update_yaxes(scaleanchor=sp.xaxis.plotly_name.replace("axis", ""),
                             showticklabels=False, row=r, col=k + 1)
            fig.update_xaxes(showticklabels=False, row=r, col=k + 1)
        fig.update_yaxes(autorange="reversed", row=2, col=k + 1)
    fig.update_layout(width=max(700, 260 * n), height=660, template="plotly_white")
    return style.plotly_title(fig, _som_title(d))
