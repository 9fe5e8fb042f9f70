"""Stage ablation (paper Fig. 3): what each SFP stage does to the features and the labels.

For one image crop and a class list, the columns are the stage ladder of
:mod:`sfp.methods.stages` (``CLIP``, ``+SOM``, ``+SOM+SAE``, ``SFP``: the same stages as the
``StageComparison`` widget), then any baselines of :func:`sfp.methods.encoders.make_encoder`
(e.g. ``"sclip"``). Rows:

1. the feature map of each column: by default (``space="tokens"``) of its final patch tokens
   before ``ln_post`` (the residual stream, where outliers carry their massive norms; for SFP
   the tokens X that ``ln_post`` and ``proj`` turn into features), or (``space="features"``)
   of the patch features after ``ln_post`` and ``proj`` that the text is compared with. Shown
   as the L2 norm per patch, or (``mode="pca"``) as the first three principal components in
   RGB on a basis shared by all columns. The outliers SOM finds (the full configuration's
   final set) are outlined in white in every column, so one sees them suppressed stage by
   stage;
2. the segmentation of the crop from the same features by
   :meth:`sfp.seg.pipeline.Segmenter.segment_window` (the pipeline's window logits and
   post-processing, the crop being its one window), so feature map and labels match.

Paper Fig. 3 shows (a) the noisy feature with outliers (our CLIP column), (b) the feature
purified by SOM (+SOM) and (c) the semantic feature with SAE (+SOM+SAE).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from sfp.core import forward
from sfp.methods.encoders import make_encoder
from sfp.methods.purify import SFPEncoder
from sfp.methods.stages import stage_ladder
from sfp.seg.benchmarks import BENCHMARKS
from sfp.seg.pipeline import Segmenter, class_palette
from sfp.viz.figures import style
from sfp.viz.figures.views import CropFigureData, ImageView, image_view

__all__ = [
    "StageAblationData",
    "stage_ablation",
    "stage_ablation_data",
    "stage_ablation_plotly",
]

PAPER_REF = "paper Fig. 3 (with outliers / +SOM / +SAE), extended"


@dataclass
class StageAblationData(CropFigureData):
    """Features and labels of every column for one image.

    columns: names. tokens: (K, N, C) float32 final patch tokens before ln_post per column.
    features: (K, N, D) float32 patch features (ln_post, proj) per column. labels: (K, H', W')
    int64 class per pixel of the crop (H' x W' = the patch grid's pixel extent). outliers:
    (gh, gw) bool, the full SFP configuration's final outlier set. class_names: C names.
    image: (H, W, 3) crop in [0, 1]. config: the SFP configuration's constructor text.
    truth: (H', W') int64 ground-truth class per pixel of the labelled extent (255 = not
    scored) when the image's view carries one (:attr:`ImageView.truth`), else None.
    """

    columns: list[str]
    tokens: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    outliers: np.ndarray
    class_names: list[str]
    detect_layer: int
    meta: dict[str, Any] = field(default_factory=dict)
    counts: Any = None  # FlagCounts of SOM at the detect layer (passed vs kept), or None
    truth: np.ndarray | None = None

    def miou(self, k: int) -> float | None:
        """Column k's mIoU against :attr:`truth` on this one image (classes in neither the
        prediction nor the truth left out; 255 not scored), or None without a truth."""
        if self.truth is None:
            return None
        from sfp.seg.metrics import ConfusionAccumulator

        acc = ConfusionAccumulator(len(self.class_names)).update(self.labels[k], self.truth)
        return float(acc.summary().miou)

    @property
    def flag_text(self) -> str:
        """E.g. "10 kept of 37 above the criterion (top-k)" (:class:`FlagCounts`)."""
        if self.counts is None:
            return f"{int(self.outliers.sum())} outliers"
        return self.counts.text

    def values(self, space: str = "tokens") -> np.ndarray:
        """(K, N, C) tokens (``space="tokens"``) or (K, N, D) features (``"features"``)."""
        if space not in ("tokens", "features"):
            raise ValueError(f"space must be 'tokens' or 'features', got {space!r}")
        return self.tokens if space == "tokens" else self.features

    def norms(self, k: int, space: str = "tokens") -> np.ndarray:
        """Per-patch L2 norm of column k's tokens or features: (gh, gw)."""
        return np.linalg.norm(self.values(space)[k], axis=-1).reshape(self.grid)

    def cosine(self, k: int, ref: int = 0) -> np.ndarray:
        """Cosine similarity per patch between column k's and column ``ref``'s features:
        (N,)."""
        a = self.features[k] / np.maximum(np.linalg.norm(self.features[k], axis=-1,
                                                         keepdims=True), 1e-12)
        b = self.features[ref] / np.maximum(np.linalg.norm(self.features[ref], axis=-1,
                                                           keepdims=True), 1e-12)
        return (a * b).sum(-1)

    def pca_maps(self, space: str = "tokens") -> list[np.ndarray]:
        """First three principal components as RGB, one basis for all columns: K x
        (gh, gw, 3)."""
        rgbs = style.pca_rgb(*list(self.values(space)))
        return [r.reshape(*self.grid, 3) for r in rgbs]

    def overlay(self, k: int, alpha: float = 0.55) -> np.ndarray:
        """Column k's labels blended over the crop with the VOC palette: (H', W', 3) float."""
        return self.overlay_labels(self.labels[k], alpha)

    def overlay_labels(self, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
        """(H', W') class ids blended over the crop (255, not scored: the image alone)."""
        h, w = labels.shape
        colours = class_palette(self.class_names)[labels % 256].astype(np.float32) / 255.0
        a = np.where(labels[..., None] == 255, 0.0, alpha).astype(np.float32)
        return (1 - a) * self.image[:h, :w] + a * colours


def _tokens_of(enc: Any, pixels: torch.Tensor, h_prev: torch.Tensor | None,
               grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(final patch tokens, patch features), each (1, N, .), of a baseline; only its block L
    runs when h_{L-1} is given. An encoder without token access gives its features twice."""
    if h_prev is not None and hasattr(enc, "last_block"):
        block = forward.blocks_of(enc.visual)[enc.num_layers - 1]
        t = enc.last_block(block, h_prev, grid)[:, 1:]
    elif hasattr(enc, "encode_tokens"):
        t = enc.encode_tokens(pixels)[:, 1:]
    else:
        f = enc.encode_patches(pixels)
        return f, f
    return t, forward.project_patches(enc.visual, t)


def stage_ablation_data(
    bundle: Any,
    image: ImageView | Any,
    classes: Any,
    *,
    config: Any = None,
    baselines: Sequence[str] = (),
    templates: Any = None,
    logit_scale: float | None = None,
    queries: Any = None,
    trace: Any = None,
) -> StageAblationData:
    """Encode ``image`` with every stage of :func:`sfp.methods.stages.stage_ladder` and
    ``baselines``; segment each with :class:`sfp.seg.pipeline.Segmenter`.

    image: an :class:`ImageView` or anything :func:`image_view` reads (224 crop). classes:
    any class spec of :class:`~sfp.seg.pipeline.Segmenter` (``"cat; dog; grass"``,
    ``"voc21"``). config: the full SFP configuration (default ``SFPConfig.official()``; a
    preset name works too). templates: prompt templates (None = the 80 OpenAI templates;
    ``"simple"`` is much faster). logit_scale: None = the benchmark's (for a benchmark
    name) or the default. queries: already embedded :class:`sfp.models.text.Queries` to
    reuse. trace: a :class:`sfp.core.probe.Trace` of this image with hidden states at layers
    L-1 and L; CLIP's tokens are then its h_L, and each baseline only runs its own block L on
    h_{L-1} (same numbers, one forward instead of one per column).
    """
    view = image if isinstance(image, ImageView) else image_view(bundle, image)
    pixels = view.pixels
    seg = _segmenter(bundle, classes, templates, logit_scale, queries)
    clip = make_encoder(bundle, "clip")
    last = bundle.num_layers
    grid = clip.grid(pixels)
    h_prev = trace.hidden(last - 1).to(bundle.dtype) if trace is not None else None
    names, toks, feats = [], [], []
    mask, full_cfg, detect_layer, counts = None, None, 0, None
    with torch.no_grad():
        for name, method, cfg in stage_ladder(config):
            if method == "clip":
                t = trace.hidden(last)[:, 1:].to(bundle.dtype) if trace is not None else \
                    clip.encode_tokens(pixels)[:, 1:]
                f = forward.project_patches(bundle.visual, t)
            else:
                st = SFPEncoder(bundle, cfg).stages(pixels)
                t, f = st.x_final, st.features
                mask, full_cfg, detect_layer = st.mask[0], cfg, st.config.detect_layer
                counts = st.flag_counts() if st.masks else None
            names.append(name)
            toks.append(t[0])
            feats.append(f[0])
        for method in baselines:
            enc = make_encoder(bundle, method)
            t, f = _tokens_of(enc, pixels, h_prev, grid)
            toks.append(t[0])
            feats.append(f[0])
            names.append(enc.display)
    rgb8 = (np.clip(view.rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    labels = [style.to_numpy(seg.segment_window(f, grid, rgb8).labels) for f in feats]
    assert mask is not None
    gh, gw = grid
    truth = None
    if view.truth is not None:
        h, w = labels[0].shape
        truth = view.truth[:h, :w].astype(np.int64)
    return StageAblationData(
        columns=names,
        tokens=np.stack([style.to_numpy(t.float()) for t in toks]).astype(np.float32),
        features=np.stack([style.to_numpy(f.float()) for f in feats]).astype(np.float32),
        labels=np.stack(labels).astype(np.int64),
        outliers=style.to_numpy(mask).astype(bool).reshape(grid),
        class_names=list(seg.class_names),
        grid=(int(gh), int(gw)),
        image=view.rgb,
        name=view.name,
        label=bundle.label,
        is_synthetic=bundle.is_synthetic,
        config=repr(full_cfg),
        detect_layer=int(detect_layer),
        meta={"logit_scale": seg.logit_scale},
        counts=counts,
        truth=truth,
    )


def _segmenter(bundle: Any, classes: Any, templates: Any, logit_scale: float | None,
               queries: Any) -> Segmenter:
    """The pipeline that labels every column: the benchmark's settings for a benchmark."""
    kw: dict[str, Any] = {"templates": templates, "queries": queries, "method": "clip"}
    if logit_scale is not None:
        kw["logit_scale"] = logit_scale
    if isinstance(classes, str) and classes in BENCHMARKS:
        return Segmenter.for_benchmark(bundle, classes, **kw)
    return Segmenter(bundle, classes, **kw)


def _title(d: StageAblationData) -> str:
    return style.figure_title(
        f"Stage ablation — {d.name}", paper_ref=PAPER_REF, label=d.label,
        is_synthetic=d.is_synthetic,
        layers=f"outliers detected at layer {d.detect_layer}, replaced block {d.detect_layer + 1}",
        detail=f"{d.config} · {d.grid[0]} x {d.grid[1]} patches · white boxes: SOM's "
        f"outliers, {d.flag_text}",
    )


def stage_ablation(data: StageAblationData, *, mode: str = "norm",
                   space: str = "tokens") -> Figure:
    """Paper Fig. 3 generalised: image + one column per stage / baseline; row 1 feature maps
    (``mode="norm"``: per-patch L2 norm with a colour bar per column; ``"pca"``: PCA RGB) of
    the final tokens (``space="tokens"``) or the projected features (``"features"``), row 2
    segmentation over the crop, with a class legend."""
    if mode not in ("norm", "pca"):
        raise ValueError(f"mode must be 'norm' or 'pca', got {mode!r}")
    data.values(space)  # validates space
    d = data
    k = len(d.columns)
    gh, gw = d.grid
    img_w = 2.2
    px = d.image.shape[0] / gh
    pca = d.pca_maps(space) if mode == "pca" else None
    # next to a ground truth the labels are drawn nearly opaque, to be compared by colour
    alpha = 0.55 if d.truth is None else 0.85
    what = "final tokens (before ln_post)" if space == "tokens" else "features (ln_post, proj)"
    from matplotlib.patches import Patch

    with style.figure_style():
        fig = style.new_figure((img_w + (0.75 if mode == "norm" else 0.1)) * (k + 1) + 0.8,
                               (img_w * gh / gw + 0.45) * 2 + 1.4)
        axes = fig.subplots(2, k + 1, squeeze=False)
        axes[0, 0].imshow(d.image, aspect="equal")
        axes[0, 0].set_title("image (crop)", fontsize=10)
        axes[0, 0].set_xticks([])
        axes[0, 0].set_yticks([])
        style.mark_patches(axes[0, 0], d.outliers, patch_px=px)
        for j in range(k):
            ax = axes[0, j + 1]
            if pca is None:
                im = style.show_map(ax, d.norms(j, space), cmap=style.NORM_CMAP)
                style.add_colorbar(fig, im, ax, "L2 norm ‖x‖₂" if j == k - 1 else None)
            else:
                ax.imshow(pca[j], aspect="equal", interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            style.mark_patches(ax, d.outliers, color="white" if pca is None else "black")
            score = d.miou(j)
            ax.set_title(d.columns[j] if score is None else f"{d.columns[j]}\nmIoU {score:.2f}",
                         fontsize=10, fontweight="bold")
            ax2 = axes[1, j + 1]
            h, w = d.labels.shape[1:]
            ax2.imshow(d.overlay(j, alpha), extent=(0, w, h, 0), aspect="equal")
            ax2.set_xticks([])
            ax2.set_yticks([])
        axes[0, 1].set_ylabel(what + ":\n" + ("L2 norm" if pca is None else "PCA → RGB"),
                              fontsize=9)
        axes[1, 1].set_ylabel("segmentation", fontsize=9.5)
        # The ground truth under the image where it is known; legend of the classes present
        # in any column (and the truth), below the figure.
        if d.truth is None:
            axes[1, 0].set_axis_off()
            present = sorted({int(c) for c in np.unique(d.labels)})
        else:
            h, w = d.truth.shape
            axes[1, 0].imshow(d.overlay_labels(d.truth, alpha), extent=(0, w, h, 0),
                              aspect="equal")
            axes[1, 0].set_title("ground truth", fontsize=10)
            axes[1, 0].set_xticks([])
            axes[1, 0].set_yticks([])
            scored = d.truth[d.truth != 255]
            present = sorted({int(c) for c in np.unique(d.labels)} | {int(c) for c in scored})
        pal = class_palette(d.class_names)
        handles = [Patch(facecolor=pal[c % 256] / 255.0, edgecolor="black",
                         label=d.class_names[c] if c < len(d.class_names) else str(c))
                   for c in present]
        fig.legend(handles=handles, loc="outside lower center", fontsize=8.5, frameon=False,
                   ncols=min(len(handles), 8), title="segmentation classes present",
                   title_fontsize=9)
        if pca is not None:
            axes[0, -1].text(1.02, 0.5, "colours: first 3 principal\ncomponents, one basis "
                             "for\nall columns", transform=axes[0, -1].transAxes, fontsize=8,
                             va="center", ha="left")
        fig.suptitle(style.wrap_title(_title(d), 125))
    return fig


def stage_ablation_plotly(data: StageAblationData, *, space: str = "tokens"):
    """Interactive version: token (or feature) norms (hover: norm and the cosine similarity
    of the column's projected features to CLIP's) and segmentation overlays."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    d = data
    k = len(d.columns)
    fig = make_subplots(rows=2, cols=k, subplot_titles=[*d.columns, *[""] * k],
                        horizontal_spacing=0.02, vertical_spacing=0.06)
    oy, ox = np.nonzero(d.outliers)
    for j in range(k):
        cos = d.cosine(j, 0).reshape(d.grid)
        x0, x1 = fig.get_subplot(1, j + 1).xaxis.domain
        y0 = fig.get_subplot(1, j + 1).yaxis.domain[0]
        bar = {"orientation": "h", "x": (x0 + x1) / 2, "xanchor": "center", "len": x1 - x0,
               "y": y0, "yanchor": "top", "thickness": 8, "tickfont": {"size": 9},
               "title": {"text": "‖h‖₂" if j == 0 else "", "side": "top"}}
        fig.add_trace(go.Heatmap(z=d.norms(j, space), customdata=cos, colorscale="Magma",
                                 showscale=True, colorbar=bar,
                                 hovertemplate="row %{y}, col %{x}<br>norm %{z:.3g}<br>"
                                 "cos to CLIP %{customdata:.2f}<extra></extra>"),
                      row=1, col=j + 1)
        fig.add_trace(go.Scatter(x=ox, y=oy, mode="markers", showlegend=False,
                                 marker={"symbol": "square-open", "size": 9, "color": "white"},
                                 hoverinfo="skip"), row=1, col=j + 1)
        fig.add_trace(style.plotly_image(d.overlay(j)), row=2, col=j + 1)
        fig.update_yaxes(autorange="reversed", row=1, col=j + 1)
    for r in (1, 2):
        for c in range(1, k + 1):
            sp = fig.get_subplot(r, c)
            fig.update_yaxes(scaleanchor=sp.xaxis.plotly_name.replace("axis", ""),
                             showticklabels=False, row=r, col=c)
            fig.update_xaxes(showticklabels=False, row=r, col=c)
    pal = class_palette(d.class_names)
    for c in sorted({int(v) for v in np.unique(d.labels)}):  # the class legend
        r, g, b = (int(v) for v in pal[c % 256])
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", showlegend=True,
                                 name=d.class_names[c] if c < len(d.class_names) else str(c),
                                 marker={"symbol": "square", "size": 12,
                                         "color": f"rgb({r},{g},{b})",
                                         "line": {"color": "black", "width": 1}}),
                      row=2, col=1)
    gh, gw = d.grid
    fig.update_layout(width=max(900, 230 * k), height=int(2 * 230 * gh / gw) + 260,
                      template="plotly_white", showlegend=True,
                      legend={"orientation": "h", "x": 0.5, "xanchor": "center", "y": -0.02,
                              "yanchor": "top", "title": {"text": "segmentation classes: "}})
    return style.plotly_title(fig, _title(d))
