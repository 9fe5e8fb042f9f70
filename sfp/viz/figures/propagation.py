"""How outliers appear and propagate layer by layer.

:func:`propagation` (one figure, four aligned panels over the layers of one image):

(a) the largest and the median patch-token L2 norm (log scale): outliers are tokens whose norm
    leaves the bulk, typically from a middle layer on;
(b) the largest class-token attention to a patch, next to the uniform level 1/N: once
    outliers exist the class token pours its attention into them;
(c) how many patches each detector flags;
(d) persistence: of the patches the detector flags at layer l, the fraction still flagged at
    layer m > l (outliers that appear tend to stay).

:func:`norm_maps` draws the per-layer patch-norm maps as small multiples on one shared
logarithmic colour scale (outliers are a few tokens that acquire very large norms from a middle
layer on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from sfp.core import outliers
from sfp.viz.figures import style

__all__ = [
    "PropagationData",
    "norm_maps",
    "norm_maps_plotly",
    "propagation",
    "propagation_data",
    "propagation_plotly",
]

PAPER_REF = "cf. paper §3.3 and supplement §B"


@dataclass
class PropagationData:
    """Per-layer outlier statistics of one image (L recorded layers).

    layers: (L,) layer numbers. max_norm, median_norm: (L,) patch-token L2 norms.
    max_cls_attention: (L,) largest head-mean class-token attention to a patch (NaN where the
    trace holds no attention). counts: {detector: (L,)} flagged patches. masks: {detector:
    (L, gh, gw)} bool. persistence: {detector: (L, L)}, entry [i, j] (j > i) = fraction of the
    patches flagged at layers[i] still flagged at layers[j] (NaN elsewhere / undefined).
    norms: (L, gh, gw) patch-token norms. image: (H, W, 3) or None.
    """

    layers: list[int]
    grid: tuple[int, int]
    max_norm: np.ndarray
    median_norm: np.ndarray
    max_cls_attention: np.ndarray
    counts: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    persistence: dict[str, np.ndarray]
    norms: np.ndarray
    image: np.ndarray | None
    label: str
    is_synthetic: bool
    passed: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def detectors(self) -> list[str]:
        return list(self.counts)

    def flag_counts(self, detector: str, k: int) -> outliers.FlagCounts:
        """Candidates vs kept of ``detector`` at the k-th layer (index into ``layers``)."""
        kept = int(self.counts[detector][k])
        passed = int(self.passed[detector][k]) if detector in self.passed else kept
        return outliers.FlagCounts(passed=passed, kept=kept, total=self.grid[0] * self.grid[1])

    def cut_detectors(self) -> list[str]:
        """Detectors whose top-k cut dropped candidates somewhere (passed > kept) while not
        every patch passed (a detector without a criterion, l2, passes all): the ones whose
        candidate counts are worth drawing next to the kept ones."""
        n = self.grid[0] * self.grid[1]
        return [d for d, p in self.passed.items()
                if (p > self.counts[d]).any() and not (p >= n).all()]

    @property
    def uniform_attention(self) -> float:
        """1 / N: the attention each patch would get if the class token attended uniformly."""
        return 1.0 / (self.grid[0] * self.grid[1])


def _detectors_for(trace: Any, detectors: Sequence[str] | None) -> list[str]:
    if detectors is not None:
        return list(detectors)
    try:
        has_attention = trace.num_heads > 0
    except KeyError:  # TraceError: no attention stored
        has_attention = False
    out = []
    for name in outliers.available_detectors():
        if outliers.get_detector(name).needs == "attention" and not has_attention:
            continue
        out.append(name)
    # A stable, meaningful order: the paper's detector first.
    order = {"som": 0, "l2": 1, "lof": 2, "norm_z": 3}
    return sorted(out, key=lambda n: (order.get(n, 9), n))


def propagation_data(
    trace: Any,
    image: Any = None,
    *,
    layers: Sequence[int] | None = None,
    detectors: Sequence[str] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    index: int = 0,
    stats: outliers.LayerStats | None = None,
) -> PropagationData:
    """Statistics for :func:`propagation` / :func:`norm_maps` from a Trace (hidden states at
    every layer in ``layers``, default all recorded; attention for SOM and panel (b)).

    detectors: default every registered detector the trace can feed; params: per-detector
    keyword arguments (``{"som": {"top_k": None}}``). index: the image of the batch.
    stats: already computed ``layer_statistics(trace, layers, detectors, params)`` to reuse
    (then its layers and detectors are used).
    """
    if stats is None:
        layers = sorted(layers) if layers is not None else list(trace.layers)
        dets = _detectors_for(trace, detectors)
        stats = outliers.layer_statistics(trace, layers, dets, params)
    layers = list(stats.layers)
    grid = tuple(int(g) for g in trace.grid)
    sl = slice(index, index + 1)
    masks = {d: style.to_numpy(m[:, index]).reshape(len(layers), *grid) for d, m in
             stats.masks.items()}
    persistence = {}
    for d, m in stats.masks.items():
        per = outliers.persistence({layer: m[i, sl] for i, layer in enumerate(layers)})
        mat = np.full((len(layers), len(layers)), np.nan)
        for i, li in enumerate(layers):
            for j, lj in enumerate(layers):
                if lj in per.get(li, {}):
                    mat[i, j] = per[li][lj]
        persistence[d] = mat
    cls_max = np.full(len(layers), np.nan)
    for i, layer in enumerate(layers):
        try:
            cls = trace.cls_attention(layer)[index].float().mean(dim=0)
        except KeyError:
            continue
        cls_max[i] = float(cls.max())
    norms = np.stack([style.to_numpy(trace.token_norms(layer)[index, 1:]).reshape(grid)
                      for layer in layers])
    img = None if image is None else np.clip(style.to_numpy(image), 0, 1).astype(np.float32)
    return PropagationData(
        layers=layers,
        grid=grid,  # type: ignore[arg-type]
        max_norm=style.to_numpy(stats.max_norm[:, index]).astype(float),
        median_norm=style.to_numpy(stats.median_norm[:, index]).astype(float),
        max_cls_attention=cls_max,
        counts={d: style.to_numpy(c[:, index]).astype(int) for d, c in stats.counts.items()},
        passed={d: style.to_numpy(c[:, index]).astype(int) for d, c in stats.passed.items()},
        masks={d: m.astype(bool) for d, m in masks.items()},
        persistence=persistence,
        norms=norms.astype(np.float32),
        image=img,
        label=trace.label,
        is_synthetic=trace.is_synthetic,
    )


def _as_data(source: Any, image: Any, kwargs: dict[str, Any]) -> PropagationData:
    return style.data_or_build(source, PropagationData, propagation_data, (image,), kwargs)


def _layer_range(layers: Sequence[int]) -> str:
    return f"layers {layers[0]}–{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


def _norm_panel(ax_n: Any, d: PropagationData, x: np.ndarray) -> None:
    """(a) max and median patch norm per layer, log scale."""
    ax_n.plot(x, d.max_norm, "o-", color="#d62728", label="max patch norm")
    ax_n.plot(x, d.median_norm, "s-", color="#555555", label="median patch norm")
    ax_n.set_yscale("log")
    lo = float(np.nanmin(d.median_norm))
    style.set_log_ticks(ax_n.yaxis, lo * 0.9, float(np.nanmax(d.max_norm)) * 1.1)
    ax_n.set_ylabel("‖h‖₂ (log scale)")
    ax_n.set_title("(a) patch-token L2 norm", loc="left")
    ax_n.legend(loc="upper left")


def _attention_panel(ax_a: Any, d: PropagationData, x: np.ndarray) -> None:
    """(b) the class token's largest attention to one patch against the uniform level."""
    if np.isfinite(d.max_cls_attention).any():
        ax_a.plot(x, d.max_cls_attention, "o-", color="#ff7f0e",
                  label="max over patches (head mean)")
        ax_a.axhline(d.uniform_attention, color="#777777", ls="--", lw=1,
                     label=f"uniform 1/N = {d.uniform_attention:.2g}")
        ax_a.set_yscale("log")
        style.set_log_ticks(ax_a.yaxis, d.uniform_attention * 0.9,
                            float(np.nanmax(d.max_cls_attention)) * 1.1)
        ax_a.legend(loc="upper left")
    else:
        ax_a.text(0.5, 0.5, "no attention recorded", ha="center", va="center",
                  transform=ax_a.transAxes)
    ax_a.set_ylabel("attention weight")
    ax_a.set_title("(b) class-token attention to a patch", loc="left")


