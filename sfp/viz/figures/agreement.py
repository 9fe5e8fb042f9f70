"""Do the outlier detectors agree? Jaccard overlap of their flagged sets, layer by layer.

For detectors a and b at layer l, J = |F_a ∩ F_b| / |F_a ∪ F_b| over the flagged patches of
one image (undefined, shown blank, when neither flags anything), averaged over the images of
the trace where it is defined. SOM reads attention, the others hidden states (l2 and norm_z
norms, lof neighbourhoods), so high agreement means the attention sinks are also the
high-norm tokens — what the paper's outlier analysis (and the design notes' alternative
detectors) presume.

:func:`detector_agreement` draws one annotated Jaccard matrix per chosen layer and, below,
each pair's Jaccard across all layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sfp.core import outliers
from sfp.viz.figures import style
from sfp.viz.figures.propagation import _detectors_for
from sfp.viz.figures.views import default_layers

__all__ = ["AgreementData", "agreement_data", "detector_agreement", "detector_agreement_plotly",
           "jaccard"]

PAPER_REF = "no paper figure: SOM vs. the l2 / LOF / norm-z alternatives"


def jaccard(a: Any, b: Any) -> np.ndarray:
    """Jaccard overlap of two masks (..., N) bool -> (...) float, NaN where both are empty."""
    a = style.to_numpy(a).astype(bool)
    b = style.to_numpy(b).astype(bool)
    inter = (a & b).sum(axis=-1).astype(float)
    union = (a | b).sum(axis=-1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


@dataclass
class AgreementData:
    """Pairwise detector agreement.

    layers: (L,). detectors: (D,) names. jaccard: (L, D, D), image-averaged, NaN where
    undefined (diagonal 1 where the detector flags something). counts: (L, D) mean flagged
    patches per image. num_images: B.
    """

    layers: list[int]
    detectors: list[str]
    jaccard: np.ndarray
    counts: np.ndarray
    num_images: int
    grid: tuple[int, int]
    label: str
    is_synthetic: bool

    def pairs(self) -> list[tuple[int, int]]:
        """Index pairs (i < j) of the detectors."""
        return list(itertools.combinations(range(len(self.detectors)), 2))


def agreement_data(
    trace: Any,
    *,
    layers: Sequence[int] | None = None,
    detectors: Sequence[str] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    stats: outliers.LayerStats | None = None,
) -> AgreementData:
    """Jaccard matrices of ``detectors`` (default: all the trace can feed) at ``layers``
    (default: all recorded), averaged over the trace's images.

    stats: already computed ``layer_statistics(trace, layers, detectors, params)`` to reuse
    (then ``layers`` / ``detectors`` / ``params`` are taken from it).
    """
    if stats is None:
        layers = sorted(layers) if layers is not None else list(trace.layers)
        dets = _detectors_for(trace, detectors)
        stats = outliers.layer_statistics(trace, layers, dets, params)
    layers, dets = list(stats.layers), list(stats.masks)
    masks = np.stack([style.to_numpy(stats.masks[d]) for d in dets], axis=1)  # (L, D, B, N)
    n_l, n_d = masks.shape[:2]
    jac = np.full((n_l, n_d, n_d), np.nan)
    for i in range(n_d):
        for j in range(n_d):
            per_image = jaccard(masks[:, i], masks[:, j])  # (L, B)
            with np.errstate(invalid="ignore"), _quiet():
                jac[:, i, j] = np.nanmean(per_image, axis=-1)
    counts = masks.sum(axis=-1).mean(axis=-1)
    return AgreementData(
        layers=layers, detectors=dets, jaccard=jac, counts=counts,
        num_images=int(masks.shape[2]), grid=tuple(int(g) for g in trace.grid),  # type: ignore
        label=trace.label, is_synthetic=trace.is_synthetic,
    )


class _quiet:
    """Silence numpy's "mean of empty slice" warning (an all-NaN mean is NaN, as intended)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def _as_data(source: Any, kwargs: dict[str, Any]) -> AgreementData:
    return style.data_or_build(source, AgreementData, agreement_data, (), kwargs)


def _title(d: AgreementData) -> str:
    lay = d.layers
    rng = f"layers {lay[0]}–{lay[-1]}" if len(lay) > 1 else f"layer {lay[0]}"
    img = "one image" if d.num_images == 1 else f"mean over {d.num_images} images"
    return style.figure_title(
        "Detector agreement (Jaccard overlap of flagged patches)", paper_ref=PAPER_REF,
        label=d.label, is_synthetic=d.is_synthetic, layers=rng,
        detail=f"{img}; {d.grid[0]} x {d.grid[1]} patches; blank = neither flags anything",
    )


