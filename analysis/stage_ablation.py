"""Stage ablation (paper Fig. 3): plain CLIP, +SOM, +SOM+SAE, full SFP and baselines side by
side — feature maps with SOM's outliers marked, and the segmentation of the crop.

    python analysis/stage_ablation.py --image photo.jpg --pretrained openai --classes voc21
    python analysis/stage_ablation.py --synthetic --classes "sky; house; tree; grass" \\
        --baselines sclip,naclip --feature-map pca

Writes ``<out>/<image>_stage_ablation.{png,svg,html}``.
"""

from __future__ import annotations

import sys

from sfp.cli.figures import script_inputs, script_parser
from sfp.models.text import TEMPLATES
from sfp.viz.figures import save_figure, stage_ablation, stage_ablation_data, stage_ablation_plotly
from sfp.viz.figures.export import write_plotly_page


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, "analysis_output/stage_ablation")
    p.add_argument("--classes", default="voc21", help="benchmark name, class file or 'a; b; c'")
    p.add_argument("--templates", default="openai80", choices=TEMPLATES.names(),
                   help="prompt templates (openai80 = the paper's 80; simple = one)")
    p.add_argument("--baselines", default="sclip", help="comma-separated baseline encoders")
    p.add_argument("--preset", default="official", choices=("official", "paper"))
    p.add_argument("--feature-map", default="norm", choices=("norm", "pca"))
    p.add_argument("--space", default="tokens", choices=("tokens", "features"),
                   help="map the final tokens (before ln_post) or the projected features")
    args = p.parse_args(argv)
    bundle, views, formats = script_inputs(args)
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    for view in views:
        d = stage_ablation_data(bundle, view, args.classes, config=args.preset,
                                baselines=baselines, templates=args.templates)
        stem = f"{args.out}/{view.name}_stage_ablation"
        files = save_figure(stage_ablation(d, mode=args.feature_map, space=args.space), stem,
                            formats=formats, dpi=args.dpi, source=bundle)
        files.append(write_plotly_page(f"{stem}.html", [("Stage ablation",
                                                         stage_ablation_plotly(d,
                                                                               space=args.space))],
                                       title=f"Stage ablation — {view.name}",
                                       banner=f"Model: {bundle.label}",
                                       synthetic=bundle.is_synthetic))
        k = d.columns.index("SFP")
        print(f"{view.name}: mean cosine(SFP, CLIP) = {d.cosine(k, 0).mean():.3f}; "
              f"SOM flagged {int(d.outliers.sum())} tokens")
        print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