def _count_panel(ax_c: Any, d: PropagationData, x: np.ndarray, det: str) -> None:
    """(c) flagged patches per detector and layer."""
    n = d.grid[0] * d.grid[1]
    for i, (name, counts) in enumerate(d.counts.items()):
        kw = style.detector_line(name, i, len(d.counts))
        dx = kw.pop("dx")
        ax_c.plot(x + dx, counts, label=f"{name} kept", lw=2.2 if name == det else 1.3, **kw)
    for name in d.cut_detectors():
        ax_c.plot(x, d.passed[name], color=style.DETECTOR_COLORS.get(name), lw=1.0, ls=":",
                  marker="x", markersize=4, label=f"{name}: passed its criterion")
    ax_c.set_ylabel(f"patches (of {n})")
    ax_c.set_xlabel("layer (output of block l); points offset sideways so equal counts "
                    "stay visible", fontsize=8.5)
    ax_c.set_title("(c) flagged (kept) per detector; dotted: passed the criterion",
                   loc="left")
    ax_c.legend(loc="center", ncols=3, fontsize=7.5, framealpha=0.85)
    ax_c.set_xticks(x)
    ax_c.set_ylim(bottom=0)
    ax_c.grid(alpha=0.3)


def _persistence_panels(fig: Figure, ax_p: Any, ax_s: Any, d: PropagationData, x: np.ndarray,
                        det: str) -> None:
    """(d) persistence matrix of ``det``; (e) flagged at l, still flagged at l + 1."""
    im = ax_p.imshow(d.persistence[det], cmap="magma_r", vmin=0, vmax=1, aspect="equal")
    ax_p.set_xticks(range(len(x)), [str(v) for v in x])
    ax_p.set_yticks(range(len(x)), [str(v) for v in x])
    ax_p.tick_params(labelsize=8)
    ax_p.set_xlabel("later layer m")
    ax_p.set_ylabel("layer l where flagged")
    ax_p.set_title(f"(d) persistence ({det}): flagged at l, still flagged at m", loc="left")
    for side in ("top", "right"):
        ax_p.spines[side].set_visible(True)
    style.add_colorbar(fig, im, ax_p, "fraction still flagged")
    for k, name in enumerate(d.detectors):
        m = d.persistence[name]
        nxt = np.array([m[i, i + 1] for i in range(len(x) - 1)])
        kw = style.detector_line(name, k, len(d.detectors))
        dx = kw.pop("dx")
        ax_s.plot(x[:-1] + dx, nxt, label=name, lw=2.2 if name == det else 1.3, **kw)
    ax_s.set_ylim(-0.05, 1.05)
    ax_s.set_xticks(x)
    ax_s.set_xlabel("layer l")
    ax_s.set_ylabel("fraction")
    ax_s.set_title("(e) flagged at l, still flagged at l + 1", loc="left")
    ax_s.grid(alpha=0.3)


