"""What recording costs: plain forward vs ``record`` (all heads / head mean), side by side.

For each input size and batch size the three variants run interleaved, ``--repeats`` times,
and the table gives the median seconds per call, the ratio to the plain forward measured in
the same loop, and the size of the Trace. Random ViT-B-16 weights (timing does not depend
on the weights).

    python benchmarks/probe_overhead.py [--model ViT-B-16] [--repeats 5] [--threads N]

Targets: all-heads recording <= 1.3x the plain forward, head-mean <= 1.15x at 224 px.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from sfp.core import forward
from sfp.core.probe import record
from sfp.models.loading import load_model


def _plain(bundle, x: torch.Tensor) -> int:
    with torch.inference_mode():
        forward.encode_image(bundle.visual, x)
    return 0


def _record(heads: str):
    def run(bundle, x: torch.Tensor) -> int:
        return record(bundle, x, heads=heads).nbytes

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("sfp.models.loading").setLevel(logging.ERROR)
    bundle = load_model(args.model, pretrained=None, device="cpu")
    variants = {"plain forward": _plain, "record, all heads": _record("all"),
                "record, head mean": _record("mean")}

    print(f"{args.model} (random weights), CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved runs")
    header = f"{'size':>5} {'batch':>5}  {'variant':<18} {'s/call':>8} {'x plain':>8} {'MB':>8}"
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for batch in args.batch:
            torch.manual_seed(0)
            x = torch.randn(batch, 3, size, size)
            for fn in variants.values():  # warm-up
                fn(bundle, x)
            times: dict[str, list[float]] = {name: [] for name in variants}
            sizes: dict[str, int] = {}
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    sizes[name] = fn(bundle, x)
                    times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["plain forward"])
            for name in variants:
                med = statistics.median(times[name])
                mb = f"{sizes[name] / 2**20:.1f}" if sizes[name] else "-"
                print(f"{size:>5} {batch:>5}  {name:<18} {med:>8.3f} {med / base:>8.2f} {mb:>8}")


if __name__ == "__main__":
    main()
