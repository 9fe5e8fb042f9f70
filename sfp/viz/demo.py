"""The demo report (``sfp demo``, ``make demo``): the analysis figure families on four images.

It loads ViT-B/16 with pretrained weights when they are available (``$SFP_CHECKPOINT`` or the
``openai`` tag from the local cache / the network) and otherwise the toy CLIP shipped with sfp
(:mod:`sfp.models.toy`, trained on generated textures) with planted outliers — saying which, at
the top of the report and in the terminal. Then, for three scikit-image photos and one generated
scene (the toy CLIP: four generated texture scenes, segmented into the six textures), it
records every layer, runs the outlier detectors and the SFP stages, and writes
``demo_output/report.html`` with the figures (PNG)
and a short text for each saying what to look at, plus ``interactive.html`` (plotly,
offline). The terminal shows the text queries embedded, a per-layer outlier table for one
image, the tokens SOM flags there and how much SFP's features differ from CLIP's.

Options: ``--out DIR`` (default ``demo_output``), ``--quick`` (one image), ``--synthetic``
(skip looking for weights), ``--model NAME`` (with ``--synthetic``: the planted random model of
that architecture; ``toy``: the toy CLIP without planted outliers).
"""

from __future__ import annotations

import dataclasses
import html
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["DEMO_IMAGES", "DEMO_TEMPLATES", "generated_scene", "run_demo"]

#: The scikit-image photos the demo uses (bundled with scikit-image, no download).
DEMO_IMAGES = ("astronaut", "chelsea", "coffee")
#: One prompt template keeps text embedding of the 56 voc21 names to a few seconds on a CPU
#: (the paper averages the 80 OpenAI ImageNet templates).
DEMO_TEMPLATES = ("a photo of a {}.",)
DEMO_CLASSES = "voc21"
#: Without real weights: the toy CLIP's classes, template and scenes (toy val split).
TOY_CLASSES = "toy"
TOY_TEMPLATES = ("a photo of {}.",)
TOY_SCENES = 4


def generated_scene(height: int = 224, width: int = 320, seed: int = 0) -> np.ndarray:
    """A drawn landscape (sky, sun, hills, meadow, a house and a tree): (H, W, 3) float32 in
    [0, 1]. Deterministic for a seed; non-square by default, so its patch grid is too."""
    from skimage.draw import disk, polygon

    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.float32)
    yy = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    horizon = int(0.58 * height)
    sky_top, sky_low = np.array([0.30, 0.50, 0.85]), np.array([0.72, 0.84, 0.96])
    img[:] = (sky_top + (sky_low - sky_top) * (yy / 0.58)[..., None]).clip(0, 1)
    rr, cc = disk((0.17 * height, 0.80 * width), 0.075 * height, shape=img.shape[:2])
    img[rr, cc] = (1.0, 0.86, 0.35)
    xs = np.arange(width)
    ridge = horizon - (0.10 * height * (1 + np.sin(xs / width * 7.0 + 0.6)) / 2
                       + 0.04 * height * np.sin(xs / width * 23.0)).astype(int)
    for x in range(width):
        img[ridge[x]:horizon, x] = (0.42, 0.50, 0.62)
    grass = np.array([0.30, 0.58, 0.22], np.float32)
    noise = rng.normal(0, 0.05, (height - horizon, width, 1)).astype(np.float32)
    shade = np.linspace(0.9, 1.1, height - horizon, dtype=np.float32)[:, None, None]
    img[horizon:] = np.clip(grass * shade + noise, 0, 1)
    # House: walls, roof, door, windows.
    x0, x1 = int(0.14 * width), int(0.42 * width)
    y0, y1 = int(0.50 * height), int(0.86 * height)
    img[y0:y1, x0:x1] = (0.78, 0.22, 0.18)
    rr, cc = polygon([y0, int(0.30 * height), y0],
                     [x0 - 0.03 * width, (x0 + x1) / 2, x1 + 0.03 * width], shape=img.shape[:2])
    img[rr, cc] = (0.30, 0.20, 0.18)
    dx0 = int(x0 + 0.42 * (x1 - x0))
    img[int(0.68 * height):y1, dx0:dx0 + int(0.16 * (x1 - x0))] = (0.35, 0.22, 0.12)
    for wx in (x0 + int(0.10 * (x1 - x0)), x0 + int(0.68 * (x1 - x0))):
        img[int(0.58 * height):int(0.70 * height), wx:wx + int(0.20 * (x1 - x0))] = \
            (0.85, 0.92, 1.0)
    # Tree: trunk and a textured canopy.
    tx = int(0.70 * width)
    img[int(0.55 * height):int(0.84 * height), tx - 5:tx + 5] = (0.40, 0.26, 0.13)
    rr, cc = disk((0.46 * height, tx), 0.15 * height, shape=img.shape[:2])
    leaf = np.array([0.16, 0.42, 0.14], np.float32)
    img[rr, cc] = np.clip(leaf + rng.normal(0, 0.06, (len(rr), 3)), 0, 1)
    return img