def propagation(source: Any, image: Any = None, *, detector: str | None = None,
                **kwargs: Any) -> Figure:
    """Outlier propagation across layers (panels a-d, see the module doc) as a Figure.

    source: a Trace (keyword arguments of :func:`propagation_data` apply) or PropagationData.
    detector: whose persistence panel (d) shows (default "som" if computed, else the first).
    """
    d = _as_data(source, image, kwargs)
    det = detector or ("som" if "som" in d.counts else d.detectors[0])
    x = np.asarray(d.layers)
    with style.figure_style():
        fig = style.new_figure(11.5, 7.6)
        gs = fig.add_gridspec(3, 2, width_ratios=[1.25, 1.0])
        ax_n = fig.add_subplot(gs[0, 0])
        ax_a = fig.add_subplot(gs[1, 0], sharex=ax_n)
        ax_c = fig.add_subplot(gs[2, 0], sharex=ax_n)
        ax_p = fig.add_subplot(gs[0:2, 1])
        ax_s = fig.add_subplot(gs[2, 1])

        _norm_panel(ax_n, d, x)
        _attention_panel(ax_a, d, x)
        _count_panel(ax_c, d, x, det)
        for ax in (ax_n, ax_a):
            ax.tick_params(labelbottom=False)
            ax.grid(alpha=0.3)
        _persistence_panels(fig, ax_p, ax_s, d, x, det)
        fig.suptitle(style.wrap_title(style.figure_title(
            "Outlier propagation across layers", paper_ref=PAPER_REF, label=d.label,
            is_synthetic=d.is_synthetic, layers=_layer_range(d.layers),
            detail=f"one image, {d.grid[0]} x {d.grid[1]} patches; detectors: "
            + ", ".join(d.detectors),
        ), 120))
    return fig


