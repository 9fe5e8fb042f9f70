"""Render all five figure families for one image into a folder (used by the CLI and the demo).

>>> rep = render_image(bundle, view, "out/astronaut", queries=queries)
>>> [f.key for f in rep.figures]
['outlier_grid', 'propagation', 'norm_maps', 'detector_agreement', 'stage_ablation',
 'layerwise_purification']

Each :class:`FigureResult` holds the written files, the plotly figure and a short text that
says what to look at (with this image's numbers in it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfp.viz.figures import ablation as ab_mod
from sfp.viz.figures import layerwise as lw_mod
from sfp.viz.figures.agreement import agreement_data, detector_agreement, detector_agreement_plotly
from sfp.viz.figures.export import save_figure
from sfp.viz.figures.outlier_grid import outlier_grid, outlier_grid_data, outlier_grid_plotly
from sfp.viz.figures.propagation import (
    norm_maps,
    norm_maps_plotly,
    propagation,
    propagation_data,
    propagation_plotly,
)
from sfp.viz.figures.views import ImageView

__all__ = ["FAMILIES", "FigureResult", "ImageReport", "render_image", "render_som_detections"]

#: key -> (heading, what it corresponds to).
FAMILIES: dict[str, tuple[str, str]] = {
    "outlier_grid": ("1. Outlier grid", "released notebook; supplement Fig. 1"),
    "propagation": ("2a. Propagation across layers", "paper §3.3, supplement §B"),
    "norm_maps": ("2b. Norm maps per layer", "paper §3.3"),
    "detector_agreement": ("3. Detector agreement", "no paper figure"),
    "stage_ablation": ("4. Stage ablation", "paper Fig. 3"),
    "layerwise_purification": ("5a. Layer-wise purification", "paper Fig. 5"),
    "som_detections": ("5b. SOM's detections over images", "supplement Fig. 2"),
}


@dataclass
class FigureResult:
    """One rendered figure: key (file stem), heading, text (what to look at), files written,
    and the interactive plotly figure (None when not built)."""

    key: str
    heading: str
    text: str
    files: list[Path]
    plotly: Any | None = None


@dataclass
class ImageReport:
    """Everything rendered for one image, and the data behind it (for printed summaries)."""

    view: ImageView
    figures: list[FigureResult] = field(default_factory=list)
    trace: Any = None
    stats: Any = None
    ablation: ab_mod.StageAblationData | None = None
    layerwise: lw_mod.LayerwiseData | None = None


def _fmt_layers(layers: Sequence[int]) -> str:
    return ", ".join(str(v) for v in layers)


def _onset(stats: Any) -> tuple[int | None, float]:
    """First layer where max/median patch norm exceeds 5, and the last layer's ratio."""
    ratio = (stats.max_norm[:, 0] / stats.median_norm[:, 0]).cpu().numpy()
    idx = np.nonzero(ratio > 5.0)[0]
    return (int(stats.layers[idx[0]]) if len(idx) else None), float(ratio[-1])