def _say(stream: TextIO, text: str = "") -> None:
    print(text, file=stream, flush=True)


def _load(model: str | None, synthetic: bool, device: str | None, stream: TextIO
          ) -> tuple[Any, str]:
    """(bundle, sentence saying which weights are used and why).

    model None: ViT-B-16 with pretrained weights, else the toy CLIP with planted outliers;
    a name with ``synthetic``: the planted random model of that architecture."""
    from sfp.models.loading import WeightsUnavailableError, default_pretrained, load_model
    from sfp.models.synthetic import planted_model
    from sfp.models.toy import load_toy, toy_planted_model

    if model is not None and model.lower() == "toy":
        bundle = load_toy(device or "cpu")
        return bundle, (f"Running on the {bundle.caveat}: it segments generated texture "
                        "scenes, and has no outliers of its own (see --synthetic).")
    if not synthetic:
        tag = default_pretrained()
        try:
            bundle = load_model(model or "ViT-B-16", tag, device=device)
            return bundle, f"Using pretrained weights: {bundle.label}."
        except WeightsUnavailableError as exc:
            why = f"No pretrained weights: {exc}"
    else:
        why = "Pretrained weights not looked for (--synthetic)."
    if model is not None:
        bundle, _truth = planted_model(model, device=device or "cpu")
        return bundle, (
            f"{why} Running on {bundle.label} instead — a random "
            f"{model} whose weights are edited so that outliers appear at known places; every "
            "figure is labelled 'synthetic (planted outliers)' and says nothing about real "
            "CLIP. For the real picture: SFP_CHECKPOINT=/path/to/weights.pt make demo."
        )
    bundle, _truth = toy_planted_model(device or "cpu")
    return bundle, (
        f"{why} Running on the {bundle.caveat} instead: a small CLIP trained on generated "
        "texture scenes (so its segmentations of such scenes mean something), with outliers "
        "planted at known places; it says nothing about real CLIP. For the real picture: "
        "SFP_CHECKPOINT=/path/to/weights.pt make demo."
    )


def _layer_table(rep: Any) -> list[str]:
    stats = rep.stats
    dets = list(stats.counts)
    head = f"{'layer':>5} {'max ‖h‖':>10} {'median ‖h‖':>11} {'max/med':>8} " + " ".join(
        f"{d:>7}" for d in dets)
    lines = [head, "-" * len(head)]
    for i, layer in enumerate(stats.layers):
        mx, md = float(stats.max_norm[i, 0]), float(stats.median_norm[i, 0])
        lines.append(f"{layer:>5} {mx:>10.1f} {md:>11.1f} {mx / md:>8.1f} "
                     + " ".join(f"{int(stats.counts[d][i, 0]):>7}" for d in dets))
    return lines


def _som_lines(rep: Any) -> list[str]:
    ab = rep.ablation
    gh, gw = ab.grid
    idx = np.nonzero(ab.outliers.reshape(-1))[0]
    toks = ", ".join(f"#{i} (r{i // gw},c{i % gw})" for i in idx) or "none"
    k = ab.columns.index("SFP")
    cos = ab.cosine(k, 0)
    flagged = ab.outliers.reshape(-1)
    lines = [
        f"SOM ({ab.config}, layer {ab.detect_layer}) flags {len(idx)} of {gh * gw} patch "
        f"tokens: {toks}",
        f"SFP vs plain CLIP patch features, cosine similarity: mean {cos.mean():.3f} over all "
        f"{gh * gw} patches",
    ]
    if flagged.any():
        lines.append(f"    at the {int(flagged.sum())} flagged tokens {cos[flagged].mean():.3f}"
                     f", elsewhere {cos[~flagged].mean():.3f}")
    return lines


