"""Benchmark evaluation with resumable state (the ``sfp eval`` command lives in
:mod:`sfp.cli.seg`).

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

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfp import __version__
from sfp.core.errors import SFPError
from sfp.seg.datasets import SegDataset
from sfp.seg.distributed import DistContext, shard
from sfp.seg.metrics import SegMetrics, confusion_matrix

__all__ = [
    "EvalError",
    "EvalResult",
    "EvalState",
    "StaleStateError",
    "evaluate",
    "make_fingerprint",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1
INTERRUPT_ENV = "SFP_EVAL_INTERRUPT_AFTER"


class EvalError(SFPError, RuntimeError):
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
            "data_root": (str(Path(dataset.root).resolve()) if dataset.root is not None
                          else getattr(dataset, "source", None)),
            "num_images": len(ids),
            "ids_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
            "limit": limit,
            "method": segmenter.method,
            "preset": preset,
            "encoder_config": config_dict(segmenter.encoder.config),
            "model": bundle.name,
            "pretrained": bundle.pretrained,
            "seed": seed if bundle.provenance in ("random", "synthetic", "toy-planted") else None,
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
        """Create the directory and manifest, or check that the stored one matches
        (:func:`prepare_state_dir`)."""
        prepare_state_dir(self.directory, self.fingerprint, restart, state_glob="rank*.jsonl")

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


def prepare_state_dir(directory: str | os.PathLike[str], fingerprint: dict[str, Any],
                      restart: bool = False, *, state_glob: str = "*",
                      what: str = "configuration") -> None:
    """The resumable-state directory of a long run: created with a manifest holding
    ``fingerprint``, or checked against the stored one (``restart`` discards it first).

    state_glob: the state files that must not exist without a manifest. what: the word for
    the run in the messages ("configuration").

    Raises:
        StaleStateError: the directory holds state of another run, an unreadable manifest, or
            state files without a manifest (and ``restart`` is False).
    """
    directory = Path(directory)
    manifest = directory / "manifest.json"
    fingerprint = _jsonable(fingerprint)
    if restart and directory.exists():
        shutil.rmtree(directory)
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StaleStateError(
                f"The saved state in {directory} is unreadable ({exc}). Re-run with "
                "--restart to discard it."
            ) from exc
        if old != fingerprint:
            changes = _diff(old, fingerprint)
            shown = "; ".join(changes[:6]) + (" ..." if len(changes) > 6 else "")
            raise StaleStateError(
                f"{directory} holds the saved progress of a different {what} "
                f"(changed: {shown}). Re-run with --restart to discard it and start over, "
                "or choose another --out."
            )
        return
    if directory.exists() and any(p.name != "manifest.json" for p in directory.glob(state_glob)):
        raise StaleStateError(
            f"{directory} holds saved state but no manifest. Re-run with --restart to "
            "discard it."
        )
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, {"sfp_version": __version__, "fingerprint": fingerprint})


def _dense(entries: np.ndarray, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    if entries.size:
        np.add.at(m, (entries[:, 0], entries[:, 1]), entries[:, 2])
    return m


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Evaluation loop
# ---------------------------------------------------------------------------------------------


def _prepare_state(state: EvalState | None, restart: bool, ctx: DistContext,
                   names: Sequence[str]) -> dict[int, np.ndarray]:
    """Check (rank 0) or create the state directory; the finished images it records."""
    if state is None:
        return {}
    error = None
    if ctx.is_main:
        try:
            state.prepare(restart=restart)
        except EvalError as exc:
            error = str(exc)
    error = ctx.broadcast(error)
    if error is not None:
        raise StaleStateError(error)
    return state.load(names)


def _run_images(segmenter: Any, dataset: SegDataset, todo: Sequence[int], names: Sequence[str],
                state: EvalState | None, total: np.ndarray, bar: Any) -> int:
    """Segment and score images ``todo`` (adding into ``total``); returns how many finished."""
    interrupt_after = int(os.environ.get(INTERRUPT_ENV, "0") or 0)
    c = total.shape[0]
    finished = 0
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
        bar.set_postfix(mIoU=f"{SegMetrics.from_confusion(total).miou * 100:.2f}", refresh=False)
        if interrupt_after and finished >= interrupt_after:
            raise KeyboardInterrupt(f"{INTERRUPT_ENV}={interrupt_after}")
    return finished


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
    done = _prepare_state(state, restart, ctx, names)
    mine = shard(range(n), ctx)
    total = np.zeros((c, c), dtype=np.int64)
    resumed = 0
    for i in mine:
        if i in done:
            total += _dense(done[i], c)
            resumed += 1
    todo = [i for i in mine if i not in done]

    from tqdm.auto import tqdm

    from sfp.models.loading import precision_of

    bar = tqdm(
        total=len(mine), initial=resumed, unit="img",
        desc=f"{dataset.benchmark} {precision_of(segmenter.bundle.model)}",
        disable=not (progress and ctx.is_main), dynamic_ncols=True, mininterval=0.5,
    )
    if state is not None:
        state.open(ctx.rank)
    try:
        finished = _run_images(segmenter, dataset, todo, names, state, total, bar)
    finally:
        bar.close()
        if state is not None:
            state.close()
    counts = ctx.all_reduce_sum(np.array([resumed + finished, resumed], dtype=np.int64))
    total = ctx.all_reduce_sum(total)
    metrics = SegMetrics.from_confusion(total, dataset.class_names)
    return EvalResult(metrics=metrics, num_images=int(counts[0]), resumed=int(counts[1]))