def norm_maps(source: Any, image: Any = None, *, detector: str | None = None,
              ncols: int | None = None, over_image: bool = False, **kwargs: Any) -> Figure:
    """Small multiples of the patch-norm map of every layer, one shared log colour scale.

    detector: outline its flagged patches in each panel (None: no outlines). over_image:
    draw the maps over the image (default: the maps alone, at grid resolution).
    """
    d = _as_data(source, image, kwargs)
    n_layers = len(d.layers)
    ncols = ncols or min(6, n_layers)
    nrows = int(np.ceil(n_layers / ncols))
    gh, gw = d.grid
    img_w = 1.75
    vmin = max(float(d.norms.min()), 1e-6)
    vmax = max(float(d.norms.max()), vmin * 1.0001)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    px = None if d.image is None else d.image.shape[0] / gh
    with style.figure_style():
        fig = style.new_figure(img_w * ncols + 1.3, (img_w * gh / gw + 0.5) * nrows + 1.2)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        im = None
        for k, ax in enumerate(axes.flat):
            if k >= n_layers:
                ax.set_axis_off()
                continue
            layer = d.layers[k]
            use_img = d.image if over_image else None
            im = style.show_map(ax, d.norms[k], image=use_img, patch_px=px, cmap=style.NORM_CMAP,
                                norm=norm, alpha=0.75, smooth=False)
            title = f"layer {layer}"
            if detector is not None and detector in d.masks:
                cnt = style.mark_patches(ax, d.masks[detector][k],
                                         patch_px=px if over_image else None, color="cyan",
                                         linewidth=0.9)
                fc = d.flag_counts(detector, k)
                title += f"\n{fc.short}" if fc.kept < fc.passed or fc.none_above \
                    else f"\n{cnt} flagged"
            ax.set_title(title, fontsize=8.5)
        assert im is not None
        cb = style.add_colorbar(fig, im, axes, style.NORM_UNIT + " (log scale)", shrink=0.8)
        style.set_log_ticks(cb.ax.yaxis, vmin, vmax)
        detail = f"{gh} x {gw} patches, class token excluded"
        if detector is not None:
            detail += f" · {detector}'s flags outlined in cyan"
            if outliers.get_detector(detector).needs == "attention":
                detail += (" (from block l's attention, which reads block l-1's output: it "
                           "reacts one layer after the norms)")
        fig.suptitle(style.wrap_title(style.figure_title(
            "Patch-token norm maps per layer", paper_ref=PAPER_REF, label=d.label,
            is_synthetic=d.is_synthetic, layers=_layer_range(d.layers), detail=detail), 110))
    return fig