def detector_agreement(source: Any, *, heatmap_layers: Sequence[int] | None = None,
                       **kwargs: Any) -> Figure:
    """Jaccard heatmaps at ``heatmap_layers`` (default: the notebook's layers 1, 6, 8, 11
    scaled to the depth, those that were computed) above a line per detector pair across all
    layers. source: a Trace (keyword arguments of :func:`agreement_data`) or AgreementData."""
    d = _as_data(source, kwargs)
    if heatmap_layers is None:
        depth = max(d.layers)
        heatmap_layers = [layer for layer in default_layers(max(depth, 1)) if layer in d.layers]
        if not heatmap_layers:
            heatmap_layers = d.layers[-4:]
    hl = list(heatmap_layers)
    n_d = len(d.detectors)
    cmap = "YlGnBu"
    with style.figure_style():
        fig = style.new_figure(max(2.55 * len(hl) + 1.2, 8.0), 7.4)
        sub = fig.subfigures(2, 1, height_ratios=[1.0, 1.0])
        axes = sub[0].subplots(1, len(hl), squeeze=False)[0]
        im = None
        for ax, layer in zip(axes, hl, strict=True):
            k = d.layers.index(layer)
            mat = d.jaccard[k]
            im = ax.imshow(mat, vmin=0, vmax=1, cmap=cmap, aspect="equal")
            ax.set_xticks(range(n_d), d.detectors, rotation=40, ha="right", fontsize=8.5)
            ax.set_yticks(range(n_d), d.detectors if ax is axes[0] else [], fontsize=8.5)
            for s in ("top", "right"):
                ax.spines[s].set_visible(True)
            for i in range(n_d):
                for j in range(n_d):
                    v = mat[i, j]
                    txt = "–" if np.isnan(v) else f"{v:.2f}"
                    ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                            color="white" if (not np.isnan(v) and v > 0.55) else "black")
            ax.set_title(f"layer {layer}", fontsize=10, fontweight="bold")
        assert im is not None
        style.add_colorbar(sub[0], im, list(axes), "Jaccard |A∩B| / |A∪B|")

        ax = sub[1].subplots()
        x = np.asarray(d.layers)
        palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
                   "#666666"]
        for p, (i, j) in enumerate(d.pairs()):
            name = f"{d.detectors[i]} – {d.detectors[j]}"
            ax.plot(x, d.jaccard[:, i, j], "o-", color=palette[p % len(palette)], label=name,
                    lw=2.2 if "som" in (d.detectors[i], d.detectors[j]) else 1.2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(x)
        ax.set_xlabel("layer (output of block l)")
        ax.set_ylabel("Jaccard")
        ax.grid(alpha=0.3)
        ax.set_title("each pair across layers (pairs with som drawn thicker)", loc="left")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8.5, frameon=False)
        fig.suptitle(style.wrap_title(_title(d), 120))
    return fig


def detector_agreement_plotly(source: Any, **kwargs: Any):
    """Interactive version: Jaccard matrix with a layer slider, and the pair lines."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    d = _as_data(source, kwargs)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.42, 0.58],
                        subplot_titles=["Jaccard matrix (slider: layer)", "pairs across layers"])
    text = [[["–" if np.isnan(v) else f"{v:.2f}" for v in row] for row in mat]
            for mat in d.jaccard]
    k0 = len(d.layers) - 1
    fig.add_trace(go.Heatmap(z=d.jaccard[k0], x=d.detectors, y=d.detectors, zmin=0, zmax=1,
                             colorscale="Blues", text=text[k0], texttemplate="%{text}",
                             colorbar={"title": "Jaccard", "x": 0.4},
                             hovertemplate="%{y} vs %{x}: %{z:.2f}<extra></extra>"),
                  row=1, col=1)
    for i, j in d.pairs():
        fig.add_trace(go.Scatter(x=d.layers, y=d.jaccard[:, i, j], mode="lines+markers",
                                 name=f"{d.detectors[i]} – {d.detectors[j]}"), row=1, col=2)
    steps = [{"label": str(layer), "method": "restyle",
              "args": [{"z": [d.jaccard[k]], "text": [text[k]]}, [0]]}
             for k, layer in enumerate(d.layers)]
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_yaxes(range=[-0.03, 1.03], title_text="Jaccard", row=1, col=2)
    fig.update_xaxes(title_text="layer", row=1, col=2)
    fig.update_layout(
        sliders=[{"steps": steps, "active": k0, "currentvalue": {"prefix": "layer "},
                  "len": 0.4}],
        width=1150, height=560, template="plotly_white",
    )
    return style.plotly_title(fig, _title(d))
