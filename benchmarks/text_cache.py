"""Time to the text queries of a benchmark: first run (text encoder) vs a second run (disk cache).

    python benchmarks/text_cache.py [--model ViT-B-16] [--benchmark ade20k] [--templates openai80]

Each run is a fresh process, as two ``sfp eval`` calls are: it loads the model (random weights,
``pretrained=None``, seeded, so both runs hold the same weights and no download is needed; the
text tower's cost does not depend on the values), then times ``Segmenter.for_benchmark(...)
.queries`` alone. Run 1 uses an empty cache folder (``$SFP_TEXT_CACHE`` points to a temporary
folder), run 2 the same folder; run 3 repeats run 2 with ``--no-cache``'s setting. Printed: one
row per run with the seconds, the text fingerprint's share of them and the cache size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, time, torch
torch.manual_seed(0)
from sfp.models.loading import load_model
from sfp.models.text import text_fingerprint
from sfp.seg.pipeline import Segmenter
b = load_model(sys.argv[1], pretrained=None, device="cpu")
seg = Segmenter.for_benchmark(b, sys.argv[2], method="clip", templates=sys.argv[3],
                              text_cache=sys.argv[4] == "1")
t0 = time.perf_counter()
q = seg.queries
dt = time.perf_counter() - t0
text_fingerprint.__globals__["_FINGERPRINTS"].clear()
t1 = time.perf_counter()
text_fingerprint(b.model)
print(dt, time.perf_counter() - t1, q.embeddings.shape[0])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--benchmark", default="ade20k")
    ap.add_argument("--templates", default="openai80")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SFP_TEXT_CACHE": tmp}
        print(f"{args.model}, {args.benchmark}, templates {args.templates}, "
              f"{os.cpu_count()} CPUs, torch threads default")
        print(f"{'run':<28} {'queries s':>10} {'fingerprint s':>14} {'queries':>8} "
              f"{'cache KiB':>10}")
        for label, use in (("1: empty cache", "1"), ("2: cache filled by run 1", "1"),
                           ("3: --no-cache", "0")):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, args.model, args.benchmark,
                                  args.templates, use], env=env, capture_output=True,
                                 text=True, check=True).stdout.split()
            wall = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in Path(tmp).rglob("*.pt")) / 1024
            print(f"{label:<28} {float(out[0]):>10.2f} {float(out[1]):>14.2f} {out[2]:>8} "
                  f"{size:>10.0f}   (process {wall:.1f} s)")


if __name__ == "__main__":
    main()
