"""The outlier grid: attention maps across layers, the outliers they reveal, and their removal.

The released SFP notebook (``SFP_ICCV/outlier_vis.ipynb``) draws, for layers 1, 6, 8, 11 of
ViT-B/16 (its 0-indexed 0, 5, 7, 10), seven rows; this module draws the same for any model,
layers and selected patch:

1. the patch-to-patch attention matrix (N x N; outliers show as bright vertical bands: every
   query attends to the same few keys);
2. the class token's attention to each patch, as a map;
3. the same over the image;
4. the selected patch's attention to each patch (the star marks the patch);
5. the same over the image;
6. the outlier mask;
7. the selected patch's attention with the flagged patches set to zero, over the image.

Two variants, and every figure says which one it is:

- **as released** (``as_released=True``, the default; what the notebook computes): the image
  squashed to 224 x 224 without cropping (:func:`~sfp.viz.figures.views.image_view` with
  ``squash=True``), the head mean of each layer's attention with the class token's
  attention to the patches (row 0, columns 1..N) multiplied by 1.5 before anything is shown
  (the release's forward scales it by ``res_cls * res_scale = 0.3 * 5`` per head before
  returning it), the centre patch (105 of a 14 x 14 grid), and as outliers every patch with
  ``1.5 A[cls, i] > A[i, i]``, no top-k;
- **sfp variant** (``as_released=False``): unscaled attention of the head mean or one head,
  the mask of any registered detector (default SOM with its top-k 10), any image crop.

With ``layers=(2, 4, 6, 8, 10)`` rows 1, 4/5 and 2/3 are supplement Fig. 1 (a), (b)/(c), (d).

>>> trace = record(bundle, view.pixels)
>>> fig = outlier_grid(trace, view.rgb)                 # matplotlib Figure
>>> figp = outlier_grid_plotly(trace, view.rgb)         # plotly Figure
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from sfp.core.outliers import FlagCounts
from sfp.viz.figures import style
from sfp.viz.figures.views import default_layers, patch_index

__all__ = ["CLS_SCALE", "OutlierGridData", "ROW_LABELS", "outlier_grid", "outlier_grid_data",
           "outlier_grid_plotly"]

PAPER_REF = "released notebook outlier_vis.ipynb; supplement Fig. 1"
#: The factor the release applies to the class token's attention to the patches.
CLS_SCALE = 1.5
_RELEASED_DETECTOR = "1.5·A[cls,i] > A[i,i], no top-k"

#: The seven rows, top to bottom.
ROW_LABELS = (
    "patch→patch attention\n(row: query, column: key)",
    "class-token attention",
    "class-token attention\nover the image",
    "selected patch's\nattention (★)",
    "selected patch's\nattention over the image",
    "outlier mask",
    "selected patch's attention,\noutliers removed",
)


@dataclass
class OutlierGridData:
    """Everything the outlier grid shows, for one image.

    layers: the L' layers (columns). grid: (gh, gw). patch: selected patch index (row-major).
    head: "mean" or a head index. attention: {layer: (T, T)} float32 of that head (or the
    head mean), T = 1 + gh * gw. masks: {layer: (gh, gw)} bool from ``detector``. image:
    (H, W, 3) in [0, 1] or None. label: model and weights; is_synthetic: planted-outlier model.
    """

    layers: list[int]
    grid: tuple[int, int]
    patch: int
    head: str | int
    detector: str
    detector_params: dict[str, Any]
    attention: dict[int, np.ndarray]
    masks: dict[int, np.ndarray]
    image: np.ndarray | None
    label: str
    is_synthetic: bool
    as_released: bool = False
    counts: dict[int, FlagCounts] = field(default_factory=dict)

    @property
    def variant_text(self) -> str:
        """Which variant the figure shows (see the module docstring)."""
        return ("as released (outlier_vis.ipynb: class-token row × 1.5)" if self.as_released
                else "sfp variant")

    def flag_text(self, layer: int, short: bool = True) -> str:
        """Candidates vs kept at ``layer`` (:class:`sfp.core.outliers.FlagCounts`)."""
        fc = self.counts.get(layer)
        if fc is None:
            return f"{int(self.masks[layer].sum())} flagged"
        return fc.short if short else fc.text

    @property
    def patch_rc(self) -> tuple[int, int]:
        """Selected patch as (row, col)."""
        return divmod(self.patch, self.grid[1])

    @property
    def patch_px(self) -> float | None:
        """Image pixels per patch (None without an image)."""
        return None if self.image is None else self.image.shape[0] / self.grid[0]

    def matrix(self, layer: int) -> np.ndarray:
        """Patch-to-patch attention (N, N)."""
        return self.attention[layer][1:, 1:]

    def cls_map(self, layer: int) -> np.ndarray:
        """Class token -> patches, (gh, gw)."""
        return self.attention[layer][0, 1:].reshape(self.grid)

    def patch_map(self, layer: int) -> np.ndarray:
        """Selected patch -> patches, (gh, gw)."""
        return self.attention[layer][1 + self.patch, 1:].reshape(self.grid)

    def patch_map_clean(self, layer: int) -> np.ndarray:
        """Selected patch -> patches with the flagged patches set to 0 (not renormalised, as
        in the notebook), (gh, gw)."""
        return np.where(self.masks[layer], 0.0, self.patch_map(layer))

    @property
    def head_text(self) -> str:
        return "head mean" if self.head == "mean" else f"head {self.head}"

    @property
    def detector_text(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.detector_params.items())
        return f"{self.detector}({params})" if params else self.detector


def outlier_grid_data(
    trace: Any,
    image: Any = None,
    *,
    layers: Sequence[int] | None = None,
    detector: str | None = None,
    head: str | int = "mean",
    patch: int | tuple[int, int] | None = None,
    index: int = 0,
    detector_params: Mapping[str, Any] | None = None,
    as_released: bool = True,
) -> OutlierGridData:
    """Collect what :func:`outlier_grid` draws from a :class:`sfp.core.probe.Trace`.

    trace: recorded with attention (heads="all" for a single ``head``) and, for hidden-state
    detectors (l2, lof, norm_z), hidden states, at ``layers``. image: (H, W, 3) in [0, 1] (the
    image the trace was recorded on; as released: squashed to 224 x 224) or None. layers:
    default the notebook's 1, 6, 8, 11 scaled to the depth. patch: index, (row, col) or None =
    centre. index: which image of the batch.

    as_released (default): the notebook's computation (module docstring); ``detector``,
    ``detector_params`` and a single ``head`` need ``as_released=False``. Otherwise:
    detector: any registered detector (default "som"; its mask comes from its own definition,
    e.g. SOM on the head mean), attention unscaled.
    """
    if as_released and (detector is not None or detector_params or head != "mean"):
        raise ValueError("the as-released outlier grid uses the head mean and the release's "
                         "criterion; pass as_released=False to choose a detector, its "
                         "parameters or a head.")
    detector = detector or "som"
    layers = list(layers) if layers is not None else default_layers(trace.num_layers)
    grid = tuple(int(g) for g in trace.grid)
    params = dict(detector_params or {})
    attention, masks, counts = {}, {}, {}
    for layer in layers:
        att = trace.attention(layer)[index]  # (H, T, T)
        if as_released:
            a = att.float().mean(dim=0).clone()
            a[0, 1:] *= CLS_SCALE
            attention[layer] = style.to_numpy(a).astype(np.float32)
            flagged = a[0, 1:] > torch.diagonal(a[1:, 1:])
            masks[layer] = style.to_numpy(flagged).astype(bool).reshape(grid)
            n_flag = int(flagged.sum())  # no top-k: every patch past the criterion is kept
            counts[layer] = FlagCounts(passed=n_flag, kept=n_flag, total=int(flagged.numel()))
            continue
        if head == "mean":
            a = att.float().mean(dim=0)
        else:
            if not isinstance(head, int) or not 0 <= head < att.shape[0]:
                raise ValueError(
                    f"head must be 'mean' or an int in 0..{att.shape[0] - 1} (the trace holds "
                    f"{att.shape[0]} head(s)), got {head!r}"
                )
            a = att[head].float()
        attention[layer] = style.to_numpy(a).astype(np.float32)
        res = trace.outliers(detector, layer, **params)
        masks[layer] = style.to_numpy(res.mask[index]).astype(bool).reshape(grid)
        counts[layer] = res.flag_counts(index)
    img = None if image is None else np.clip(style.to_numpy(image), 0, 1).astype(np.float32)
    if img is not None and img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    return OutlierGridData(
        layers=layers,
        grid=grid,  # type: ignore[arg-type]
        patch=patch_index(patch, grid),  # type: ignore[arg-type]
        head=head,
        detector=_RELEASED_DETECTOR if as_released else detector,
        detector_params={} if as_released else params,
        attention=attention,
        masks=masks,
        image=img,
        label=trace.label,
        is_synthetic=trace.is_synthetic,
        as_released=as_released,
        counts=counts,
    )


def _as_data(source: Any, image: Any, kwargs: dict[str, Any]) -> OutlierGridData:
    return style.data_or_build(source, OutlierGridData, outlier_grid_data, (image,), kwargs)


def _title(d: OutlierGridData) -> str:
    p, (r, c) = d.patch, d.patch_rc
    return style.figure_title(
        "Attention outliers across layers",
        paper_ref=PAPER_REF,
        label=d.label,
        is_synthetic=d.is_synthetic,
        layers="layers " + ", ".join(map(str, d.layers)),
        detail=f"{d.variant_text} · attention: {d.head_text} · outliers: {d.detector_text} "
        "(outlined in white) · "
        f"selected patch ★ #{p} (row {r}, col {c}) of a {d.grid[0]} x {d.grid[1]} grid",
    )


def outlier_grid(source: Any, image: Any = None, **kwargs: Any) -> Figure:
    """The outlier grid as a matplotlib Figure: 7 rows x len(layers) columns of panels.

    source: a Trace (then ``image`` and the keyword arguments of :func:`outlier_grid_data`) or
    an :class:`OutlierGridData`. Every continuous panel has its own colour bar (attention
    weights differ by orders of magnitude between layers); flagged patches are outlined in
    white on rows 2-5 and 7.
    """
    d = _as_data(source, image, kwargs)
    ncols = len(d.layers)
    gh, gw = d.grid
    aspect = gh / gw
    img_w = 2.05  # inches of one map; its colour bar and ticks take ~0.8 more
    with style.figure_style():
        fig = style.new_figure((img_w + 0.85) * ncols + 1.3, (img_w * aspect + 0.42) * 7 + 1.1)
        axes = fig.subplots(7, ncols, squeeze=False)
        px = d.patch_px
        prow, pcol = d.patch_rc
        for j, layer in enumerate(d.layers):
            mask = d.masks[layer]
            col = axes[:, j]
            # 1. matrix
            n = gh * gw
            im = col[0].imshow(d.matrix(layer), cmap=style.ATTENTION_CMAP, aspect="equal",
                               interpolation="nearest")
            col[0].set_xticks([0, n - 1])
            col[0].set_yticks([0, n - 1])
            col[0].tick_params(labelsize=7, length=2)
            style.add_colorbar(fig, im, col[0], style.ATTENTION_UNIT if j == ncols - 1 else None)
            col[0].set_title(f"Layer {layer}", fontsize=11, fontweight="bold")
            # 2-3. class token
            im = style.show_map(col[1], d.cls_map(layer))
            style.mark_patches(col[1], mask)
            style.add_colorbar(fig, im, col[1], style.ATTENTION_UNIT if j == ncols - 1 else None)
            im = style.show_map(col[2], d.cls_map(layer), image=d.image, patch_px=px,
                                cmap=style.OVERLAY_CMAP)
            style.mark_patches(col[2], mask, patch_px=px)
            style.add_colorbar(fig, im, col[2], style.ATTENTION_UNIT if j == ncols - 1 else None)
            # 4-5. selected patch
            im = style.show_map(col[3], d.patch_map(layer))
            style.mark_point(col[3], prow, pcol)
            style.add_colorbar(fig, im, col[3], style.ATTENTION_UNIT if j == ncols - 1 else None)
            im = style.show_map(col[4], d.patch_map(layer), image=d.image, patch_px=px,
                                cmap=style.OVERLAY_CMAP)
            style.mark_point(col[4], prow, pcol, patch_px=px)
            style.mark_patches(col[4], mask, patch_px=px)
            style.add_colorbar(fig, im, col[4], style.ATTENTION_UNIT if j == ncols - 1 else None)
            # 6. mask
            style.show_map(col[5], mask.astype(np.float32), cmap=style.MASK_CMAP, vmin=0, vmax=1)
            col[5].set_title(f"flagged (yellow): {d.flag_text(layer)}", fontsize=8.5)
            if d.counts.get(layer) is not None and d.counts[layer].none_above:
                col[5].text(0.5, 0.5, "no outlier above\nthe criterion", ha="center",
                            va="center", transform=col[5].transAxes, fontsize=10,
                            fontweight="bold", color="white")
            # 7. cleaned
            im = style.show_map(col[6], d.patch_map_clean(layer), image=d.image, patch_px=px,
                                cmap=style.OVERLAY_CMAP)
            style.mark_point(col[6], prow, pcol, patch_px=px)
            style.add_colorbar(fig, im, col[6], style.ATTENTION_UNIT if j == ncols - 1 else None)
        for i, text in enumerate(ROW_LABELS):
            if i == 5:
                text = f"outlier mask\n{d.detector_text}"
            axes[i, 0].set_ylabel(text, fontsize=9.5)
        fig.suptitle(style.wrap_title(_title(d), 120))
    return fig


def outlier_grid_plotly(source: Any, image: Any = None, **kwargs: Any):
    """The outlier grid as an interactive plotly Figure (hover shows exact weights)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    d = _as_data(source, image, kwargs)
    ncols = len(d.layers)
    gh, gw = d.grid
    px = d.patch_px or 1.0
    short = ["patch→patch", "cls attention", "cls over image", "patch ★ attention",
             "patch ★ over image", "outlier mask", "★ w/o outliers"]
    titles = [f"L{layer}: {short[r]}" + (f" ({d.flag_text(layer)})" if r == 5 else "")
              for r in range(7) for layer in d.layers]
    fig = make_subplots(rows=7, cols=ncols, subplot_titles=titles, horizontal_spacing=0.03,
                        vertical_spacing=0.025)
    prow, pcol = d.patch_rc
    hover = "row %{y}, col %{x}<br>weight %{z:.4g}<extra></extra>"

    def heat(z: np.ndarray, r: int, c: int, over_image: bool, colorscale: str = "Viridis",
             zmin: float | None = None, zmax: float | None = None) -> None:
        if over_image and d.image is not None:
            fig.add_trace(style.plotly_image(d.image),
                          row=r, col=c)
            fig.add_trace(
                go.Heatmap(z=z, x0=px / 2, dx=px, y0=px / 2, dy=px, colorscale=colorscale,
                           opacity=0.5, showscale=False, zmin=zmin, zmax=zmax,
                           hovertemplate="weight %{z:.4g}<extra></extra>"),
                row=r, col=c,
            )
        else:
            fig.add_trace(go.Heatmap(z=z, colorscale=colorscale, showscale=False, zmin=zmin,
                                     zmax=zmax, hovertemplate=hover), row=r, col=c)
            fig.update_yaxes(autorange="reversed", row=r, col=c)

    for j, layer in enumerate(d.layers, start=1):
        heat(d.matrix(layer), 1, j, False)
        heat(d.cls_map(layer), 2, j, False)
        heat(d.cls_map(layer), 3, j, True, "Jet")
        heat(d.patch_map(layer), 4, j, False)
        heat(d.patch_map(layer), 5, j, True, "Jet")
        heat(d.masks[layer].astype(float), 6, j, False, "Cividis", 0, 1)
        heat(d.patch_map_clean(layer), 7, j, True, "Jet")
        for r, on_img in ((4, False), (5, True), (7, True)):
            x, y = ((pcol + 0.5) * px, (prow + 0.5) * px) if on_img and d.image is not None \
                else (pcol, prow)
            fig.add_trace(go.Scatter(x=[x], y=[y], mode="markers", showlegend=False,
                                     marker={"symbol": "star", "size": 12, "color": "red",
                                             "line": {"color": "white", "width": 1}},
                                     hovertext="selected patch", hoverinfo="text"),
                          row=r, col=j)
    for r in range(1, 8):
        for c in range(1, ncols + 1):
            sp = fig.get_subplot(r, c)
            anchor = sp.xaxis.plotly_name.replace("axis", "")
            fig.update_yaxes(scaleanchor=anchor, showticklabels=False, row=r, col=c)
            fig.update_xaxes(showticklabels=False, row=r, col=c)
    fig.update_layout(
        height=260 * 7 * max(gh / gw, 0.6) + 160,
        width=max(900, 260 * ncols),
        margin={"l": 30, "r": 30, "b": 30},
        template="plotly_white",
    )
    fig.update_annotations(font_size=10)
    return style.plotly_title(fig, _title(d))