def render_image(
    bundle: Any,
    view: ImageView,
    out_dir: str | Path,
    *,
    queries: Any,
    classes: Any = None,
    layers: Sequence[int] | None = None,
    detector: str = "som",
    head: str | int = "mean",
    patch: int | tuple[int, int] | None = None,
    config: Any = None,
    baselines: Sequence[str] = ("sclip",),
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 150,
    feature_map: str = "norm",
    interactive: bool = True,
    templates_text: str = "",
    step: Callable[[str], None] | None = None,
) -> ImageReport:
    """Render the five families for ``view`` into ``out_dir`` (created).

    queries: embedded :class:`sfp.models.text.Queries` for the stage ablation's segmentation;
    classes: the class spec they came from (names class 0 "background" for benchmarks that
    have one).
    layers: outlier-grid columns (default 1, 6, 8, 11 scaled). detector/head/patch: the
    outlier grid's options. config: SFP configuration of the stage ablation (default
    official). formats/dpi: static files. feature_map: "norm" or "pca" (stage ablation and
    layer-wise maps). step(name) is called after each figure (progress bars).
    """
    from sfp.core.outliers import available_detectors, layer_statistics
    from sfp.core.probe import record

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tick = step or (lambda _name: None)
    rep = ImageReport(view=view)
    trace = record(bundle, view.pixels)
    detectors = [d for d in ("som", "l2", "lof", "norm_z") if d in available_detectors()]
    stats = layer_statistics(trace, trace.layers, detectors)
    rep.trace, rep.stats = trace, stats
    tick("trace")

    def add(key: str, fig: Any, text: str, plotly_fig: Any) -> None:
        files = save_figure(fig, out / key, formats=formats, dpi=dpi)
        rep.figures.append(FigureResult(key, FAMILIES[key][0] + f" ({FAMILIES[key][1]})", text,
                                        files, plotly_fig))
        tick(key)

    # 1. outlier grid
    og = outlier_grid_data(trace, view.rgb, layers=layers, detector=detector,
                                        head=head, patch=patch)
    counts = ", ".join(f"layer {lay}: {int(og.masks[lay].sum())}" for lay in og.layers)
    add("outlier_grid", outlier_grid(og),
        f"Columns are layers {_fmt_layers(og.layers)}. Top row: the patch-to-patch attention; "
        "bright vertical bands are keys that every patch attends to — the outliers. Rows 2–5: "
        "the class token and the selected patch ★ put their attention on those same few "
        f"patches (white boxes: flagged by {og.detector_text}; {counts}). Bottom row: the "
        "selected patch's attention with the flagged patches removed — what is left is its "
        "attention to its neighbourhood and to related regions.",
        outlier_grid_plotly(og) if interactive else None)

    # 2. propagation + norm maps
    pd = propagation_data(trace, view.rgb, stats=stats)
    onset, ratio = _onset(stats)
    onset_text = (f"the largest patch norm leaves the median at layer {onset} and ends "
                  f"{ratio:.0f}x above it" if onset is not None else
                  f"no patch norm rises above 5x the median (last layer: {ratio:.1f}x)")
    add("propagation", propagation(pd),
        f"(a) Here {onset_text}. (b) The class token's largest attention to a single patch, "
        "against the uniform level 1/N: once outliers exist it pours its attention into "
        "them. (c) How many patches each detector flags. (d, e) Whether flagged patches stay "
        "flagged in later layers: outliers that appear in a middle layer and persist to the "
        "last are what SFP's mitigator removes.",
        propagation_plotly(pd) if interactive else None)
    add("norm_maps", norm_maps(pd, detector=detector),
        "Patch-token norms of every layer on one logarithmic colour scale. Outliers are the "
        "few bright patches: see where they sit (flat, low-information regions such as sky "
        f"or background in real CLIP) and that they stay in place; cyan boxes: {detector}'s "
        "flags.",
        norm_maps_plotly(pd) if interactive else None)

    # 3. agreement
    ad = agreement_data(trace, stats=stats)
    last = ad.jaccard[-1]
    pairs = ", ".join(f"{ad.detectors[i]}–{ad.detectors[j]} {last[i, j]:.2f}"
                      for i, j in ad.pairs() if "som" in (ad.detectors[i], ad.detectors[j]))
    add("detector_agreement", detector_agreement(ad),
        "Jaccard overlap of the patches the detectors flag, per layer. SOM reads attention, "
        "l2 and norm_z read norms, LOF reads neighbourhoods: where they agree the attention "
        "sinks are the high-norm tokens. Blank cells: neither detector flags anything. At "
        f"layer {ad.layers[-1]}: {pairs}.",
        detector_agreement_plotly(ad) if interactive else None)

    # 4. stage ablation
    ab = ab_mod.stage_ablation_data(bundle, view, classes, config=config, baselines=baselines,
                                    queries=queries, trace=trace)
    rep.ablation = ab
    k_sfp = ab.columns.index("SFP")
    cos = ab.cosine(k_sfp, 0)
    flagged = ab.outliers.reshape(-1)
    cos_text = f"mean cosine similarity of SFP's and CLIP's patch features {cos.mean():.2f}"
    if flagged.any():
        cos_text += (f" ({cos[flagged].mean():.2f} at the {int(flagged.sum())} flagged, "
                     f"{cos[~flagged].mean():.2f} elsewhere)")
    add("stage_ablation", ab_mod.stage_ablation(ab, mode=feature_map),
        "Left to right: plain CLIP, SFP with SOM, SOM+SAE and all three stages (SFPConfig "
        f"switches), then {', '.join(ab.columns[4:]) or 'no baselines'}. Top: final patch "
        f"tokens ({feature_map}); white boxes: SOM's outliers at layer {ab.detect_layer} — "
        "bright in CLIP, gone after SOM. Bottom: segmentation of the crop with "
        f"{len(ab.class_names)} classes{templates_text}. Here the {cos_text}.",
        ab_mod.stage_ablation_plotly(ab) if interactive else None)

    # 5. layer-wise purification
    lw = lw_mod.layerwise_data(bundle, view, plain_trace=trace)
    rep.layerwise = lw
    flags = ", ".join(f"{lay}: {int(m.sum())}" for lay, m in zip(lw.layers, lw.masks,
                                                                  strict=True))
    add("layerwise_purification", lw_mod.layerwise_purification(lw, mode=feature_map),
        f"Row (a): token norms of layers {_fmt_layers(lw.layers)} in the plain forward; row "
        "(b): the paper preset, where SOM purifies every layer's output before the next block "
        f"(flagged per layer — {flags}). Bright spots that appear in (a) and stay are "
        "outliers; in (b) they are replaced as soon as they appear and do not propagate.",
        lw_mod.layerwise_purification_plotly(lw) if interactive else None)
    return rep


def render_som_detections(
    bundle: Any,
    views: Sequence[ImageView],
    out_dir: str | Path,
    *,
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 150,
    interactive: bool = True,
    traces: Sequence[Any] | None = None,
    data: lw_mod.SOMDetections | None = None,
) -> FigureResult:
    """Supplement Fig. 2 over ``views``, written to ``out_dir/som_detections.*`` (traces: the
    views' recorded traces, to reuse; data: already computed detections, then ``views`` and
    ``traces`` are not used)."""
    d = data if data is not None else lw_mod.som_detections_data(bundle, views, traces=traces)
    files = save_figure(lw_mod.som_detections(d), Path(out_dir) / "som_detections",
                        formats=formats, dpi=dpi)
    counts = ", ".join(f"{n}: {int(m.sum())}" for n, m in zip(d.names, d.masks, strict=True))
    text = (f"SOM's criterion (paper eq. 4: class-token attention above self-attention, no "
            f"top-k) at layer {d.layer}, on each image. It adapts the number of outliers to "
            f"the image ({counts}); row (a) shows that the flagged patches are the bright, "
            "high-norm ones.")
    key = "som_detections"
    return FigureResult(key, FAMILIES[key][0] + f" ({FAMILIES[key][1]})", text, files,
                        lw_mod.som_detections_plotly(d) if interactive else None)
