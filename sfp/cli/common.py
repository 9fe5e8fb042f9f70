"""What the ``sfp`` subcommands share: model and segmenter arguments, loading the model.

Choices (methods, presets, template sets, benchmarks, detectors) are read from their
registries, so ``--help`` always lists what is registered.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

__all__ = [
    "add_model_arguments",
    "add_segmenter_arguments",
    "load_bundle_from_args",
    "plain_text",
    "say_caveat",
    "segmenter_overrides",
]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model / --pretrained / --quick-gelu / --device / --synthetic / --precision / --seed."""
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    p.add_argument(
        "--pretrained",
        default=None,
        help="pretrained tag (e.g. openai), weights file, or 'random'; default: "
        "$SFP_CHECKPOINT if set, else openai",
    )
    p.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto",
                   help="activation of a plain state-dict file (OpenAI weights need yes)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--synthetic", action="store_true",
                   help="use the planted-outlier model (no weights needed; NOT a real CLIP)")
    p.add_argument("--precision", default="fp32", choices=tuple(_DTYPES),
                   help="model precision (default fp32; the release ran fp16 on CUDA)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of --pretrained random and --synthetic weights (default 0), so "
                   "every rank and every resumed run builds the same model")


def load_bundle_from_args(args: argparse.Namespace) -> Any:
    """Load the model the shared model arguments ask for (in the asked precision)."""
    from sfp.models.loading import default_pretrained, load_model

    if getattr(args, "synthetic", False):
        from sfp.models.synthetic import planted_model

        bundle, _ = planted_model(args.model, seed=args.seed, device=args.device or "cpu")
    else:
        pretrained = args.pretrained or default_pretrained()
        if pretrained == "random":
            torch.manual_seed(args.seed)
        qg = {"auto": None, "yes": True, "no": False}[args.quick_gelu]
        bundle = load_model(args.model, pretrained=None if pretrained == "random" else pretrained,
                            device=args.device, quick_gelu=qg)
    dtype = _DTYPES[getattr(args, "precision", "fp32")]
    if bundle.dtype != dtype:
        bundle.model.to(dtype)
    return bundle


def plain_text(doc: str) -> str:
    """A docstring as ``--help`` shows it: without reStructuredText's double backticks."""
    return doc.replace("``", "")


def say_caveat(command: str, bundle: Any) -> None:
    """Say once, on stderr, that the model's weights are random or synthetic (and that every
    image written carries a banner saying so); nothing for real weights."""
    if bundle.caveat:
        name = bundle.label.replace(f" / {bundle.caveat}", "")
        print(f"sfp {command}: note: {name} — {bundle.caveat}, not a pretrained CLIP; every "
              "image written carries a banner saying so.", file=sys.stderr)


def add_segmenter_arguments(p: argparse.ArgumentParser) -> None:
    """--method / --preset / --templates / --batch-size and the settings overrides."""
    from sfp.methods.config import PRESETS
    from sfp.methods.encoders import available_methods
    from sfp.models.text import TEMPLATES

    p.add_argument("--method", default="sfp", choices=available_methods(),
                   help="dense encoder (default sfp)")
    p.add_argument("--preset", default="official", choices=PRESETS.names(),
                   help="SFP configuration preset (method sfp only; default official)")
    p.add_argument("--templates", default=None, choices=TEMPLATES.names(),
                   help="prompt templates: " + "; ".join(
                       f"{e.name}: {e.doc}" for e in TEMPLATES.entries())
                   + " (default: the benchmark's, else openai80)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per encoder call")
    g = p.add_argument_group("overrides of the benchmark's settings (advanced)")
    g.add_argument("--short-side", type=int, default=None)
    g.add_argument("--crop", type=int, default=None)
    g.add_argument("--stride", type=int, default=None)
    g.add_argument("--logit-scale", type=float, default=None)
    g.add_argument("--prob-thd", type=float, default=None)
    g.add_argument("--area-thd", type=float, default=None,
                   help="area threshold; a negative value switches it off")


def segmenter_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :class:`sfp.seg.pipeline.Segmenter` from the parsed arguments."""
    out: dict[str, Any] = {}
    for key in ("short_side", "crop", "stride", "logit_scale", "prob_thd", "templates"):
        v = getattr(args, key)
        if v is not None:
            out[key] = v
    if args.area_thd is not None:
        out["area_thd"] = None if args.area_thd < 0 else args.area_thd
    out["batch_size"] = args.batch_size
    out["method"] = args.method
    out["config"] = args.preset if args.method == "sfp" else None
    return out
