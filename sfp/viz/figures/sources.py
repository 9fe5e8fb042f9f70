"""Where outliers come from: neurons, massive activations, interventions, dataset statistics.

:func:`outlier_sources_figure` (one image; data from :func:`outlier_sources_data`):

(a) the three largest |h_l[t, c]| per layer and their median (Sun et al. 2024, "Massive
    Activations", Fig. 1's per-layer top-3): massive activations leave the bulk at the layer
    whose register neurons write them;
(b) the activation maps (gh, gw) of the top register neurons (Jiang, Dravid et al.,
    NeurIPS 2025): each fires on the few patches that become outliers;
(c) the patch-norm map of one layer, original / register neurons zeroed / with test-time
    registers (the register column is shown beside the map), on one log colour scale.

:func:`dataset_figure` draws a :mod:`sfp.seg.stats` file with seaborn: per-layer max / median
patch-norm ratio over the images (boxen plot), the recurrence heatmap of outlier grid positions
at the most common outlier layer, and the mean |activation| of the top neurons.
:func:`coactivation_clustermap` clusters the top neurons by the correlation of their
activations over the patch tokens of a set of images (:func:`neuron_coactivation`): neurons
that write the same outliers fire together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from sfp.core import forward
from sfp.core import neurons as nr
from sfp.core.probe import record
from sfp.viz.figures import style

__all__ = [
    "SourcesData",
    "coactivation_clustermap",
    "dataset_figure",
    "neuron_coactivation",
    "outlier_sources_data",
    "outlier_sources_figure",
]

PAPER_REF = "cf. Sun et al. 2024; Jiang, Dravid et al. 2025"


@dataclass
class SourcesData:
    """One image's outlier sources.

    layers: (L,) 1..L. top_magnitudes: (L, 3); median_magnitude: (L,). neurons: top
    ``(layer, neuron, score)``; neuron_maps: (k, gh, gw) their activations on the patches.
    norm_layer: the layer of ``norm_maps`` {"original" | "ablated" | "registers": (gh, gw)};
    register_norm: norm of the (first) test-time register at that layer.
    """

    layers: list[int]
    grid: tuple[int, int]
    top_magnitudes: np.ndarray
    median_magnitude: np.ndarray
    neurons: list[tuple[int, int, float]]
    neuron_maps: np.ndarray
    norm_layer: int
    norm_maps: dict[str, np.ndarray]
    register_norm: float
    image: np.ndarray | None
    label: str
    is_synthetic: bool


def outlier_sources_data(bundle: Any, pixels: torch.Tensor, image: np.ndarray | None = None,
                         *, neurons: Any = None, top: int = 4,
                         norm_layer: int | None = None) -> SourcesData:
    """Compute :class:`SourcesData` for one normalised image ``pixels`` (1, 3, H, W).

    neurons: the register neurons to intervene on (default: the top 2 found on the image);
    top: neurons whose maps are drawn; norm_layer: default L - 1.
    """
    num_layers = len(forward.blocks_of(forward.visual_of(bundle)))
    src = nr.outlier_sources(bundle, pixels)
    found = src.register_neurons(top)
    chosen = nr.neuron_map(found[:2] if neurons is None else neurons)
    layer = num_layers - 1 if norm_layer is None else int(norm_layer)
    layers = sorted({l for l, _, _ in found})
    tr = record(bundle, pixels, layers=layers, store=("mlp",))
    grid = tr.grid
    maps = np.stack([style.to_numpy(tr.mlp(l)[0, 1 : 1 + grid[0] * grid[1], n])
                     .reshape(grid) for l, n, _ in found])

    def norms(hooks: Any) -> torch.Tensor:
        return record(bundle, pixels, layers=[layer], store=("hidden",),
                      fwd_hooks=hooks).hidden(layer)[0].norm(dim=-1)

    n_patch = grid[0] * grid[1]
    orig = norms(None)
    abl = norms(nr.ablate_neurons(chosen))
    reg = norms(nr.ttr_hooks(bundle, chosen))
    as_map = {"original": orig, "ablated": abl, "registers": reg}
    return SourcesData(
        layers=list(range(1, num_layers + 1)), grid=grid,
        top_magnitudes=style.to_numpy(src.top_magnitudes),
        median_magnitude=style.to_numpy(src.median_magnitude),
        neurons=found, neuron_maps=maps, norm_layer=layer,
        norm_maps={k: style.to_numpy(v[1 : 1 + n_patch]).reshape(grid)
                   for k, v in as_map.items()},
        register_norm=float(reg[1 + n_patch]),
        image=image, label=getattr(bundle, "label", "?"),
        is_synthetic=getattr(bundle, "provenance", "") == "synthetic",
    )


def outlier_sources_figure(d: SourcesData) -> Figure:
    """Top-3 magnitudes per layer, register-neuron maps, norm maps under interventions."""
    k = len(d.neurons)
    ncols = max(k, 3)
    with style.figure_style():
        fig = style.new_figure(2.0 * ncols + 1.0, 7.6)
        sub = fig.subfigures(3, 1, height_ratios=[1.0, 1.0, 1.1])
        ax = sub[0].subplots()
        x = np.array(d.layers)
        for j, marker in enumerate(("o", "s", "^")):
            ax.plot(x, d.top_magnitudes[:, j], marker=marker, ms=3, label=f"top {j + 1}")
        ax.plot(x, d.median_magnitude, "k--", lw=1, label="median")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("|h_l[t, c]|")
        ax.set_title("(a) largest activation magnitudes per layer", fontsize=9)
        ax.legend(fontsize=7, ncol=4)
        axes = sub[1].subplots(1, ncols, squeeze=False)[0]
        for j, a in enumerate(axes):
            if j >= k:
                a.set_axis_off()
                continue
            layer, n, score = d.neurons[j]
            im = style.show_map(a, d.neuron_maps[j], cmap=style.NORM_CMAP, smooth=False)
            style.add_colorbar(sub[1], im, a)
            a.set_title(f"(b) layer {layer} neuron {n}\nscore {score:.3g}", fontsize=8)
        axes = sub[2].subplots(1, 3, squeeze=False)[0]
        vals = np.concatenate([m.ravel() for m in d.norm_maps.values()])
        vmin = max(float(vals.min()), 1e-6)
        norm = LogNorm(vmin=vmin, vmax=max(float(vals.max()), d.register_norm, vmin * 1.0001))
        titles = {"original": "original", "ablated": "register neurons zeroed",
                  "registers": f"test-time register (its norm {d.register_norm:.3g})"}
        im = None
        for a, (key, m) in zip(axes, d.norm_maps.items(), strict=True):
            im = style.show_map(a, m, cmap=style.NORM_CMAP, norm=norm, smooth=False)
            ratio = float(m.max() / np.median(m))
            a.set_title(f"(c) {titles[key]}\nmax/median {ratio:.3g}", fontsize=8)
        assert im is not None
        style.add_colorbar(sub[2], im, list(axes), style.NORM_UNIT + " (log scale)")
        fig.suptitle(style.wrap_title(style.figure_title(
            "Where outliers come from", paper_ref=PAPER_REF, label=d.label,
            is_synthetic=d.is_synthetic, layers=f"norms at layer {d.norm_layer}"), 110))
    return fig


def dataset_figure(path: Any) -> Figure:
    """Seaborn views of a :func:`sfp.seg.stats.dataset_stats` file (see the module doc)."""
    import pandas as pd
    import seaborn as sns

    from sfp.seg.stats import load_stats

    header, a = load_stats(path)
    ratio = a["norm_ratio"]  # (n, L)
    n, num_layers = ratio.shape
    frame = pd.DataFrame({"layer": np.tile(np.arange(1, num_layers + 1), n),
                          "max / median patch norm": ratio.ravel()})
    mode = int(header["common_outlier_layer"])
    with style.figure_style():
        fig = style.new_figure(13.0, 4.2)
        ax_b, ax_h, ax_n = fig.subplots(1, 3, width_ratios=[1.6, 1.0, 1.2])
        sns.boxenplot(data=frame, x="layer", y="max / median patch norm", ax=ax_b,
                      color="#4c72b0")
        ax_b.set_yscale("log")
        ax_b.set_title(f"per-layer norm ratio over {n} images", fontsize=9)
        sns.heatmap(a["recurrence"][mode - 1], ax=ax_h, cmap="rocket", vmin=0, square=True,
                    cbar_kws={"label": "share of images"}, xticklabels=False,
                    yticklabels=False)
        ax_h.set_title(f"outlier recurrence per grid position, layer {mode}", fontsize=9)
        top = a["top_neurons"][:10]
        names = [f"{int(l)}:{int(c)}" for l, c, _ in top]
        sns.barplot(x=top[:, 2], y=names, ax=ax_n, color="#dd8452", orient="h")
        ax_n.set_xscale("log")
        ax_n.set_xlabel("mean |activation| at outlier tokens")
        ax_n.set_ylabel("layer:neuron")
        ax_n.set_title(f"top neurons (layers 1..{header['max_layer']})", fontsize=9)
        label = f"{header['model']} / {header['pretrained']}"
        fig.suptitle(style.wrap_title(style.figure_title(
            "Where outliers come from, over a dataset", paper_ref=PAPER_REF, label=label,
            is_synthetic="synthetic" in header["pretrained"],
            detail=f"{header['source']}, {header['n_images']} images"), 110))
    return fig


def neuron_coactivation(bundle: Any, images: torch.Tensor,
                        neurons: Any) -> tuple[list[str], np.ndarray]:
    """Pearson correlation of the neurons' activations over all patch tokens of ``images``
    (B, 3, H, W): ``(labels "layer:neuron", (k, k) matrix)``; neurons as
    :func:`sfp.core.neurons.neuron_map` takes them."""
    nmap = nr.neuron_map(neurons)
    pairs = [(l, n) for l, ns in nmap.items() for n in ns]
    if len(pairs) < 2:
        raise ValueError(f"co-activation needs at least 2 neurons, got {pairs}.")
    tr = record(bundle, images, layers=sorted(nmap), store=("mlp",))
    n_patch = tr.grid[0] * tr.grid[1]
    cols = [tr.mlp(l)[:, 1 : 1 + n_patch, n].reshape(-1) for l, n in pairs]
    acts = torch.stack(cols, 1).double()  # (B * N, k)
    acts = acts - acts.mean(0)
    std = acts.pow(2).mean(0).sqrt().clamp_min(1e-12)
    corr = (acts.T @ acts) / acts.shape[0] / torch.outer(std, std)
    return [f"{l}:{n}" for l, n in pairs], style.to_numpy(corr)


def coactivation_clustermap(labels: list[str], corr: np.ndarray) -> Figure:
    """Seaborn clustermap of a neuron correlation matrix; returns its figure."""
    import pandas as pd
    import seaborn as sns

    frame = pd.DataFrame(corr, index=labels, columns=labels)
    with style.figure_style():
        grid = sns.clustermap(frame, cmap="vlag", vmin=-1, vmax=1, figsize=(6, 6),
                              cbar_kws={"label": "correlation over patch tokens"})
        grid.figure.suptitle("Co-activation of the top neurons (layer:neuron)", fontsize=10)
    return grid.figure
