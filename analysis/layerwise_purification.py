"""Layer-wise purification (paper Fig. 5) for each image, and SOM's detections over all the
images (supplement Fig. 2).

    python analysis/layerwise_purification.py --image a.jpg --image b.jpg --pretrained openai
    python analysis/layerwise_purification.py --synthetic --feature-map pca

Writes ``<out>/<image>_layerwise_purification.*`` and ``<out>/som_detections.*``.
"""

from __future__ import annotations

import sys

from sfp.cli.figures import _layers, script_inputs, script_parser
from sfp.viz.figures import (
    layerwise_data,
    layerwise_purification,
    layerwise_purification_plotly,
    save_figure,
    som_detections,
    som_detections_data,
    som_detections_plotly,
)
from sfp.viz.figures.export import write_plotly_page


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, "analysis_output/layerwise_purification")
    p.add_argument("--layers", type=_layers, default=None,
                   help="layers (default 2..9 of 12, scaled to the depth)")
    p.add_argument("--feature-map", default="norm", choices=("norm", "pca"))
    p.add_argument("--som-layer", type=int, default=None,
                   help="layer of the SOM-detections figure (default L-1)")
    args = p.parse_args(argv)
    bundle, views, formats = script_inputs(args)
    figs = []
    for view in views:
        d = layerwise_data(bundle, view, layers=args.layers)
        stem = f"{args.out}/{view.name}_layerwise_purification"
        files = save_figure(layerwise_purification(d, mode=args.feature_map), stem,
                            formats=formats, dpi=args.dpi, source=bundle)
        figs.append((f"Layer-wise purification — {view.name}", layerwise_purification_plotly(d)))
        print("\n".join(str(f) for f in files))
    s = som_detections_data(bundle, views, layer=args.som_layer)
    files = save_figure(som_detections(s), f"{args.out}/som_detections", formats=formats,
                        dpi=args.dpi, source=bundle)
    figs.append(("SOM's detections", som_detections_plotly(s)))
    files.append(write_plotly_page(f"{args.out}/layerwise_purification.html", figs,
                                   title="Layer-wise purification",
                                   banner=f"Model: {bundle.label}",
                                   synthetic=bundle.is_synthetic))
    print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
