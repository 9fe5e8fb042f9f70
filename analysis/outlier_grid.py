"""Outlier grid: attention matrices and maps across layers, outlier masks, their removal.

The released SFP notebook's picture (``SFP_ICCV/outlier_vis.ipynb``: layers 1, 6, 8, 11 of
ViT-B/16), made general; ``--layers 2,4,6,8,10`` gives supplement Fig. 1.

    python analysis/outlier_grid.py --image photo.jpg --pretrained openai
    python analysis/outlier_grid.py --synthetic --no-as-released --layers 2,4,6,8,10 \
        --head 3 --patch 5,7

Writes ``<out>/<image>_outlier_grid.{png,svg,html}``.
"""

from __future__ import annotations

import argparse
import sys

from sfp.cli.figures import _head, _layers, _patch, script_inputs, script_parser
from sfp.core.io import sample_images
from sfp.core.probe import record
from sfp.viz.figures import outlier_grid, outlier_grid_data, outlier_grid_plotly, save_figure
from sfp.viz.figures.export import write_plotly_page
from sfp.viz.figures.views import image_view


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, "analysis_output/outlier_grid")
    p.add_argument("--layers", type=_layers, default=None,
                   help="layers (default 1,6,8,11 scaled to the depth)")
    p.add_argument("--detector", default="som", help="som, l2, lof or norm_z (default som)")
    p.add_argument("--head", type=_head, default="mean", help="'mean' or a head index")
    p.add_argument("--patch", type=_patch, default=None, help="INDEX or ROW,COL (default centre)")
    p.add_argument("--as-released", action=argparse.BooleanOptionalAction, default=True,
                   help="as the released notebook: image squashed to a square, class-token "
                   "attention x 1.5, outliers 1.5 A[cls,i] > A[i,i] without top-k (default); "
                   "--no-as-released: the sfp variant with --detector and --head")
    args = p.parse_args(argv)
    bundle, views, formats = script_inputs(args)
    if args.as_released:
        if args.head != "mean":
            p.error("--head needs --no-as-released (the as-released grid uses the head mean)")
        srcs = args.image or [sample_images()["astronaut"]]
        views = [image_view(bundle, src, size=args.size, squash=True, name=v.name)
                 for src, v in zip(srcs, views, strict=True)]
    for view in views:
        trace = record(bundle, view.pixels, layers=args.layers)
        if args.as_released:
            d = outlier_grid_data(trace, view.rgb, layers=args.layers, patch=args.patch)
        else:
            d = outlier_grid_data(trace, view.rgb, layers=args.layers, detector=args.detector,
                                  head=args.head, patch=args.patch, as_released=False)
        stem = f"{args.out}/{view.name}_outlier_grid"
        files = save_figure(outlier_grid(d), stem, formats=formats, dpi=args.dpi,
                            source=bundle)
        files.append(write_plotly_page(f"{stem}.html", [("Outlier grid",
                                                         outlier_grid_plotly(d))],
                                       title=f"Outlier grid — {view.name}",
                                       banner=f"Model: {bundle.label}",
                                       synthetic=bundle.is_synthetic))
        print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
