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


_TOY_SAE = (" On the toy CLIP the local information lives in the residual stream, so SAE (a "
            "last block without residual or MLP) costs more than the outliers do: over 100 "
            "toy scenes with planted outliers +SOM scores 67 % mIoU, +SOM+SAE 39 %, plain "
            "CLIP 35 % (benchmarks/toy_outliers.py).")


def _truth_text(ab: Any) -> str:
    """The note's sentence with each column's mIoU against the image's truth ("" without)."""
    if ab.truth is None:
        return ""
    scores = ", ".join(f"{c} {ab.miou(k):.2f}" for k, c in enumerate(ab.columns))
    return f" Against the ground truth (bottom left), this image's mIoU: {scores}."


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
    as_released: bool = True,
    grid_view: ImageView | None = None,
) -> ImageReport:
    """Render the five families for ``view`` into ``out_dir`` (created).

    queries: embedded :class:`sfp.models.text.Queries` for the stage ablation's segmentation;
    classes: the class spec they came from (names class 0 "background" for benchmarks that
    have one).
    layers: outlier-grid columns (default 1, 6, 8, 11 scaled). detector/head/patch: the
    outlier grid's options. config: SFP configuration of the stage ablation (default
    official). formats/dpi: static files. feature_map: "norm" or "pca" (stage ablation and
    layer-wise maps). step(name) is called after each figure (progress bars).
    as_released: the outlier grid as the released notebook draws it (head mean, release's
    criterion; ``detector`` and ``head`` then apply to the other families only), drawn on
    ``grid_view`` (the image squashed to 224 x 224: ``image_view(..., squash=True)``; None:
    ``view``). False: the sfp variant on ``view`` with ``detector`` and ``head``.
    """
    from sfp.core.outliers import available_detectors, layer_statistics
    from sfp.core.probe import record

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tick = step or (lambda _name: None)
    rep = ImageReport(view=view)
    rep.trace = record(bundle, view.pixels)
    detectors = [d for d in ("som", "l2", "lof", "norm_z") if d in available_detectors()]
    rep.stats = layer_statistics(rep.trace, rep.trace.layers, detectors)
    tick("trace")
    r = _Renderer(rep, out, formats, dpi, interactive, tick)
    if as_released:
        gv = grid_view or view
        trace = rep.trace if gv is view else record(bundle, gv.pixels)
        r.outlier_grid(layers, None, "mean", patch, trace=trace, image=gv.rgb)
    else:
        r.outlier_grid(layers, detector, head, patch)
    r.propagation(detector)
    r.agreement()
    r.ablation(bundle, classes, config, baselines, queries, feature_map, templates_text)
    r.layerwise(bundle, feature_map)
    return rep


