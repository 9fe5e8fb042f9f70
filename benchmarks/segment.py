"""Seconds per image of sliding-window segmentation: windows batched vs one at a time.

    python benchmarks/segment.py [--model ViT-B-16] [--size 336 500] [--repeats 3]
                                 [--device cpu] [--methods clip sfp-official ...]

One 336 x 500 image (already at the inference size, so no resizing: 2 x 4 = 8 windows of
224 x 224, stride 112) is segmented with :class:`sfp.seg.pipeline.Segmenter` (voc21 classes,
``"a photo of a {}."``: the text queries are embedded once, in the warm-up, and not timed)
for every dense encoder (``clip``, ``sfp`` official and paper presets, ``sclip``,
``clearclip``, ``naclip``, ``maskclip``), with ``batch_size=8`` (all windows in one encoder
call) and ``batch_size=1`` (one window per call, as the release does). Random weights: speed
does not depend on them.

Timing: after one warm-up call per (method, batch size), repetitions are interleaved: every
repetition runs every (method, batch size) once, in an order rotated from one repetition to
the next, so a slow spell of the machine hits all alike. Reported: the median seconds per
image of each, and ``b1 / b8``, the ratio of the two medians measured in the same loop.
The time covers everything ``Segmenter.predict`` does (resize, windows, encoder, stitching,
upsampling, post-processing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from sfp.methods.encoders import available_methods  # noqa: E402
from sfp.models.loading import load_model  # noqa: E402
from sfp.seg.pipeline import Segmenter, inference_size, slide_windows  # noqa: E402

METHODS = ("clip", "sfp-official", "sfp-paper", "sclip", "clearclip", "naclip", "maskclip")


def _method(label: str) -> tuple[str, str | None]:
    if label.startswith("sfp"):
        return "sfp", label.split("-", 1)[1] if "-" in label else "official"
    return label, None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, nargs=2, default=[336, 500], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch", type=int, nargs=2, default=[8, 1], metavar=("BIG", "SMALL"))
    args = parser.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)  # "weights are RANDOM" is intended here
    torch.manual_seed(0)
    bundle = load_model(args.model, pretrained=None, device=args.device)
    logging.disable(logging.NOTSET)
    h, w = args.size
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    big, small = args.batch

    runs: dict[tuple[str, int], Segmenter] = {}
    errors: dict[str, str] = {}
    for label in args.methods:
        method, preset = _method(label)
        if method not in available_methods():
            errors[label] = "not registered"
            continue
        for bs in (big, small):
            try:
                seg = Segmenter.for_benchmark(bundle, "voc21", method=method, config=preset,
                                              templates="simple", batch_size=bs)
                seg.predict(image)  # warm-up (and text embedding)
                runs[(label, bs)] = seg
            except Exception as exc:  # noqa: BLE001 - reported in the table
                errors[label] = f"error: {type(exc).__name__}: {exc}"[:70]
                break

    def sync() -> None:
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()

    keys = [k for k in runs if k[0] not in errors]
    times: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    load0 = os.getloadavg()[0]
    for rep in range(args.repeats):
        order = keys[rep % len(keys) :] + keys[: rep % len(keys)] if keys else []
        for key in order:
            sync()
            t0 = time.perf_counter()
            runs[key].predict(image)
            sync()
            times[key].append(time.perf_counter() - t0)

    ih, iw = inference_size(h, w, 336, 2048)
    n_win = len(slide_windows(ih, iw, 224, 112))
    dev = (torch.cuda.get_device_name(bundle.device) if bundle.device.type == "cuda"
           else f"CPU, {torch.get_num_threads()} threads")
    print(f"# {bundle.name} (random weights), {h} x {w} image -> {ih} x {iw}, {n_win} windows "
          f"224/112, voc21 classes; {dev}; torch {torch.__version__}")
    print(f"# {args.repeats} interleaved repetitions, medians; load average at start {load0:.2f}")
    head = f"| {'method':<14} | {f's/img b={big}':>10} | {f's/img b={small}':>10} | " \
           f"{f'b{small} / b{big}':>8} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for label in args.methods:
        if label in errors:
            print(f"| {label:<14} | {errors[label]} |")
            continue
        tb = statistics.median(times[(label, big)])
        ts = statistics.median(times[(label, small)])
        print(f"| {label:<14} | {tb:>10.3f} | {ts:>10.3f} | {ts / tb:>8.2f} |")


if __name__ == "__main__":
    main()
