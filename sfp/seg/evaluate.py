"""Benchmark evaluation with resumable state, and the ``sfp segment`` / ``eval`` / ``prepare``
commands.

``sfp eval --benchmark voc21 --data-root DIR --out results.json`` segments every image of the
split with :meth:`sfp.seg.pipeline.Segmenter.for_benchmark` and scores it as mmseg's ``IoUMetric``
does (one confusion matrix over the dataset).

Resuming. Work is saved image by image in ``<out>.state/`` (for ``results.json``:
``results.json.state/``):

- ``manifest.json``: the *fingerprint* of the run -- benchmark, split, resolved data root, the
  image ids (count and SHA-1), method, preset and encoder config, model, weights, dtype,
  random-weight seed, segmenter parameters, limit;
- ``rank{r}.jsonl``: one line per finished image, ``{"i": index, "id": name, "c": [[gt, pred,
  pixels], ...]}`` (the image's non-zero confusion entries), appended, flushed and fsynced as
  each image finishes. A torn last line (the process was killed mid-write) is ignored and cut.

Re-running the same command after Ctrl-C or a kill skips the recorded images and gives the
same ``results.json`` as an uninterrupted run (integer confusion counts add exactly). A run
whose fingerprint differs from the manifest is refused with a message naming the differences;
``--restart`` discards the old state. Batch size, device and the number of processes are not
part of the fingerprint (they do not change the labels), so a run may be resumed with another
``--nproc_per_node``. The state directory is kept after a run finishes; re-running then only
re-reads it.

Distributed. Under ``torchrun --nproc_per_node K -m sfp eval ...`` rank r takes images
r, r + K, ... (after ``--limit``), each rank appends to its own ``rank{r}.jsonl``, the confusion
matrices are all-reduced (nccl on CUDA, gloo on CPU), and rank 0 alone writes results.json.

Test hook: with ``SFP_EVAL_INTERRUPT_AFTER=k`` in the environment, each process raises
``KeyboardInterrupt`` after finishing k images (to test resuming).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfp import __version__
from sfp.seg.datasets import BENCHMARKS, DatasetLayoutError, SegDataset, load_dataset
from sfp.seg.distributed import DistContext, init_distributed, rank_device, shard
from sfp.seg.metrics import SegMetrics, confusion_matrix

__all__ = [
    "EvalError",
    "EvalResult",
    "EvalState",
    "StaleStateError",
    "evaluate",
    "make_fingerprint",
    "register_cli",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1
INTERRUPT_ENV = "SFP_EVAL_INTERRUPT_AFTER"


class EvalError(RuntimeError):
    """Evaluation cannot go on (unreadable sample, inconsistent state); the message says why."""


class StaleStateError(EvalError):
    """The state directory belongs to a different configuration."""


@dataclass(frozen=True)
class EvalResult:
    """Scores of an evaluation: metrics over ``num_images`` images (``resumed`` of them read
    from saved state)."""

    metrics: SegMetrics
    num_images: int
    resumed: int


# ---------------------------------------------------------------------------------------------
# Fingerprint and state
# ---------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so a fingerprint compares equal to its stored copy."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def config_dict(config: Any) -> Any:
    """An encoder configuration as a JSON-friendly value (None stays None)."""
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return _jsonable(config.to_dict())
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return _jsonable(dataclasses.asdict(config))
    return repr(config)


def make_fingerprint(
    segmenter: Any,
    dataset: SegDataset,
    *,
    limit: int | None,
    preset: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Everything that determines the numbers of an evaluation (a JSON-friendly dict)."""
    ids = dataset.names[:limit] if limit is not None else dataset.names
    bundle = segmenter.bundle
    return _jsonable(
        {
            "version": STATE_VERSION,
            "benchmark": dataset.benchmark,
            "split": dataset.split,
            "data_root": str(Path(dataset.root).resolve()),
            "num_images": len(ids),
            "ids_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
            "limit": limit,
            "method": segmenter.method,
            "preset": preset,
            "encoder_config": config_dict(segmenter.encoder.config),
            "model": bundle.name,
            "pretrained": bundle.pretrained,
            "seed": seed if bundle.is_random else None,
            "dtype": str(bundle.dtype).replace("torch.", ""),
            "segmenter": segmenter.params(),
            "classes": segmenter.classes,
        }
    )


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                out += [f"{key}.{d}" for d in _diff(a, b)]
            else:
                sa, sb = json.dumps(a), json.dumps(b)
                if len(sa) + len(sb) > 120:
                    out.append(key)
                else:
                    out.append(f"{key}: {sa} -> {sb}")
    return out


