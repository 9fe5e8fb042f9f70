"""Latency of the ThresholdTuner's controls (sfp.viz.widgets.ThresholdTuner), printed as a table.

    python benchmarks/tuner_latency.py                  # ViT-B-16, one 224 x 224 image
    python benchmarks/tuner_latency.py --images 3 --repeats 30 --threads 2

What is timed is the whole callback a slider change runs — post-processing of every image,
mIoU, redrawing the figure (PNG overlays) — as a user would feel it minus the browser's
drawing. Targets (issue #8): post-processing changes < 100 ms, encoder-level changes < 2 s for
a 224 x 224 image on a CPU. The weights are random (same cost as pretrained ones: only the
numbers differ); the text queries are embedded before timing starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from sfp.core.io import sample_images
from sfp.models.loading import load_model
from sfp.viz.widgets import ThresholdTuner

CLASSES = "background, wall, table; cup, coffee; person, astronaut; cat; flag"
POST_TARGET_S = 0.100
ENCODER_TARGET_S = 2.0


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _row(name: str, times: list[float], runs: int, target: float | None) -> str:
    ms = [1000 * t for t in times]
    med = statistics.median(ms)
    p90 = float(np.percentile(ms, 90))
    verdict = "" if target is None else ("ok" if med < 1000 * target else "SLOW")
    tgt = "" if target is None else f"< {1000 * target:.0f}"
    return (f"| {name:<44s} | {len(ms):>3d} | {med:>9.1f} | {p90:>9.1f} | {max(ms):>9.1f} | "
            f"{runs:>7d} | {tgt:>8s} | {verdict:<4s} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--images", type=int, default=1, help="number of 224 x 224 images")
    parser.add_argument("--repeats", type=int, default=20, help="changes per row")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    logging.getLogger("sfp.models.loading").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)

    bundle = load_model(args.model, pretrained=None, device="cpu")
    photos = sample_images()
    names = ["coffee", "astronaut", "chelsea", "rocket"]
    images = {}
    for i in range(args.images):
        img = photos[names[i % len(names)]]
        h, w = img.shape[:2]
        s = min(h, w)
        crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        t = torch.from_numpy(crop).permute(2, 0, 1).float()[None] / 255
        t = torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear",
                                            antialias=True)[0]
        images[f"{names[i % len(names)]}{i}"] = (t.permute(1, 2, 0).numpy() * 255).astype(
            np.uint8)
    rng = np.random.default_rng(0)
    masks = {k: rng.integers(0, 5, size=(224, 224)) for k in images}

    start = time.perf_counter()
    tuner = ThresholdTuner(bundle, images, CLASSES, masks=masks)
    build = time.perf_counter() - start

    rows = []
    # post-processing: alternate values so that every change is a real change
    for label, slider, values in (
        ("post: logit_scale", tuner.logit_scale_slider, [30.0, 50.0]),
        ("post: prob_thd", tuner.prob_thd_slider, [0.2, 0.1]),
        ("post: area_thd", tuner.area_thd_slider, [0.1, 0.05]),
    ):
        runs0 = tuner.encoder_runs
        times = [_time(lambda s=slider, v=values[i % 2]: setattr(s, "value", v))
                 for i in range(args.repeats)]
        rows.append(_row(label, times, tuner.encoder_runs - runs0, POST_TARGET_S))

    # encoder-level: every change a configuration not seen before (cache miss)
    n_enc = max(3, args.repeats // 4)
    for label, slider, values in (
        ("encoder: top_k (new config)", tuner.top_k_slider, list(range(1, n_enc + 1))),
        ("encoder: sim_threshold (new config)", tuner.sim_threshold_slider,
         [round(0.30 + 0.02 * i, 2) for i in range(n_enc)]),
        ("encoder: res_cls (new config)", tuner.res_cls_slider,
         [round(0.10 + 0.02 * i, 2) for i in range(n_enc)]),
    ):
        runs0 = tuner.encoder_runs
        times = [_time(lambda s=slider, v=v: setattr(s, "value", v)) for v in values]
        rows.append(_row(label, times, tuner.encoder_runs - runs0, ENCODER_TARGET_S))
    runs0 = tuner.encoder_runs
    times = [_time(lambda v=v: setattr(tuner.detector_dropdown, "value", v))
             for v in ("l2", "norm_z", "lof")]
    rows.append(_row("encoder: detector (new config)", times, tuner.encoder_runs - runs0,
                     ENCODER_TARGET_S))
    # back and forth between two configurations seen before (cache hits)
    tuner.top_k_slider.value = 1
    tuner.top_k_slider.value = 2
    runs0 = tuner.encoder_runs
    times = [_time(lambda v=(1 if i % 2 else 2): setattr(tuner.top_k_slider, "value", v))
             for i in range(args.repeats)]
    rows.append(_row("encoder: top_k (cached config)", times, tuner.encoder_runs - runs0,
                     POST_TARGET_S))
    # the encoder alone, for reference
    seg = tuner.segmenter
    img0 = tuner.images[0]
    times = [_time(lambda: seg.predict_logits(img0)) for _ in range(3)]
    rows.append(_row("reference: Segmenter.predict_logits (1 img)", times, len(times), None))

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"ThresholdTuner latency — {bundle.label}, {args.images} image(s) 224 x 224, "
          f"{len(tuner.segmentations[0].class_names)} classes, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; build {build:.2f} s")
    print(f"| {'change':<44s} |   n | median ms |    p90 ms |    max ms | encoder | target   "
          "|      |")
    print("|" + "-" * 46 + "|-----|-----------|-----------|-----------|---------|----------|"
          "------|")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
