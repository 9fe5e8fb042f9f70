"""Outlier propagation: per layer, max/median patch norm, the class token's largest attention,
each detector's count and the persistence of flagged tokens; and per-layer norm maps.

    python analysis/propagation.py --image photo.jpg --pretrained openai
    python analysis/propagation.py --synthetic --detector l2

Writes ``<out>/<image>_propagation.*`` and ``<out>/<image>_norm_maps.*`` (png, svg, html).
"""

from __future__ import annotations

import sys

from sfp.cli.figures import script_inputs, script_parser
from sfp.core.probe import record
from sfp.viz.figures import (
    norm_maps,
    norm_maps_plotly,
    propagation,
    propagation_data,
    propagation_plotly,
    save_figure,
)
from sfp.viz.figures.export import write_plotly_page


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, "analysis_output/propagation")
    p.add_argument("--detector", default="som",
                   help="detector of the persistence panel and the norm-map outlines")
    p.add_argument("--over-image", action="store_true", help="draw norm maps over the image")
    args = p.parse_args(argv)
    bundle, views, formats = script_inputs(args)
    for view in views:
        d = propagation_data(record(bundle, view.pixels), view.rgb)
        stem = f"{args.out}/{view.name}"
        files = save_figure(propagation(d, detector=args.detector), f"{stem}_propagation",
                            formats=formats, dpi=args.dpi, source=bundle)
        files += save_figure(norm_maps(d, detector=args.detector, over_image=args.over_image),
                             f"{stem}_norm_maps", formats=formats, dpi=args.dpi,
                             source=bundle)
        files.append(write_plotly_page(
            f"{stem}_propagation.html",
            [("Propagation", propagation_plotly(d, detector=args.detector)),
             ("Norm maps", norm_maps_plotly(d))],
            title=f"Outlier propagation — {view.name}", banner=f"Model: {bundle.label}",
            synthetic=bundle.is_synthetic))
        print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
