"""Latency of the NeuronView's controls (sfp.viz.widgets.NeuronView), printed as a table.

    python benchmarks/neuron_view_latency.py              # planted ViT-B-16, one 224 image
    python benchmarks/neuron_view_latency.py --repeats 30 --threads 2 --no-segmentation

What is timed is the whole callback a control change runs (no forward: every intervention
is computed when the view is built) — reading the traces and updating the plotly figure — as a
user would feel it minus the browser's drawing. Target: < 300 ms per change. The model is the
planted-outlier one (the same cost as pretrained weights of the architecture).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from sfp.core.io import sample_images
from sfp.models.synthetic import planted_model
from sfp.viz.widgets import NeuronView

TARGET_S = 0.300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=20, help="changes per row")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-segmentation", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle, _ = planted_model(args.model, seed=0)
    img = sample_images()["astronaut"]
    start = time.perf_counter()
    classes = None if args.no_segmentation else "person; sky; rocket; flag"
    view = NeuronView(bundle, img, classes=classes, segmenter_kwargs={"templates": "simple"})
    build = time.perf_counter() - start
    rows = []
    cycles = {
        "intervention": (view.intervention, ["zero", "ttr", "none"]),
        "layer": (view.layer_slider, [2, 6, view.num_layers - 1]),
        "neuron": (view.neuron_select, [v for _, v in view.neuron_select.options[:3]]),
    }
    for name, (control, values) in cycles.items():
        times = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            control.value = values[i % len(values)]
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times), max(times)))
    print(f"NeuronView on {bundle.label}, 224 x 224, threads {torch.get_num_threads()}, "
          f"segmentation {'off' if classes is None else 'on'}; built in {build:.1f} s")
    print(f"{'control':<14}{'median ms':>11}{'max ms':>9}{'target ms':>11}  ok")
    for name, med, mx in rows:
        ok = "yes" if mx < TARGET_S else "NO"
        print(f"{name:<14}{med * 1e3:>11.1f}{mx * 1e3:>9.1f}{TARGET_S * 1e3:>11.0f}  {ok}")


if __name__ == "__main__":
    main()