@dataclass
class _Renderer:
    """Draws and saves one image's figure families into ``rep`` (one method per family)."""

    rep: ImageReport
    out: Path
    formats: Sequence[str]
    dpi: int
    interactive: bool
    tick: Callable[[str], None]

    def add(self, key: str, fig: Any, text: str, plotly_fig: Any) -> None:
        files = save_figure(fig, self.out / key, formats=self.formats, dpi=self.dpi,
                            source=self.rep.trace)
        self.rep.figures.append(FigureResult(key, FAMILIES[key][0] + f" ({FAMILIES[key][1]})",
                                             text, files, plotly_fig))
        self.tick(key)

    def _plotly(self, builder: Callable[..., Any], data: Any) -> Any:
        return builder(data) if self.interactive else None

    def outlier_grid(self, layers: Any, detector: str | None, head: Any, patch: Any,
                     trace: Any = None, image: Any = None) -> None:
        released = detector is None
        og = outlier_grid_data(trace if released else self.rep.trace,
                               image if released else self.rep.view.rgb, layers=layers,
                               detector=detector, head=head, patch=patch,
                               as_released=released)
        counts = "; ".join(f"layer {lay}: {og.flag_text(lay, short=False)}"
                           for lay in og.layers)
        variant = ("As released (outlier_vis.ipynb): the image squashed to a square, the "
                   "head-mean attention with the class token's row scaled by 1.5, every patch "
                   "with 1.5 A[cls, i] > A[i, i] flagged (no top-k). " if released else
                   "sfp variant (unscaled attention, the chosen detector). ")
        self.add("outlier_grid", outlier_grid(og),
                 variant + f"Columns are layers {_fmt_layers(og.layers)}. Top row: the "
                 "patch-to-patch "
                 "attention; bright vertical bands are keys that every patch attends to — the "
                 "outliers. Rows 2–5: the class token and the selected patch ★ put their "
                 "attention on those same few patches (white boxes: flagged by "
                 f"{og.detector_text}; {counts}). A top-k detector always keeps up to k "
                 "patches: where many pass its criterion, the kept ones need not be outliers. "
                 "Layer l's attention is computed from the output of block l - 1, so it "
                 "reacts one layer after the norms (output of block l) jump. Bottom row: the "
                 "selected patch's attention with the flagged patches removed — what is left "
                 "is its attention to its neighbourhood and to related regions.",
                 self._plotly(outlier_grid_plotly, og))

    def propagation(self, detector: str) -> None:
        pd = propagation_data(self.rep.trace, self.rep.view.rgb, stats=self.rep.stats)
        onset, ratio = _onset(self.rep.stats)
        onset_text = (f"the largest patch norm leaves the median at layer {onset} and ends "
                      f"{ratio:.0f}x above it" if onset is not None else
                      f"no patch norm rises above 5x the median (last layer: {ratio:.1f}x)")
        self.add("propagation", propagation(pd),
                 f"(a) Here {onset_text}. (b) The class token's largest attention to a single "
                 "patch, against the uniform level 1/N: once outliers exist it pours its "
                 "attention into them. (c) How many patches each detector flags. (d, e) "
                 "Whether flagged patches stay flagged in later layers: outliers that appear "
                 "in a middle layer and persist to the last are what SFP's mitigator removes.",
                 self._plotly(propagation_plotly, pd))
        self.add("norm_maps", norm_maps(pd, detector=detector),
                 "Patch-token norms of every layer on one logarithmic colour scale. Outliers are "
                 "the few bright patches: see where they sit (flat, low-information regions "
                 "such as sky or background in real CLIP) and that they stay in place; cyan "
                 f"boxes: {detector}'s flags.",
                 self._plotly(norm_maps_plotly, pd))

    def agreement(self) -> None:
        ad = agreement_data(self.rep.trace, stats=self.rep.stats)
        last = ad.jaccard[-1]
        pairs = ", ".join(f"{ad.detectors[i]}–{ad.detectors[j]} {last[i, j]:.2f}"
                          for i, j in ad.pairs() if "som" in (ad.detectors[i], ad.detectors[j]))
        self.add("detector_agreement", detector_agreement(ad),
                 "Jaccard overlap of the patches the detectors flag, per layer. SOM reads "
                 "attention, l2 and norm_z read norms, LOF reads neighbourhoods: where they "
                 "agree the attention sinks are the high-norm tokens. Blank cells: neither "
                 f"detector flags anything. At layer {ad.layers[-1]}: {pairs}.",
                 self._plotly(detector_agreement_plotly, ad))

    def ablation(self, bundle: Any, classes: Any, config: Any, baselines: Sequence[str],
                 queries: Any, feature_map: str, templates_text: str) -> None:
        ab = ab_mod.stage_ablation_data(bundle, self.rep.view, classes, config=config,
                                        baselines=baselines, queries=queries,
                                        trace=self.rep.trace)
        self.rep.ablation = ab
        cos = ab.cosine(ab.columns.index("SFP"), 0)
        flagged = ab.outliers.reshape(-1)
        cos_text = f"mean cosine similarity of SFP's and CLIP's patch features {cos.mean():.2f}"
        if flagged.any():
            cos_text += (f" ({cos[flagged].mean():.2f} at the {int(flagged.sum())} flagged, "
                         f"{cos[~flagged].mean():.2f} elsewhere)")
        toy = _TOY_SAE if getattr(bundle, "is_toy", False) else ""
        self.add("stage_ablation", ab_mod.stage_ablation(ab, mode=feature_map),
                 "Left to right: the stage ladder — plain CLIP, SFP with SOM, SOM+SAE and all "
                 f"three stages — then {', '.join(ab.columns[4:]) or 'no baselines'}. Top: "
                 f"final patch tokens ({feature_map}); white boxes: SOM's outliers at layer "
                 f"{ab.detect_layer} — bright in CLIP, gone after SOM. Bottom: segmentation of "
                 f"the crop with {len(ab.class_names)} classes{templates_text}. Here the "
                 f"{cos_text}.{_truth_text(ab)}{toy}",
                 self._plotly(ab_mod.stage_ablation_plotly, ab))

    def layerwise(self, bundle: Any, feature_map: str) -> None:
        lw = lw_mod.layerwise_data(bundle, self.rep.view, plain_trace=self.rep.trace)
        self.rep.layerwise = lw
        flags = ", ".join(f"{lay}: {int(m.sum())}" for lay, m in zip(lw.layers, lw.masks,
                                                                      strict=True))
        self.add("layerwise_purification", lw_mod.layerwise_purification(lw, mode=feature_map),
                 f"Row (a): token norms of layers {_fmt_layers(lw.layers)} in the plain "
                 "forward; row (b): the paper preset, where SOM purifies every layer's output "
                 f"before the next block (flagged per layer — {flags}). Bright spots that "
                 "appear in (a) and stay are outliers; in (b) they are replaced as soon as they "
                 "appear and do not propagate." + _criterion_caption(lw),
                 self._plotly(lw_mod.layerwise_purification_plotly, lw))


def _criterion_caption(lw: lw_mod.LayerwiseData) -> str:
    """The paper-criterion caveat with this figure's largest per-layer count, or ""."""
    if not lw.criterion_note:
        return ""
    n = lw.grid[0] * lw.grid[1]
    k = max(range(len(lw.layers)), key=lambda i: int(lw.masks[i].sum()))
    return (f" Note: {lw.criterion_note} (here up to {int(lw.masks[k].sum())} of {n} patches, "
            f"layer {lw.layers[k]}): most of those flags are not outliers.")


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
                        formats=formats, dpi=dpi, source=bundle)
    counts = ", ".join(f"{n}: {int(m.sum())}" for n, m in zip(d.names, d.masks, strict=True))
    text = (f"SOM's criterion (paper eq. 4: class-token attention above self-attention, no "
            f"top-k) at layer {d.layer}, on each image. It adapts the number of outliers to "
            f"the image ({counts}); row (a) shows that the flagged patches are the bright, "
            "high-norm ones.")
    if d.criterion_note:
        text += (f" Note: {lw_mod.PAPER_CRITERION_NOTE} (before the outliers appear), so on "
                 "other layers most of its flags are not outliers.")
    key = "som_detections"
    return FigureResult(key, FAMILIES[key][0] + f" ({FAMILIES[key][1]})", text, files,
                        lw_mod.som_detections_plotly(d) if interactive else None)
