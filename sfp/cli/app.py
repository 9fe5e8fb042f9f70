"""The ``sfp`` command line.

Subcommands live beside the code they drive: a module listed in ``_COMMAND_MODULES``
exposes ``register_cli(subparsers)``, which adds its parsers with ``set_defaults(func=...)``;
``func(args) -> int`` runs the command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sfp import __version__

# Modules that add subcommands; a missing optional module is skipped.
_COMMAND_MODULES = ("sfp.viz.demo", "sfp.seg.evaluate", "sfp.cli.figures")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfp",
        description=(
            "SFP (Self-adaptive Feature Purification) for CLIP ViTs: open-vocabulary "
            "segmentation and tools to study attention outliers."
        ),
    )
    parser.add_argument("--version", action="version", version=f"sfp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and mod_name.startswith(exc.name):
                continue
            raise
        mod.register_cli(sub)
    return parser


def add_model_arguments(p: argparse.ArgumentParser, synthetic: bool = True) -> None:
    """--model / --pretrained (/ --synthetic) shared by the subcommands that load a model."""
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    p.add_argument(
        "--pretrained",
        default=None,
        help="pretrained tag (e.g. openai), weights file, or 'random'; default: "
        "$SFP_CHECKPOINT if set, else openai",
    )
    p.add_argument(
        "--quick-gelu",
        choices=("auto", "yes", "no"),
        default="auto",
        help="activation of a plain state-dict file (OpenAI weights need yes)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    if synthetic:
        p.add_argument(
            "--synthetic",
            action="store_true",
            help="use the planted-outlier model (no weights needed; NOT a real CLIP)",
        )


def load_bundle_from_args(args: argparse.Namespace):
    """Load the model the shared model arguments ask for."""
    from sfp.models.loading import default_pretrained, load_model

    if getattr(args, "synthetic", False):
        from sfp.models.synthetic import planted_model

        bundle, _ = planted_model(args.model, device=args.device or "cpu")
        return bundle
    pretrained = args.pretrained or default_pretrained()
    qg = {"auto": None, "yes": True, "no": False}[args.quick_gelu]
    return load_model(
        args.model,
        pretrained=None if pretrained == "random" else pretrained,
        device=args.device,
        quick_gelu=qg,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from sfp.core.io import ImageError
    from sfp.models.loading import ModelLoadError, WeightsUnavailableError

    try:
        return int(args.func(args) or 0)
    except (WeightsUnavailableError, ModelLoadError, ImageError, FileNotFoundError) as exc:
        print(f"sfp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sfp {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