def propagation_plotly(source: Any, image: Any = None, *, detector: str | None = None,
                       **kwargs: Any):
    """Interactive version of :func:`propagation` (panels a-d)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    d = _as_data(source, image, kwargs)
    det = detector or ("som" if "som" in d.counts else d.detectors[0])
    x = list(d.layers)
    fig = make_subplots(
        rows=3, cols=2, column_widths=[0.55, 0.45], shared_xaxes=True,
        specs=[[{}, {"rowspan": 3}], [{}, None], [{}, None]],
        subplot_titles=["(a) patch-token L2 norm (log)", f"(d) persistence ({det})",
                        "(b) max class-token attention (log)", "(c) flagged patches"],
        vertical_spacing=0.07, horizontal_spacing=0.1,
    )
    fig.add_trace(go.Scatter(x=x, y=d.max_norm, name="max norm", mode="lines+markers",
                             line={"color": "#d62728"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=d.median_norm, name="median norm", mode="lines+markers",
                             line={"color": "#555555"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=d.max_cls_attention, name="max cls attention",
                             mode="lines+markers", line={"color": "#ff7f0e"}), row=2, col=1)
    fig.add_trace(go.Scatter(x=x, y=[d.uniform_attention] * len(x), name="uniform 1/N",
                             mode="lines", line={"color": "#777777", "dash": "dash"}),
                  row=2, col=1)
    for name, counts in d.counts.items():
        fig.add_trace(go.Scatter(x=x, y=counts, name=f"{name} kept", mode="lines+markers",
                                 line={"color": style.DETECTOR_COLORS.get(name)}), row=3, col=1)
    for name in d.cut_detectors():
        fig.add_trace(go.Scatter(x=x, y=d.passed[name], name=f"{name}: passed its criterion",
                                 mode="lines+markers", marker={"symbol": "x"},
                                 line={"color": style.DETECTOR_COLORS.get(name),
                                       "dash": "dot", "width": 1}), row=3, col=1)
    fig.add_trace(go.Heatmap(z=d.persistence[det], x=[str(v) for v in x],
                             y=[str(v) for v in x], zmin=0, zmax=1, colorscale="Reds",
                             colorbar={"title": "fraction<br>still flagged", "x": 1.02},
                             hovertemplate="flagged at %{y}, still at %{x}: %{z:.2f}"
                             "<extra></extra>"), row=1, col=2)
    fig.update_yaxes(type="log", title_text="‖h‖₂", row=1, col=1)
    fig.update_yaxes(type="log", title_text="attention", row=2, col=1)
    fig.update_yaxes(title_text="patches", row=3, col=1)
    fig.update_xaxes(title_text="layer", row=3, col=1)
    fig.update_yaxes(autorange="reversed", title_text="flagged at layer l", row=1, col=2)
    fig.update_xaxes(title_text="later layer m", row=1, col=2)
    title = style.figure_title("Outlier propagation across layers", paper_ref=PAPER_REF,
                               label=d.label, is_synthetic=d.is_synthetic,
                               layers=_layer_range(d.layers))
    fig.update_layout(height=680,
                      width=1100, template="plotly_white",
                      legend={"orientation": "h", "y": -0.12})
    return style.plotly_title(fig, title)


def norm_maps_plotly(source: Any, image: Any = None, **kwargs: Any):
    """Interactive per-layer norm maps: one heatmap with a layer slider (log10 colour)."""
    import plotly.graph_objects as go

    d = _as_data(source, image, kwargs)
    logn = np.log10(np.maximum(d.norms, 1e-6))
    zmin, zmax = float(logn.min()), float(logn.max())
    hover = "row %{y}, col %{x}<br>‖h‖₂ = %{customdata:.3g}<extra></extra>"
    frames = [
        go.Frame(name=str(layer), data=[go.Heatmap(z=logn[k], customdata=d.norms[k], zmin=zmin,
                                                   zmax=zmax, colorscale="Magma",
                                                   hovertemplate=hover,
                                                   colorbar={"title": "log10 ‖h‖₂"})])
        for k, layer in enumerate(d.layers)
    ]
    fig = go.Figure(data=frames[-1].data, frames=frames)
    steps = [{"label": str(layer), "method": "animate",
              "args": [[str(layer)], {"mode": "immediate", "frame": {"duration": 0},
                                      "transition": {"duration": 0}}]}
             for layer in d.layers]
    gh, gw = d.grid
    title = style.figure_title("Patch-token norm map (drag the slider to change layer)",
                               paper_ref=PAPER_REF, label=d.label,
                               is_synthetic=d.is_synthetic, layers=_layer_range(d.layers))
    fig.update_layout(
        sliders=[{"steps": steps, "active": len(steps) - 1,
                  "currentvalue": {"prefix": "layer "}}],
        yaxis={"autorange": "reversed", "scaleanchor": "x", "title": "patch row"},
        xaxis={"title": "patch column"},
        width=max(560, int(560 * gw / gh)), height=620, template="plotly_white",
    )
    return style.plotly_title(fig, title)
