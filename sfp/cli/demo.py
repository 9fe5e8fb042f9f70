"""``sfp demo``: the analysis figures on four images, written as one report (see
:mod:`sfp.viz.demo`)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]

_DESCRIPTION = """\
The analysis figure families on four images, one report: demo_output/report.html.

Loads ViT-B/16 with pretrained weights when they are available ($SFP_CHECKPOINT or the
openai tag from the local cache or the network) and otherwise the toy CLIP shipped with
sfp (trained on generated textures, sfp.models.toy) with planted outliers, saying which at
the top of the report and in the terminal.
"""


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo", help="figures of attention outliers and SFP on four images -> report.html",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo_output", metavar="DIR",
                   help="output folder (default demo_output)")
    p.add_argument("--quick", action="store_true", help="one image only")
    p.add_argument("--synthetic", action="store_true",
                   help="use the planted-outlier model without looking for weights")
    p.add_argument("--model", default=None,
                   help="open_clip model (default ViT-B-16 with pretrained weights, else the "
                   "toy CLIP with planted outliers); with --synthetic: the planted random "
                   "model of that architecture; 'toy': the toy CLIP, no planted outliers")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from sfp.viz.demo import run_demo

    run_demo(args.out, quick=args.quick, model=args.model, synthetic=args.synthetic,
             device=args.device, progress=not args.no_progress)
    return 0
