"""Detector agreement: Jaccard overlap of the patches som / l2 / lof / norm_z flag, per layer,
averaged over the given images.

    python analysis/detector_agreement.py --image a.jpg --image b.jpg --pretrained openai
    python analysis/detector_agreement.py --synthetic

Writes ``<out>/detector_agreement.{png,svg,html}`` (all images in one batch when they share a
size; otherwise one figure per image).
"""

from __future__ import annotations

import sys

import torch

from sfp.cli.figures import script_inputs, script_parser
from sfp.core.probe import record
from sfp.viz.figures import (
    agreement_data,
    detector_agreement,
    detector_agreement_plotly,
    save_figure,
)
from sfp.viz.figures.export import write_plotly_page


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, "analysis_output/detector_agreement")
    p.add_argument("--detectors", default="som,l2,lof,norm_z", help="comma-separated detectors")
    args = p.parse_args(argv)
    bundle, views, formats = script_inputs(args)
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    same_size = len({v.pixels.shape for v in views}) == 1
    groups = [("detector_agreement", views)] if same_size else [
        (f"{v.name}_detector_agreement", [v]) for v in views]
    for stem, group in groups:
        trace = record(bundle, torch.cat([v.pixels for v in group]))
        d = agreement_data(trace, detectors=detectors)
        files = save_figure(detector_agreement(d), f"{args.out}/{stem}", formats=formats,
                            dpi=args.dpi, source=bundle)
        files.append(write_plotly_page(f"{args.out}/{stem}.html",
                                       [("Detector agreement", detector_agreement_plotly(d))],
                                       title="Detector agreement",
                                       banner=f"Model: {bundle.label}; images: "
                                       + ", ".join(v.name for v in group),
                                       synthetic=bundle.is_synthetic))
        print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
