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
    "model_name",
    "resolve_precision",
    "plain_text",
    "say_caveat",
    "segmenter_overrides",
]

_PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")


def add_model_arguments(p: argparse.ArgumentParser, precision: str = "fp32") -> None:
    """--model / --pretrained / --quick-gelu / --device / --synthetic / --precision / --seed.

    precision: the default of --precision (``"auto"``: fp16 on CUDA as the release runs,
    fp32 on the CPU)."""
    p.add_argument("--model", default=None,
                   help="open_clip model name, or 'toy' for the toy CLIP shipped with sfp "
                   "(trained on generated textures; no weights needed); default ViT-B-16, "
                   "toy for --benchmark toy")
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
                   help="use the planted-outlier model (no weights needed; NOT a real CLIP); "
                   "with --model toy: the toy CLIP with planted outliers")
    p.add_argument("--precision", default=precision, choices=_PRECISION_CHOICES,
                   help="fp16/bf16: weights in that dtype, LayerNorms in fp32 (the release's "
                   "convention); auto: fp16 on CUDA, fp32 on the CPU "
                   f"(default {precision})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of --pretrained random and --synthetic weights (default 0), so "
                   "every rank and every resumed run builds the same model")


def load_bundle_from_args(args: argparse.Namespace) -> Any:
    """Load the model the shared model arguments ask for (in the asked precision)."""
    from sfp.models.loading import default_pretrained, load_model, set_precision

    args.model = model_name(args)
    if getattr(args, "synthetic", False) and args.model == "toy":
        from sfp.models.toy import toy_planted_model

        bundle, _ = toy_planted_model(args.device or "cpu", seed=args.seed)
    elif getattr(args, "synthetic", False):
        from sfp.models.synthetic import planted_model

        bundle, _ = planted_model(args.model, seed=args.seed, device=args.device or "cpu")
    else:
        pretrained = args.pretrained or default_pretrained()
        if pretrained == "random":
            torch.manual_seed(args.seed)
        qg = {"auto": None, "yes": True, "no": False}[args.quick_gelu]
        bundle = load_model(args.model, pretrained=None if pretrained == "random" else pretrained,
                            device=args.device, quick_gelu=qg)
    precision = resolve_precision(args, bundle.device)
    if precision == "fp16" and getattr(args, "synthetic", False):
        if getattr(args, "precision", "fp32") != "auto":
            from sfp.core.errors import InputError

            raise InputError("The planted-outlier model's planted activations exceed fp16's "
                             "range (its features would be NaN); use --precision fp32 or bf16.")
        precision = "fp32"  # auto: the planted model runs in fp32 even on CUDA
    set_precision(bundle.model, precision)
    return bundle


def model_name(args: argparse.Namespace) -> str:
    """--model, or its default: ``"toy"`` for ``--benchmark toy``, else ``"ViT-B-16"``."""
    if getattr(args, "model", None):
        return "toy" if args.model.lower() == "toy" else args.model
    return "toy" if getattr(args, "benchmark", None) == "toy" else "ViT-B-16"


def resolve_precision(args: argparse.Namespace, device: Any) -> str:
    """The precision the arguments ask for on ``device`` (``auto`` resolved)."""
    from sfp.models.loading import default_precision

    precision = getattr(args, "precision", "fp32")
    return default_precision(device) if precision == "auto" else precision
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


def add_segmenter_arguments(p: argparse.ArgumentParser, allow_all: bool = False) -> None:
    """--method / --preset / --templates / --batch-size and the settings overrides.

    allow_all: --method also takes ``all`` (every encoder, and sfp with every preset), and
    its default is None (the command decides)."""
    from sfp.methods.config import PRESETS
    from sfp.methods.encoders import available_methods
    from sfp.models.text import TEMPLATES

    if allow_all:
        p.add_argument("--method", default=None, choices=(*available_methods(), "all"),
                       help="dense encoder, or all: every encoder and sfp with every preset, "
                       "one table (default sfp; all for --benchmark toy)")
    else:
        p.add_argument("--method", default="sfp", choices=available_methods(),
                       help="dense encoder (default sfp)")
    p.add_argument("--preset", default="official", choices=PRESETS.names(),
                   help="SFP configuration preset (method sfp only; default official)")
    p.add_argument("--templates", default=None, choices=TEMPLATES.names(),
                   help="prompt templates: " + "; ".join(
                       f"{e.name}: {e.doc}" for e in TEMPLATES.entries())
                   + " (default: the preset's if it names one (release-2025-12: sfp15), "
                   "else the benchmark's, else openai80)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per encoder call")
    p.add_argument("--no-cache", action="store_true",
                   help="embed the text queries afresh, without the on-disk cache "
                   "($SFP_TEXT_CACHE, default ~/.cache/sfp/text)")
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
    out["text_cache"] = not getattr(args, "no_cache", False)
    out["method"] = args.method
    out["config"] = args.preset if args.method == "sfp" else None
    return out
