"""``sfp stats``: dataset statistics of where outliers come from (see :mod:`sfp.seg.stats`).

Progress is saved per image in ``<out>.state/``; re-running the same command resumes.
"""

from __future__ import annotations

import argparse
from typing import Any

from sfp.cli import common
from sfp.seg.benchmarks import BENCHMARKS

__all__ = ["register"]


def _run_stats(args: argparse.Namespace) -> int:
    from sfp.seg.stats import dataset_stats, image_source, load_stats

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}.")
    if args.size < 1:
        raise ValueError(f"--size must be >= 1, got {args.size}.")
    source = image_source(args.images, benchmark=args.benchmark, data_root=args.data_root,
                          split=args.split)
    bundle = common.load_bundle_from_args(args)
    out = dataset_stats(bundle, source, args.out, size=args.size, limit=args.limit,
                        outlier_layer=args.outlier_layer, norm_threshold=args.norm_threshold,
                        top=args.top, restart=args.restart, progress=not args.no_progress)
    header, arrays = load_stats(out)
    neurons = ", ".join(f"{int(l)}:{int(n)}" for l, n, _ in arrays["top_neurons"][:5])
    print(f"wrote {out}: {header['n_images']} images ({header['n_used']} with outliers); "
          f"top neurons (layer:neuron) {neurons}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``sfp stats``."""
    s = subparsers.add_parser(
        "stats",
        help="per-layer norms, outlier recurrence, top neurons and channels over a dataset",
        description="Statistics of where outliers come from over a folder of images or a "
        "benchmark split, saved to one .npz file. Progress is saved per image in "
        "<out>.state/; re-running the same command resumes.",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", default=None, help="folder of images (searched recursively)")
    src.add_argument("--benchmark", default=None, choices=BENCHMARKS.names())
    s.add_argument("--data-root", default=None, help="benchmark root (with --benchmark)")
    s.add_argument("--split", default="val", help="benchmark split (default val)")
    s.add_argument("--out", required=True, help="output .npz file")
    s.add_argument("--size", type=int, default=224,
                   help="short side, then centre crop, in pixels (default 224)")
    s.add_argument("--limit", type=int, default=None, help="only the first N images")
    s.add_argument("--outlier-layer", type=int, default=None,
                   help="layer whose norms flag the outliers (default: per image, the layer "
                   "with the largest max/median norm)")
    s.add_argument("--norm-threshold", type=float, default=None,
                   help="absolute norm threshold (default: per image, median + "
                   "max(median, 6 robust SD))")
    s.add_argument("--top", type=int, default=20, help="top neurons and channels kept")
    s.add_argument("--restart", action="store_true",
                   help="discard saved progress in <out>.state/ and start over")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_model_arguments(s)
    s.set_defaults(func=_run_stats)
