"""``sfp segment``, ``sfp eval`` and ``sfp prepare``: the segmentation commands.

``sfp eval`` runs :func:`sfp.seg.evaluate.evaluate` with resumable state (see that module)
and writes the results JSON; under ``torchrun`` the images are sharded over the ranks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from sfp import __version__
from sfp.cli import common
from sfp.seg.benchmarks import BENCHMARKS

__all__ = ["register"]


def _unique_stem(src: str, used: set[str]) -> str:
    stem = Path(src).stem or "image"
    base, k = stem, 1
    while stem in used:
        k += 1
        stem = f"{base}_{k}"
    used.add(stem)
    return stem


def _run_segment(args: argparse.Namespace) -> int:
    from sfp.seg.pipeline import Segmenter, save_segmentation

    if args.class_file is not None and not Path(args.class_file).is_file():
        raise FileNotFoundError(f"No class file at {args.class_file}.")
    bundle = common.load_bundle_from_args(args)
    common.say_caveat("segment", bundle)
    kw = common.segmenter_overrides(args)
    if args.benchmark:
        seg = Segmenter.for_benchmark(bundle, args.benchmark, **kw)
    else:
        classes = args.classes if args.classes is not None else Path(args.class_file)
        seg = Segmenter(bundle, classes, **kw)
    used: set[str] = set()
    for src in args.images:
        result = seg.predict(src)
        lab, ov = save_segmentation(result, Path(args.out), _unique_stem(src, used),
                                    alpha=args.alpha)
        present = ", ".join(result.class_names[c] for c in result.present())
        print(f"{src}: wrote {lab} and {ov} (classes present: {present})")
    return 0


def _results(args: argparse.Namespace, seg: Any, bundle: Any, res: Any,
             fingerprint: dict[str, Any], preset: str | None) -> dict[str, Any]:
    from sfp.seg.evaluate import config_dict

    return {
        "benchmark": args.benchmark,
        "split": args.split,
        "method": seg.method,
        "preset": preset,
        "model": bundle.name,
        "pretrained": bundle.pretrained,
        "provenance": bundle.provenance,
        "num_images": res.num_images,
        **res.metrics.to_dict(),
        "config": {
            "segmenter": seg.params(),
            "encoder": config_dict(seg.encoder.config),
            "limit": args.limit,
            "data_root": fingerprint["data_root"],
            "dtype": fingerprint["dtype"],
            "seed": fingerprint["seed"],
        },
        "sfp_version": __version__,
    }


def _precision_line(args: argparse.Namespace, bundle: Any) -> str:
    """What precision the evaluation runs in, and why."""
    from sfp.models.loading import precision_of

    prec = precision_of(bundle.model)
    why = {"fp32": "full precision", "fp16": "fp16 weights, LayerNorm in fp32",
           "bf16": "bf16 weights, LayerNorm in fp32"}.get(prec, prec)
    line = f"sfp eval: {bundle.name} in {prec} on {bundle.device} ({why}"
    if args.precision == "auto":
        line += ("; the release's default on CUDA, --precision fp32 for full precision"
                 if prec == "fp16" else "; the CPU default")
    return line + ")"


def _eval_one(args: argparse.Namespace, bundle: Any, dataset: Any, state_dir: Path,
              ctx: Any) -> tuple[Any, Any, dict[str, Any], str | None, float]:
    """Evaluate ``args.method`` (with ``args.preset`` for sfp), progress in ``state_dir``:
    ``(segmenter, result, fingerprint, preset, seconds)``."""
    from sfp.seg.evaluate import EvalState, evaluate, make_fingerprint
    from sfp.seg.pipeline import Segmenter

    seg = Segmenter.for_benchmark(bundle, args.benchmark, **common.segmenter_overrides(args))
    preset = args.preset if args.method == "sfp" else None
    fingerprint = make_fingerprint(seg, dataset, limit=args.limit, preset=preset, seed=args.seed)
    t0 = time.perf_counter()
    try:
        res = evaluate(seg, dataset, limit=args.limit, state=EvalState(state_dir, fingerprint),
                       restart=args.restart, ctx=ctx, progress=not args.no_progress)
    except KeyboardInterrupt:
        if ctx.is_main:
            print(f"sfp eval: progress is saved in {state_dir}; run the same command "
                  "again to resume.", file=sys.stderr)
        raise
    return seg, res, fingerprint, preset, time.perf_counter() - t0


def _run_eval(args: argparse.Namespace) -> int:
    from sfp.core.errors import SFPError
    from sfp.methods.encoders import method_variants
    from sfp.seg.datasets import load_dataset
    from sfp.seg.distributed import init_distributed, rank_device
    from sfp.seg.evaluate import write_json_atomic

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}.")
    if args.method is None:
        args.method = "all" if args.benchmark == "toy" else "sfp"
    out = Path(args.out)
    state_dir = Path(args.state_dir) if args.state_dir else out.with_name(out.name + ".state")
    ctx = init_distributed(args.device)
    try:
        args.device = rank_device(ctx, args.device)
        dataset = load_dataset(args.benchmark, args.data_root, split=args.split)
        bundle = common.load_bundle_from_args(args)
        if ctx.is_main:
            print(_precision_line(args, bundle), file=sys.stderr)
            common.say_caveat("eval", bundle)
        if args.method != "all":
            seg, res, fp, preset, secs = _eval_one(args, bundle, dataset, state_dir, ctx)
            if ctx.is_main:
                write_json_atomic(out, _results(args, seg, bundle, res, fp, preset))
                m = res.metrics
                print(f"{args.benchmark} / {seg.method}: mIoU {m.miou * 100:.2f}  aAcc "
                      f"{m.aacc * 100:.2f}  mAcc {m.macc * 100:.2f}  ({res.num_images} images, "
                      f"{res.resumed} resumed, {secs:.1f} s, {ctx.world_size} process(es))")
                print(f"wrote {out}")
            return 0
        rows: list[dict[str, Any]] = []
        for method, preset in method_variants():
            run = argparse.Namespace(**{**vars(args), "method": method,
                                        "preset": preset or args.preset})
            label = method if preset is None else f"{method}/{preset}"
            try:
                seg, res, fp, pr, secs = _eval_one(
                    run, bundle, dataset, state_dir / label.replace("/", "-"), ctx)
            except SFPError as exc:  # a preset that does not apply to this model
                rows.append({"method": method, "preset": preset, "label": label,
                             "skipped": str(exc)})
                continue
            rows.append({"label": label, "seconds": round(secs, 1),
                         **_results(run, seg, bundle, res, fp, pr)})
        if ctx.is_main:
            write_json_atomic(out, {"benchmark": args.benchmark, "split": args.split,
                                    "model": bundle.name, "pretrained": bundle.pretrained,
                                    "provenance": bundle.provenance, "results": rows,
                                    "sfp_version": __version__})
            n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
            print(method_table(rows, f"{args.benchmark} ({dataset.split}, {n} images), "
                                     f"{bundle.name}: {bundle.caveat or bundle.pretrained}"))
            print(f"wrote {out}")
    finally:
        ctx.shutdown()
    return 0


def method_table(rows: list[dict[str, Any]], title: str) -> str:
    """The per-method table of ``sfp eval --method all`` (mIoU, aAcc, mAcc in %)."""
    width = max(len(r["label"]) for r in rows) + 2
    lines = [title, f"{'method':<{width}}{'mIoU':>7}{'aAcc':>7}{'mAcc':>7}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['label']:<{width}}  n/a: {r['skipped']}")
        else:
            lines.append(f"{r['label']:<{width}}{r['mIoU']:7.2f}{r['aAcc']:7.2f}"
                         f"{r['mAcc']:7.2f}")
    return "\n".join(lines)


def _run_prepare(args: argparse.Namespace) -> int:
    from sfp.seg.datasets import prepare_coco_object

    written = prepare_coco_object(args.stuff_root, args.out, progress=True, split=args.split)
    print(f"coco-object: wrote {written} label files under {args.out or args.stuff_root}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``segment``, ``eval`` and ``prepare`` to the ``sfp`` command."""
    p = subparsers.add_parser(
        "segment",
        help="segment images with free-form classes; write label and overlay PNGs",
        description="Segment images; writes <stem>_labels.png (palette PNG, pixel value = "
        "class index in the order given) and <stem>_overlay.png into --out.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--classes", help='classes separated by ";", synonyms by ",": '
                     '"cat; dog, puppy; grass"')
    src.add_argument("--class-file", help="file with one class per line (synonyms: ', ')")
    src.add_argument("--benchmark", choices=BENCHMARKS.names(),
                     help="use a benchmark's classes and released settings")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    common.add_model_arguments(p)
    common.add_segmenter_arguments(p)
    p.set_defaults(func=_run_segment)

    e = subparsers.add_parser(
        "eval",
        help="evaluate on a benchmark (mIoU); resumable, torchrun-aware",
        description="Evaluate on a benchmark. Progress is saved per image in <out>.state/; "
        "re-running the same command resumes. Under torchrun the images are sharded over "
        "the ranks.",
    )
    e.add_argument("--benchmark", required=True, choices=BENCHMARKS.names())
    e.add_argument("--data-root", default=None,
                   help="dataset root (mmseg layout); not needed for the generated toy benchmark")
    e.add_argument("--out", required=True, help="results JSON file")
    e.add_argument("--split", default="val", help="split (default val)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    e.add_argument("--restart", action="store_true",
                   help="discard saved progress in <out>.state/ and start over")
    e.add_argument("--state-dir", default=None, help="where to save progress "
                   "(default: <out>.state)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_model_arguments(e, precision="auto")
    common.add_segmenter_arguments(e, allow_all=True)
    e.set_defaults(func=_run_eval)

    pr = subparsers.add_parser(
        "prepare", help="derive dataset files (coco-object labels from COCO-Stuff164k)",
    )
    pr.add_argument("dataset", choices=("coco-object",))
    pr.add_argument("--stuff-root", required=True, help="COCO-Stuff164k root "
                    "(with annotations/val2017/*_labelTrainIds.png)")
    pr.add_argument("--out", default=None, help="write here instead of into --stuff-root")
    pr.add_argument("--split", default="val")
    pr.set_defaults(func=_run_prepare)