def _pre(lines: Sequence[str]) -> str:
    return "<pre>" + html.escape("\n".join(lines)) + "</pre>"


def run_demo(
    out: str | Path = "demo_output",
    *,
    quick: bool = False,
    model: str | None = None,
    synthetic: bool = False,
    device: str | None = None,
    bundle: Any = None,
    stream: TextIO | None = None,
    progress: bool = True,
) -> Path:
    """Run the demo; returns the path of ``report.html``.

    quick: one image (tests use it). bundle: use this model instead
    of loading one (its label decides what the report says).
    """
    stream = stream or sys.stdout
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _say(stream, "sfp demo — attention outliers in CLIP and what SFP does about them")
    if bundle is None:
        bundle, weights_note = _load(model, synthetic, device, stream)
    elif bundle.is_synthetic:
        weights_note = (f"Running on {bundle.label}: {bundle.name} with outliers "
                        "planted at known places; nothing here says anything about real CLIP.")
    else:
        weights_note = f"Using {bundle.label}."
    _say(stream, weights_note)
    reports, som, text_lines = _render_all(bundle, out, quick, progress)
    layer_lines = _layer_table(reports[0])
    som_lines = _som_lines(reports[0])
    _say(stream)
    _say(stream, "Text queries embedded:")
    for line in text_lines:
        _say(stream, "  " + line)
    _say(stream)
    first = reports[0]
    _say(stream, f"Per-layer patch norms and flagged tokens — {first.view.name} "
                 f"({first.view.size[0]} x {first.view.size[1]} px, {bundle.label}):")
    for line in layer_lines:
        _say(stream, "  " + line)
    _say(stream)
    for line in som_lines:
        _say(stream, line)
    page = _interactive_page(out, reports, som, bundle, weights_note)
    elapsed = time.perf_counter() - t0
    report = _write_report(out, reports, som, page, bundle, weights_note,
                           [*text_lines], layer_lines + [""] + som_lines, elapsed)
    _say(stream)
    _say(stream, f"Done in {elapsed:.0f} s. Open {report.resolve()}")
    return report