class EvalState:
    """The per-image state of one evaluation in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], fingerprint: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.fingerprint = _jsonable(fingerprint)
        self._fh: Any = None

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"

    def prepare(self, restart: bool = False) -> None:
        """Create the directory and manifest, or check that the stored one matches.

        Raises:
            StaleStateError: the directory holds state of another configuration (and
                ``restart`` is False).
        """
        if restart and self.directory.exists():
            shutil.rmtree(self.directory)
        if self.manifest_path.is_file():
            try:
                stored = json.loads(self.manifest_path.read_text(encoding="utf-8"))
                old = stored["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StaleStateError(
                    f"The saved state in {self.directory} is unreadable ({exc}). Re-run with "
                    "--restart to discard it."
                ) from exc
            if old != self.fingerprint:
                changes = _diff(old, self.fingerprint)
                shown = "; ".join(changes[:6]) + (" ..." if len(changes) > 6 else "")
                raise StaleStateError(
                    f"{self.directory} holds the saved progress of a different configuration "
                    f"(changed: {shown}). Re-run with --restart to discard it and start over, "
                    "or choose another --out."
                )
            return
        if self.directory.exists() and any(self.directory.glob("rank*.jsonl")):
            raise StaleStateError(
                f"{self.directory} holds per-image state but no manifest. Re-run with "
                "--restart to discard it."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(
            self.manifest_path,
            {"sfp_version": __version__, "fingerprint": self.fingerprint},
        )

    def load(self, names: Sequence[str]) -> dict[int, np.ndarray]:
        """Finished images of every rank file: ``{index: [[gt, pred, pixels], ...]}``.

        Raises:
            EvalError: a record names another image id than ``names[index]``.
        """
        done: dict[int, np.ndarray] = {}
        for path in sorted(self.directory.glob("rank*.jsonl")):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if not line.endswith("\n"):
                        break  # torn last line
                    try:
                        rec = json.loads(line)
                        i, name, c = int(rec["i"]), rec["id"], rec["c"]
                    except (ValueError, KeyError, TypeError):
                        log.warning("ignoring a damaged line in %s", path)
                        continue
                    if not 0 <= i < len(names) or names[i] != name:
                        raise EvalError(
                            f"{path} records image {name!r} at index {i}, which the dataset "
                            "does not hold there; the dataset changed. Re-run with --restart."
                        )
                    done.setdefault(i, np.asarray(c, dtype=np.int64).reshape(-1, 3))
        return done

    def open(self, rank: int) -> None:
        """Open this rank's record file for appending (cutting a torn last line first)."""
        path = self.directory / f"rank{rank}.jsonl"
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
        self._fh = open(path, "a", encoding="utf-8")

    def record(self, index: int, name: str, matrix: np.ndarray) -> None:
        """Append one finished image (its (C, C) confusion matrix, stored sparsely)."""
        g, p = np.nonzero(matrix)
        entries = np.stack([g, p, matrix[g, p]], axis=1).tolist()
        line = json.dumps({"i": index, "id": name, "c": entries}, separators=(",", ":"))
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _dense(entries: np.ndarray, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    if entries.size:
        np.add.at(m, (entries[:, 0], entries[:, 1]), entries[:, 2])
    return m


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Evaluation loop
# ---------------------------------------------------------------------------------------------


def evaluate(
    segmenter: Any,
    dataset: SegDataset,
    *,
    limit: int | None = None,
    state: EvalState | None = None,
    restart: bool = False,
    ctx: DistContext | None = None,
    progress: bool = True,
) -> EvalResult:
    """Segment the first ``limit`` images of ``dataset`` (all when None) and score them.

    Args:
        segmenter: a :class:`sfp.seg.pipeline.Segmenter` whose classes are the benchmark's.
        state: where to save / resume per-image progress (None: nothing is saved).
        restart: discard ``state``'s previous content first.
        ctx: distributed context (None: one process); images are sharded by rank and the
            confusion matrix is summed over ranks.
        progress: show a tqdm bar on rank 0 (images/s, running mIoU of this rank's share).

    Raises:
        StaleStateError: ``state`` belongs to another configuration (see :class:`EvalState`).
        EvalError: an image or label cannot be read.
    """
    ctx = ctx or DistContext()
    c = dataset.num_classes
    if segmenter.num_classes != c:
        raise EvalError(
            f"the segmenter has {segmenter.num_classes} classes but {dataset.benchmark} has {c}."
        )
    n = len(dataset) if limit is None else min(limit, len(dataset))
    names = dataset.names[:n]
    if state is not None:
        error = None
        if ctx.is_main:
            try:
                state.prepare(restart=restart)
            except EvalError as exc:
                error = str(exc)
        error = ctx.broadcast(error)
        if error is not None:
            raise StaleStateError(error)
    done = state.load(names) if state is not None else {}
    mine = shard(range(n), ctx)
    total = np.zeros((c, c), dtype=np.int64)
    resumed = 0
    for i in mine:
        if i in done:
            total += _dense(done[i], c)
            resumed += 1
    todo = [i for i in mine if i not in done]
    interrupt_after = int(os.environ.get(INTERRUPT_ENV, "0") or 0)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(mine), initial=resumed, unit="img", desc=f"{dataset.benchmark}",
        disable=not (progress and ctx.is_main), dynamic_ncols=True, mininterval=0.5,
    )
    if state is not None:
        state.open(ctx.rank)
    finished = 0
    try:
        for i in todo:
            try:
                sample = dataset[i]
            except (OSError, ValueError) as exc:
                raise EvalError(
                    f"cannot read sample {names[i]!r} of {dataset.benchmark} "
                    f"({dataset.image_path(i)}): {exc}. Progress so far is saved; fix or "
                    "replace the file and re-run the same command to resume."
                ) from exc
            pred = segmenter.predict_labels(sample.image)
            m = confusion_matrix(pred, sample.label, c, dataset.ignore_index)
            if state is not None:
                state.record(i, names[i], m)
            total += m
            finished += 1
            bar.update(1)
            bar.set_postfix(mIoU=f"{SegMetrics.from_confusion(total).miou * 100:.2f}",
                            refresh=False)
            if interrupt_after and finished >= interrupt_after:
                raise KeyboardInterrupt(f"{INTERRUPT_ENV}={interrupt_after}")
    finally:
        bar.close()
        if state is not None:
            state.close()
    counts = ctx.all_reduce_sum(np.array([resumed + finished, resumed], dtype=np.int64))
    total = ctx.all_reduce_sum(total)
    metrics = SegMetrics.from_confusion(total, dataset.class_names)
    return EvalResult(metrics=metrics, num_images=int(counts[0]), resumed=int(counts[1]))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _add_segmenter_arguments(p: argparse.ArgumentParser) -> None:
    from sfp.methods.encoders import available_methods

    p.add_argument("--method", default="sfp", choices=available_methods(),
                   help="dense encoder (default sfp)")
    p.add_argument("--preset", default="official", choices=("official", "paper"),
                   help="SFP configuration preset (method sfp only; default official)")
    p.add_argument("--templates", default="openai80", choices=("openai80", "simple"),
                   help="prompt templates: openai80 (the paper's 80 ImageNet templates) or "
                   "simple ('a photo of a {}.'; advanced: fast tests)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per encoder call")
    g = p.add_argument_group("overrides of the benchmark preset (advanced)")
    g.add_argument("--short-side", type=int, default=None)
    g.add_argument("--crop", type=int, default=None)
    g.add_argument("--stride", type=int, default=None)
    g.add_argument("--logit-scale", type=float, default=None)
    g.add_argument("--prob-thd", type=float, default=None)
    g.add_argument("--area-thd", type=float, default=None,
                   help="area threshold; a negative value switches it off")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="model precision (default fp32; the release ran fp16 on CUDA)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for --pretrained random weights (default 0), so every rank and "
                   "every resumed run builds the same model")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("short_side", "crop", "stride", "logit_scale", "prob_thd"):
        v = getattr(args, key)
        if v is not None:
            out[key] = v
    if args.area_thd is not None:
        out["area_thd"] = None if args.area_thd < 0 else args.area_thd
    out["batch_size"] = args.batch_size
    out["templates"] = args.templates
    out["method"] = args.method
    out["config"] = args.preset if args.method == "sfp" else None
    return out


