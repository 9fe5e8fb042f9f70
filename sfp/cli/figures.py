"""``sfp figures``: the five analysis figure families for each image, and an index page.

    sfp figures --image photo.jpg [--image ...] --out figs [--model ViT-B-16 --pretrained TAG|PATH
                | --synthetic] [--layers 1,6,8,11] [--detector som] [--classes voc21]

writes ``figs/<image>/{outlier_grid,propagation,norm_maps,detector_agreement,stage_ablation,
layerwise_purification}.{png,svg}``, ``figs/<image>/interactive.html`` (all of them in plotly,
offline), ``figs/som_detections.*`` (supplement Fig. 2 over all images) and ``figs/index.html``
linking everything.
"""

from __future__ import annotations

import argparse
import html
import sys
import time
from pathlib import Path
from typing import Any

from sfp.cli import common
from sfp.core.outliers import DETECTORS
from sfp.methods.config import PRESETS
from sfp.models.text import TEMPLATES

__all__ = ["register", "run_figures", "script_inputs", "script_parser", "write_index"]


def _layers(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated ints, got {text!r}") \
            from exc
    if not out:
        raise argparse.ArgumentTypeError("--layers needs at least one layer")
    return out


def _patch(text: str) -> int | tuple[int, int]:
    try:
        parts = [int(t) for t in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--patch takes INDEX or ROW,COL, got {text!r}") \
            from exc
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"--patch takes INDEX or ROW,COL, got {text!r}")


def _head(text: str) -> str | int:
    if text == "mean":
        return "mean"
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--head takes 'mean' or a head index, got {text!r}") \
            from exc


def register(subparsers: Any) -> None:
    """Add the ``figures`` subcommand."""
    p = subparsers.add_parser(
        "figures",
        help="analysis figures (outlier grid, propagation, agreement, ablation, layer-wise)",
        description=common.plain_text(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", action="append", required=True, metavar="PATH",
                   help="an image file (repeat for several)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    common.add_model_arguments(p)
    p.add_argument("--layers", type=_layers, default=None,
                   help="outlier-grid layers, e.g. 2,4,6,8,10 (default 1,6,8,11 scaled to depth)")
    p.add_argument("--detector", default="som", choices=DETECTORS.names(),
                   help="outlier detector (default som)")
    p.add_argument("--head", type=_head, default="mean", help="'mean' or a head index")
    p.add_argument("--as-released", action=argparse.BooleanOptionalAction, default=True,
                   help="outlier grid as the released notebook draws it: image squashed to "
                   "a square, class-token attention x 1.5, outliers 1.5 A[cls,i] > A[i,i] "
                   "without top-k (default); --no-as-released: the sfp variant with "
                   "--detector and --head")
    p.add_argument("--patch", type=_patch, default=None,
                   help="selected patch: INDEX or ROW,COL (default: centre)")
    p.add_argument("--classes", default="voc21",
                   help="classes for the stage ablation's segmentation: a benchmark name, a "
                   "class file or 'cat; dog; grass' (default voc21)")
    p.add_argument("--templates", default="openai80", choices=TEMPLATES.names(),
                   help="prompt templates: " + "; ".join(
                       f"{e.name}: {e.doc}" for e in TEMPLATES.entries()))
    p.add_argument("--baselines", default="sclip",
                   help="comma-separated baseline encoders for the ablation (default sclip; "
                   "'' for none)")
    p.add_argument("--preset", default="official", choices=PRESETS.names(),
                   help="SFP configuration of the stage ablation")
    p.add_argument("--feature-map", default="norm", choices=("norm", "pca"),
                   help="feature maps as L2 norm or PCA -> RGB")
    p.add_argument("--size", type=int, default=None,
                   help="short side in pixels (default 224; the toy CLIP: its 128)")
    p.add_argument("--no-crop", action="store_true",
                   help="keep the aspect ratio instead of the central square crop")
    p.add_argument("--formats", default="png,svg", help="static formats (default png,svg)")
    p.add_argument("--dpi", type=int, default=150, help="PNG resolution (default 150)")
    p.add_argument("--no-html", action="store_true", help="skip the interactive pages")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _unique_stem(path: Path, used: set[str]) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem) or "image"
    name, i = stem, 2
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name


def write_index(out: Path, bundle: Any, sections: list[tuple[str, list[Any], str | None]],
                extra: list[Any], *, title: str, note: str = "") -> Path:
    """index.html linking every figure: sections = (image name, FigureResults, interactive
    page relative path or None); extra = FigureResults across images."""
    from sfp.viz.figures.export import IndexEntry, write_html_page

    entries: list[IndexEntry] = []

    def entry(fr: Any) -> IndexEntry:
        files = [p.relative_to(out).as_posix() for p in fr.files]
        png = next((f for f in files if f.endswith(".png")), None)
        return IndexEntry(title=fr.heading, text=fr.text, image=png,
                          links=[(Path(f).suffix[1:].upper(), f) for f in files])

    for name, figs, page in sections:
        links = f'<p class="files"><a href="{html.escape(page)}">interactive version</a></p>' \
            if page else ""
        entries.append(IndexEntry(title=f"Image: {name}", level=2, html_body=links))
        entries.extend(entry(fr) for fr in figs)
    if extra:
        entries.append(IndexEntry(title="Across images", level=2))
        entries.extend(entry(fr) for fr in extra)
    banner = f"Model: {bundle.label}."
    if bundle.is_synthetic:
        banner += (" It is a random CLIP with outliers planted at known positions "
                   "(sfp.models.synthetic); nothing here says anything about pretrained CLIP.")
    if note:
        banner += " " + note
    return write_html_page(out / "index.html", title, entries, banner=banner,
                           synthetic=bundle.is_synthetic)


def run_figures(args: argparse.Namespace, bundle: Any | None = None) -> Path:
    """Run ``sfp figures`` with parsed ``args`` (``bundle`` given: use it instead of loading
    one). Returns the index page's path."""
    from tqdm.auto import tqdm

    from sfp.models.text import resolve_templates
    from sfp.seg.pipeline import embed_classes
    from sfp.viz.figures.export import write_plotly_page
    from sfp.viz.figures.layerwise import SOMDetections, som_detections_data
    from sfp.viz.figures.render import render_image, render_som_detections
    from sfp.viz.figures.views import image_view

    t0 = time.perf_counter()
    # Check what can be checked before the (slow) model load.
    for path in args.image:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--image {path}: no such file.")
    DETECTORS.get(args.detector)  # RegistryError naming the detectors
    as_released = getattr(args, "as_released", True)
    if as_released and args.head != "mean":
        raise ValueError(f"--head {args.head}: the as-released outlier grid uses the head mean; "
                         "add --no-as-released to draw one head.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if bundle is None:
        bundle = common.load_bundle_from_args(args)
    print(f"sfp figures: model {bundle.label}", file=sys.stderr)
    common.say_caveat("figures", bundle)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    templates = resolve_templates(args.templates)
    queries = embed_classes(bundle, args.classes, templates)
    ttext = f" ({TEMPLATES.get(args.templates).display})"
    used: set[str] = set()
    sections, parts = [], []
    # Per image: the trace and six figures (render_image's steps), then the page; at the end
    # supplement Fig. 2 and the index: the demo's bar.
    bar = tqdm(total=8 * len(args.image) + 1, desc="figures", unit="step", file=sys.stderr,
               disable=getattr(args, "no_progress", False), dynamic_ncols=True)
    size = args.size or ("model" if bundle.is_toy else 224)
    for path in args.image:
        name = _unique_stem(Path(path), used)
        view = image_view(bundle, path, size=size, crop=not args.no_crop, name=name)
        grid_view = (image_view(bundle, path, size=size, squash=True, name=name)
                     if as_released else None)
        bar.set_description(f"figures: {name} ({view.size[0]} x {view.size[1]} px)")
        rep = render_image(bundle, view, out / name, queries=queries, classes=args.classes,
                           layers=args.layers,
                           detector=args.detector, head=args.head, patch=args.patch,
                           config=args.preset, baselines=baselines, formats=formats,
                           dpi=args.dpi, feature_map=args.feature_map,
                           interactive=not args.no_html, templates_text=ttext,
                           as_released=as_released, grid_view=grid_view,
                           step=lambda _name: bar.update(1))
        page = None
        if not args.no_html:
            page_path = write_plotly_page(
                out / name / "interactive.html",
                [(fr.heading, fr.plotly) for fr in rep.figures],
                title=f"{name} — interactive figures", banner=f"Model: {bundle.label}",
                synthetic=bundle.is_synthetic, notes=[fr.text for fr in rep.figures])
            page = page_path.relative_to(out).as_posix()
        bar.update(1)
        sections.append((name, rep.figures, page))
        # Keep only what the index and supplement Fig. 2 need (traces are ~30 MB each).
        parts.append(som_detections_data(bundle, [view], traces=[rep.trace]))
        for fr in rep.figures:
            fr.plotly = None
        del rep
    merged = SOMDetections(
        layer=parts[0].layer, names=[n for p in parts for n in p.names],
        images=[i for p in parts for i in p.images], norms=[n for p in parts for n in p.norms],
        masks=[m for p in parts for m in p.masks], params=parts[0].params, label=bundle.label,
        is_synthetic=bundle.is_synthetic)
    bar.set_description("figures: SOM detections, index")
    som = render_som_detections(bundle, [], out, formats=formats, dpi=args.dpi,
                                interactive=False, data=merged)
    bar.update(1)
    bar.close()
    index = write_index(out, bundle, sections, [som], title="SFP analysis figures",
                        note=f"Rendered in {time.perf_counter() - t0:.0f} s.")
    return index


def _run(args: argparse.Namespace) -> int:
    index = run_figures(args)
    print(f"Wrote {index}  (open it in a browser)")
    return 0


# ------------------------------------------------------------------------------------------
# Shared by the analysis/ scripts (one script per figure family)
# ------------------------------------------------------------------------------------------


def script_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """Argument parser of an ``analysis/`` script: images, output folder, model, formats."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="image file (repeatable); default: scikit-image's astronaut photo")
    p.add_argument("--out", default=default_out, metavar="DIR",
                   help=f"output folder (default {default_out})")
    common.add_model_arguments(p)
    p.add_argument("--size", type=int, default=None,
                   help="short side in pixels (default 224; the toy CLIP: its 128)")
    p.add_argument("--no-crop", action="store_true", help="keep the aspect ratio")
    p.add_argument("--formats", default="png,svg", help="static formats (default png,svg)")
    p.add_argument("--dpi", type=int, default=150, help="PNG resolution (default 150)")
    return p


def script_inputs(args: argparse.Namespace) -> tuple[Any, list[Any], list[str]]:
    """(bundle, image views, formats) for an ``analysis/`` script's parsed arguments."""
    from sfp.core.io import sample_images
    from sfp.viz.figures.views import image_view

    bundle = common.load_bundle_from_args(args)
    print(f"model: {bundle.label}", file=sys.stderr)
    crop, size = not args.no_crop, args.size or ("model" if bundle.is_toy else 224)
    if args.image:
        used: set[str] = set()
        views = [image_view(bundle, p, size=size, crop=crop,
                            name=_unique_stem(Path(p), used)) for p in args.image]
    else:
        views = [image_view(bundle, sample_images()["astronaut"], size=size, crop=crop,
                            name="astronaut")]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    return bundle, views, formats