def _render_all(bundle: Any, out: Path, quick: bool, progress: bool
                ) -> tuple[list[Any], Any, list[str]]:
    """Embed the text queries and render every image: (image reports, SOM detections, the
    text-query table)."""
    from tqdm.auto import tqdm

    from sfp.seg.pipeline import embed_classes
    from sfp.viz.figures.render import render_image, render_som_detections
    from sfp.viz.figures.views import image_view

    sources, classes, templates = _sources(bundle)
    if quick:
        sources = sources[:1]
    bar = tqdm(total=2 + 7 * len(sources) + 1, desc="demo", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    t = time.perf_counter()
    queries = embed_classes(bundle, classes, list(templates))
    t_text = time.perf_counter() - t
    bar.update(1)
    why = ("the toy CLIP's captions use only these words" if getattr(bundle, "is_toy", False)
           else "to stay fast on a CPU; the paper averages the 80 OpenAI ImageNet templates")
    text_lines = [
        f"{'class list':<12} {'classes':>8} {'names':>8} {'templates':>10} {'dim':>6} "
        f"{'seconds':>8}",
        f"{classes:<12} {queries.num_classes:>8} {len(queries.names):>8} "
        f"{len(templates):>10} {queries.embeddings.shape[1]:>6} {t_text:>8.1f}",
        f"(one template, {templates[0]!r}: {why})",
    ]
    size = "model" if getattr(bundle, "is_toy", False) else 224
    # a toy scene's view carries its mask, so the stage ablation scores its segmentations
    views = [dataclasses.replace(image_view(bundle, src, size=size, crop=crop, name=name),
                                 truth=truth)
             for name, src, crop, truth in sources]
    # the outlier grid as released: the image squashed to a square
    grid_views = [image_view(bundle, src, size=size, squash=True, name=name)
                  for name, src, _, _ in sources]
    bar.update(1)
    reports = []
    for view, grid_view in zip(views, grid_views, strict=True):
        bar.set_description(f"demo: {view.name}")
        reports.append(render_image(
            bundle, view, out / view.name, queries=queries, classes=classes,
            formats=("png",), dpi=100, interactive=True,
            templates_text=f" ({classes}, template {templates[0]!r})",
            step=lambda _name: bar.update(1), grid_view=grid_view,
        ))
    bar.set_description("demo: SOM detections")
    som = render_som_detections(bundle, views, out, formats=("png",), dpi=100,
                                interactive=True, traces=[r.trace for r in reports])
    bar.update(1)
    bar.close()
    return reports, som, text_lines


_Source = tuple[str, Any, bool, "np.ndarray | None"]


def _sources(bundle: Any) -> tuple[list[_Source], str, tuple[str, ...]]:
    """The demo's images ``(name, image, centre-crop?, ground truth or None)``, class list
    and templates: photos and a drawn landscape with voc21's classes, or for the toy CLIP
    generated texture scenes (at the model's input size, with their masks) with its six
    textures."""
    if getattr(bundle, "is_toy", False):
        from sfp.seg.datasets import ToyDataset

        scenes = [ToyDataset("val")[i] for i in range(TOY_SCENES)]  # each one generated
        return ([(f"toy_scene_{i}", s.image, True, s.label) for i, s in enumerate(scenes)],
                TOY_CLASSES, TOY_TEMPLATES)
    from sfp.core.io import sample_images

    photos = sample_images()
    sources: list[_Source] = [(n, photos[n], True, None) for n in DEMO_IMAGES]
    sources.append(("generated_scene", generated_scene(), False, None))
    return sources, DEMO_CLASSES, DEMO_TEMPLATES


def _interactive_page(out: Path, reports: list[Any], som: Any, bundle: Any,
                      weights_note: str) -> Path:
    from sfp.viz.figures.export import write_plotly_page

    figs = [(f"{rep.view.name}: {fr.heading}", fr.plotly) for rep in reports
            for fr in rep.figures if fr.plotly is not None]
    notes = [fr.text for rep in reports for fr in rep.figures if fr.plotly is not None]
    if som.plotly is not None:
        figs.append((som.heading, som.plotly))
        notes.append(som.text)
    return write_plotly_page(out / "interactive.html", figs,
                             title="sfp demo — interactive figures", banner=weights_note,
                             synthetic=bundle.is_synthetic, notes=notes)


def _write_report(out: Path, reports: list[Any], som: Any, page: Path | None, bundle: Any,
                  weights_note: str, text_lines: list[str], stat_lines: list[str],
                  elapsed: float) -> Path:
    from sfp.viz.figures.export import IndexEntry, write_html_page

    entries: list[IndexEntry] = []
    for rep in reports:
        h, w = rep.view.size
        entries.append(IndexEntry(title=f"Image: {rep.view.name} ({h} x {w} px)", level=2))
        for fr in rep.figures:
            files = [p.relative_to(out).as_posix() for p in fr.files]
            entries.append(IndexEntry(title=fr.heading, text=fr.text, image=files[0],
                                      links=[(Path(f).suffix[1:].upper(), f) for f in files]))
    entries.append(IndexEntry(title="Across images", level=2))
    som_files = [p.relative_to(out).as_posix() for p in som.files]
    entries.append(IndexEntry(title=som.heading, text=som.text, image=som_files[0]))
    intro = [
        "<p>What the demo did: for each image it recorded every layer of the visual "
        "transformer (attention and hidden states), ran the outlier detectors (SOM — the "
        "paper's self-adaptive outlier mitigator criterion —, L2 norm, LOF, robust z-score), "
        "and ran SFP with its stages switched on one by one. Each figure below comes with a "
        "note on what to look at. Rerun with <code>python -m sfp demo</code>; make the same "
        "figures for your own images with <code>sfp figures --image PATH --out DIR</code>.</p>",
    ]
    if page is not None:
        intro.append(f'<p><a href="{page.name}">Interactive versions of all figures</a> '
                     "(plotly, works offline).</p>")
    first = reports[0]
    intro += ["<h3>Text queries</h3>", _pre(text_lines),
              f"<h3>Per-layer outlier statistics — {html.escape(first.view.name)}</h3>",
              _pre(stat_lines), f"<p class=\"files\">Rendered in {elapsed:.0f} s.</p>"]
    return write_html_page(out / "report.html", "sfp demo — attention outliers and SFP",
                           entries, banner=weights_note, synthetic=bundle.is_synthetic,
                           intro_html="\n".join(intro))