def _load_bundle(args: argparse.Namespace):
    import sfp.cli.app as cli

    pretrained = args.pretrained or ""
    if pretrained == "random":
        torch.manual_seed(args.seed)
    bundle = cli.load_bundle_from_args(args)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.precision
    ]
    if bundle.dtype != dtype:
        bundle.model.to(dtype)
    return bundle


def _fail(command: str, exc: BaseException | str) -> int:
    print(f"sfp {command}: error: {exc}", file=sys.stderr)
    if isinstance(exc, BaseException):
        log.debug("details", exc_info=exc)
    return 2


def _handled_errors() -> tuple[type[BaseException], ...]:
    from sfp.core.io import ImageError
    from sfp.models.loading import ModelLoadError, WeightsUnavailableError

    return (
        EvalError, DatasetLayoutError, ImageError, WeightsUnavailableError, ModelLoadError,
        FileNotFoundError, ValueError, ImportError,
    )


def _run_segment(args: argparse.Namespace) -> int:
    from sfp.seg.pipeline import Segmenter, save_segmentation

    try:
        bundle = _load_bundle(args)
        kw = _overrides(args)
        if args.benchmark:
            seg = Segmenter.for_benchmark(bundle, args.benchmark, **kw)
        else:
            classes = args.classes if args.classes is not None else Path(args.class_file)
            if args.class_file is not None and not Path(args.class_file).is_file():
                raise FileNotFoundError(f"No class file at {args.class_file}.")
            seg = Segmenter(bundle, classes, **kw)
        out = Path(args.out)
        used: set[str] = set()
        for src in args.images:
            stem = Path(src).stem or "image"
            base, k = stem, 1
            while stem in used:
                k += 1
                stem = f"{base}_{k}"
            used.add(stem)
            result = seg.predict(src)
            lab, ov = save_segmentation(result, out, stem, alpha=args.alpha)
            present = ", ".join(result.class_names[c] for c in result.present())
            print(f"{src}: wrote {lab} and {ov} (classes present: {present})")
    except _handled_errors() as exc:
        return _fail("segment", exc)
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from sfp.seg.pipeline import Segmenter

    if args.limit is not None and args.limit < 1:
        return _fail("eval", f"--limit must be >= 1, got {args.limit}.")
    out = Path(args.out)
    state_dir = Path(args.state_dir) if args.state_dir else out.with_name(out.name + ".state")
    ctx = init_distributed(args.device)
    try:
        args.device = rank_device(ctx, args.device)
        dataset = load_dataset(args.benchmark, args.data_root, split=args.split)
        bundle = _load_bundle(args)
        kw = _overrides(args)
        seg = Segmenter.for_benchmark(bundle, args.benchmark, **kw)
        preset = args.preset if args.method == "sfp" else None
        fingerprint = make_fingerprint(seg, dataset, limit=args.limit, preset=preset,
                                       seed=args.seed)
        state = EvalState(state_dir, fingerprint)
        t0 = time.perf_counter()
        try:
            res = evaluate(seg, dataset, limit=args.limit, state=state, restart=args.restart,
                           ctx=ctx, progress=not args.no_progress)
        except KeyboardInterrupt:
            if ctx.is_main:
                print(f"sfp eval: progress is saved in {state_dir}; run the same command "
                      "again to resume.", file=sys.stderr)
            raise
        elapsed = time.perf_counter() - t0
        if ctx.is_main:
            results = {
                "benchmark": args.benchmark,
                "split": args.split,
                "method": seg.method,
                "preset": preset,
                "model": bundle.name,
                "pretrained": bundle.pretrained,
                "num_images": res.num_images,
                **res.metrics.to_dict(),
                "config": {
                    "segmenter": seg.params(),
                    "encoder": config_dict(seg.encoder.config),
                    "limit": args.limit,
                    "data_root": fingerprint["data_root"],
                    "dtype": fingerprint["dtype"],
                    "seed": fingerprint["seed"],
                },
                "sfp_version": __version__,
            }
            _write_json_atomic(out, results)
            m = res.metrics
            print(
                f"{args.benchmark} / {seg.method}: mIoU {m.miou * 100:.2f}  aAcc "
                f"{m.aacc * 100:.2f}  mAcc {m.macc * 100:.2f}  ({res.num_images} images, "
                f"{res.resumed} resumed, {elapsed:.1f} s, {ctx.world_size} process(es))"
            )
            print(f"wrote {out}")
    except _handled_errors() as exc:
        return _fail("eval", exc)
    finally:
        ctx.shutdown()
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from sfp.seg.datasets import prepare_coco_object

    try:
        written = prepare_coco_object(args.stuff_root, args.out, progress=True, split=args.split)
    except _handled_errors() as exc:
        return _fail("prepare", exc)
    dest = args.out or args.stuff_root
    print(f"coco-object: wrote {written} label files under {dest}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``segment``, ``eval`` and ``prepare`` to the ``sfp`` command."""
    from sfp.cli.app import add_model_arguments

    p = subparsers.add_parser(
        "segment",
        help="segment images with free-form classes; write label and overlay PNGs",
        description="Segment images; writes <stem>_labels.png (palette PNG, pixel value = "
        "class index in the order given) and <stem>_overlay.png into --out.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--classes", help='classes separated by ";", synonyms by ",": '
                     '"cat; dog, puppy; grass"')
    src.add_argument("--class-file", help="file with one class per line (synonyms: ', ')")
    src.add_argument("--benchmark", choices=BENCHMARKS,
                     help="use a benchmark's classes and released hyper-parameters")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    add_model_arguments(p)
    _add_segmenter_arguments(p)
    p.set_defaults(func=_run_segment)

    e = subparsers.add_parser(
        "eval",
        help="evaluate on a benchmark (mIoU); resumable, torchrun-aware",
        description="Evaluate on a benchmark. Progress is saved per image in <out>.state/; "
        "re-running the same command resumes. Under torchrun the images are sharded over "
        "the ranks.",
    )
    e.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    e.add_argument("--data-root", required=True, help="dataset root (mmseg layout)")
    e.add_argument("--out", required=True, help="results JSON file")
    e.add_argument("--split", default="val", help="split (default val)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    e.add_argument("--restart", action="store_true",
                   help="discard saved progress in <out>.state/ and start over")
    e.add_argument("--state-dir", default=None, help="where to save progress "
                   "(default: <out>.state)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(e, synthetic=False)
    _add_segmenter_arguments(e)
    e.set_defaults(func=_run_eval)

    pr = subparsers.add_parser(
        "prepare", help="derive dataset files (coco-object labels from COCO-Stuff164k)",
    )
    pr.add_argument("dataset", choices=("coco-object",))
    pr.add_argument("--stuff-root", required=True, help="COCO-Stuff164k root "
                    "(with annotations/val2017/*_labelTrainIds.png)")
    pr.add_argument("--out", default=None, help="write here instead of into --stuff-root")
    pr.add_argument("--split", default="val")
    pr.set_defaults(func=_run_prepare)
