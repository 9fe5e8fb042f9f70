"""Per-crop time and peak memory of sfp's dense encoders on this machine's CPU.

    python benchmarks/encoders.py [--model ViT-B-16] [--repeats 5] [--batch 1 8] [--size 224]
                                  [--threads N] [--no-memory]

Rows: open_clip's own ``model.encode_image`` (the reference: one pooled vector per crop), then
the dense encoders from :func:`sfp.methods.encoders.make_encoder`: ``clip``, ``sfp`` with
``SFPConfig.official()`` and ``SFPConfig.paper()``, ``sclip``, ``clearclip``, ``naclip`` and
``maskclip``. The model has random weights (``pretrained=None``): speed and memory do not depend
on the weights, and no download is needed.

Time: one process holds the model and every encoder. After one warm-up call each, repetitions
are interleaved: every repetition calls every method once, in an order rotated from repetition to
repetition, so a slow spell of the machine hits all methods alike. The per-crop time is the median
over repetitions of one call's wall time divided by the batch size; ``x ref`` is that median over
the reference's median measured in the same loop.

Memory: ``tracemalloc`` does not see torch's CPU allocations, torch keeps no CPU allocator
statistics, and in a long-lived process freed-but-kept heap pages and earlier methods' caches
blur any reading. So each (method, batch) is measured in a fresh subprocess (Linux) whose glibc
malloc is told to serve every block above 64 KiB by ``mmap`` and to give it back on free
(``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``), so the resident set follows the live
tensors. The child loads the model, builds the encoder and the input, makes one warm-up call
(library initialisation, thread pools), then resets the resident-set high-water mark
(``/proc/self/clear_refs``), reads its RSS, makes the measured call on the same input and reports
``VmHWM`` minus that RSS: the memory the call added to the process at its peak (activations,
attention matrices, copies, library scratch), the weights and the input excluded. Small blocks
and page granularity make it a slight overstatement of the tensors alone; repeated runs agree to
about 1 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from sfp.methods.encoders import make_encoder  # noqa: E402
from sfp.models.loading import ModelBundle, load_model  # noqa: E402

REFERENCE = "open_clip encode_image"
METHODS = (
    REFERENCE,
    "clip",
    "sfp official",
    "sfp paper",
    "sclip",
    "clearclip",
    "naclip",
    "maskclip",
)

# glibc: blocks >= 64 KiB via mmap, returned to the system when freed (RSS follows live memory)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}

Runner = Callable[[torch.Tensor], torch.Tensor]


def build(label: str, bundle: ModelBundle) -> Runner:
    """The callable a row measures: images (B, 3, S, S) -> features."""
    if label == REFERENCE:
        model = bundle.model

        def reference(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model.encode_image(images)

        return reference
    if label.startswith("sfp"):
        from sfp.methods.config import SFPConfig

        preset = label.split()[1]
        return make_encoder(bundle, "sfp", getattr(SFPConfig, preset)())
    return make_encoder(bundle, label)


def load(model: str) -> ModelBundle:
    import logging

    logging.disable(logging.WARNING)  # "weights are RANDOM" is intended here
    try:
        return load_model(model, pretrained=None, device="cpu")
    finally:
        logging.disable(logging.NOTSET)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(model: str, label: str, batch: int, size: int) -> None:
    """Measure one (method, batch) in this fresh process; print one JSON line."""
    bundle = load(model)
    run = build(label, bundle)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    run(images)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = run(images)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024, "shape": list(out.shape)}))


def measure_memory(
    model: str, label: str, batch: int, size: int, threads: int | None = None
) -> float | str:
    """Peak extra RSS (MiB) of one call, from a fresh subprocess; or an error string."""
    cmd = [sys.executable, __file__, "--model", model, "--size", str(size)]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += ["--child", label, str(batch)]
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"error: {last[:60]}"
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


def measure_time(
    runners: dict[str, Runner], batch: int, size: int, repeats: int
) -> dict[str, float | str]:
    """Median seconds per crop of each runner, interleaved repetitions (or an error string)."""
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    results: dict[str, float | str] = {}
    alive: list[str] = []
    for label, run in runners.items():  # warm-up; a method that fails is reported, not timed
        try:
            run(images)
            alive.append(label)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            results[label] = f"error: {type(exc).__name__}: {exc}"[:70]
    times: dict[str, list[float]] = {label: [] for label in alive}
    for rep in range(repeats):
        order = alive[rep % len(alive) :] + alive[: rep % len(alive)]
        for label in order:
            t0 = time.perf_counter()
            runners[label](images)
            times[label].append(time.perf_counter() - t0)
    for label in alive:
        results[label] = statistics.median(times[label]) / batch
    return results


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip ViT name")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--size", type=int, default=224, help="crop side in pixels")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child:
        child(args.model, args.child[0], int(args.child[1]), args.size)
        return

    bundle = load(args.model)
    runners: dict[str, Runner] = {}
    unavailable: dict[str, str] = {}
    for label in METHODS:
        try:
            runners[label] = build(label, bundle)
        except Exception as exc:  # noqa: BLE001 - e.g. sfp/purify.py missing
            unavailable[label] = f"n/a: {type(exc).__name__}: {exc}"[:70]

    load_before = os.getloadavg()
    print(
        f"# {bundle.name} (random weights), {args.size} x {args.size} crops, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {_cpu_name()}"
    )
    print(
        f"# {args.repeats} interleaved repetitions, medians; load average at start "
        f"{load_before[0]:.2f}"
    )
    header = f"{'batch':>5}  {'method':<24} {'ms/crop':>9} {'x ref':>7} {'peak RSS MiB':>13}"
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        times = measure_time(runners, batch, args.size, args.repeats)
        ref = times.get(REFERENCE)
        for label in METHODS:
            t = unavailable.get(label, times.get(label, "?"))
            if isinstance(t, str):
                print(f"{batch:>5}  {label:<24} {t}")
                continue
            ratio = f"{t / ref:7.2f}" if isinstance(ref, float) else f"{'?':>7}"
            mem: float | str = "-"
            if not args.no_memory:
                mem = measure_memory(args.model, label, batch, args.size, args.threads)
            mem_s = f"{mem:13.1f}" if isinstance(mem, float) else f"{mem:>13}"
            print(f"{batch:>5}  {label:<24} {t * 1e3:9.1f} {ratio} {mem_s}", flush=True)
    print(f"# load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
