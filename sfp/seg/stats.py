"""Dataset statistics of where outliers come from, with resumable state (``sfp stats``).

``dataset_stats(bundle, source, out)`` runs :func:`sfp.core.neurons.outlier_sources` on every
image of a folder or a benchmark split (each image resized to ``size`` on its short side and
centre-cropped to ``size x size``, so every image has the same patch grid) and writes one
``.npz`` file (no pickle: ``np.load(path)`` reads it) holding:

- ``norm_quantiles`` (n, L, Q): per image and layer, the patch-norm quantiles at
  ``quantiles`` (0, 1, 5, 25, 50, 75, 95, 99, 100 %); ``norm_ratio`` (n, L): max / median;
- ``recurrence`` (L, gh, gw): how often each grid position is an outlier token at each
  layer (share of the images; outlier rule of :func:`sfp.core.neurons.outlier_mask`);
- ``neuron_scores`` (L, d_mlp): mean |activation| at the outlier tokens, over the images with
  outliers (each image's outlier layer: ``outlier_layer`` or its largest max / median layer);
  ``top_neurons`` (k, 3): ``(layer, neuron, score)`` over layers 1..``max_layer``, the first
  layer where half the outlier tokens are already outliers;
- ``channel_scores`` / ``channel_typical`` (L, C): mean |h_l[c]| at the outlier tokens / at
  the other patches; ``top_channels`` (k, 3) ``(layer, channel, score)`` at the most common
  outlier layer; ``top_magnitudes`` (L, 3) and ``median_magnitude`` (L,) (Sun et al.);
- ``header``: a JSON string (model, source, image names, parameters, counts).

Resuming. Progress is saved after each image in ``<out>.state/``: ``manifest.json`` (the
fingerprint: model, weights, source and its image names, size, parameters) and ``state.npz``
(the running sums and per-image rows, written to a temporary file and renamed, so a kill never
leaves it torn). Re-running the same command skips the finished images and writes the same
file as an uninterrupted run (the sums are float64 and continue in the same order); a run
whose fingerprint differs is refused, ``restart=True`` (``--restart``) discards the state.

Test hook: with ``SFP_STATS_INTERRUPT_AFTER=k`` in the environment the run raises
``KeyboardInterrupt`` after finishing k images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfp import __version__
from sfp.core import forward, io
from sfp.core import neurons as nr
from sfp.core.errors import SFPError
from sfp.seg.datasets import load_dataset
from sfp.seg.evaluate import prepare_state_dir

__all__ = ["QUANTILES", "StatsError", "dataset_stats", "image_source", "load_stats"]

QUANTILES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
INTERRUPT_ENV = "SFP_STATS_INTERRUPT_AFTER"
_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class StatsError(SFPError, ValueError):
    """The statistics cannot be computed or resumed; the message says why."""


@dataclass(frozen=True)
class ImageSource:
    """Images by name: ``names`` (sorted) and ``load(i) -> (H, W, 3) uint8 or path``."""

    kind: str
    location: str
    names: list[str]
    items: list[Any]

    def load(self, i: int) -> Any:
        item = self.items[i]
        return item.image if hasattr(item, "image") else item


def image_source(images: str | os.PathLike[str] | None = None, *, benchmark: str | None = None,
                 data_root: str | os.PathLike[str] | None = None,
                 split: str = "val") -> ImageSource:
    """A folder of images (sorted file names) or a benchmark split's images."""
    if benchmark is not None:
        if data_root is None:
            raise StatsError("a benchmark needs its data root (--data-root DIR).")
        ds = load_dataset(benchmark, data_root, split)
        return ImageSource("benchmark", f"{benchmark}:{split}", list(ds.names),
                           _LazyItems(ds))  # type: ignore[arg-type]
    if images is None:
        raise StatsError("give a folder of images or a benchmark (--images DIR or --benchmark).")
    root = Path(images).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"No folder of images at {root}.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _EXTS)
    if not files:
        raise StatsError(f"{root} holds no images ({', '.join(_EXTS)}).")
    return ImageSource("folder", str(root.resolve()), [str(p.relative_to(root)) for p in files],
                       [str(p) for p in files])


class _LazyItems:
    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __getitem__(self, i: int) -> Any:
        return self.ds[i]

    def __len__(self) -> int:
        return len(self.ds)


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fingerprint(bundle: Any, source: ImageSource, names: Sequence[str], size: int,
                 params: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "sfp.stats/1",
        "model": getattr(bundle, "name", "?"),
        "pretrained": str(getattr(bundle, "pretrained", "?")),
        "source": source.location,
        "images": list(names),
        "size": int(size),
        **params,
    }


def _load_state(state_dir: Path, fingerprint: dict[str, Any], restart: bool) -> dict | None:
    """The saved state of this run, or None (the directory is checked or created by
    :func:`sfp.seg.evaluate.prepare_state_dir`)."""
    prepare_state_dir(state_dir, fingerprint, restart, state_glob="state.npz", what="run")
    path = state_dir / "state.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def dataset_stats(
    bundle: Any,
    source: ImageSource,
    out: str | os.PathLike[str],
    *,
    size: int = 224,
    limit: int | None = None,
    outlier_layer: int | None = None,
    norm_threshold: float | None = None,
    top: int = 20,
    restart: bool = False,
    progress: bool = True,
) -> Path:
    """Compute the statistics of ``source``'s images (see the module doc); returns ``out``."""
    visual = forward.visual_of(bundle)
    blocks = forward.blocks_of(visual)
    num_layers = len(blocks)
    grid = forward.patch_grid(visual, size, size)
    d_mlp = int(blocks[0].mlp.c_fc.weight.shape[0])
    width = int(visual.transformer.width)
    names = source.names[:limit] if limit is not None else source.names
    params = {"outlier_layer": outlier_layer, "norm_threshold": norm_threshold, "top": int(top),
              "quantiles": list(QUANTILES)}
    out = Path(out)
    state_dir = out.with_name(out.name + ".state")
    fp = _fingerprint(bundle, source, names, size, params)
    state = _load_state(state_dir, fp, restart)
    if state is None:
        state = {
            "done": np.zeros(0, dtype=np.int64), "n_used": np.zeros((), dtype=np.int64),
            "neuron_sum": np.zeros((num_layers, d_mlp)), "chan_sum": np.zeros((num_layers, width)),
            "typ_sum": np.zeros((num_layers, width)), "top_sum": np.zeros((num_layers, 3)),
            "med_sum": np.zeros(num_layers), "hits": np.zeros(num_layers), "total": np.zeros(()),
            "recurrence": np.zeros((num_layers, *grid)),
            "norm_quantiles": np.zeros((0, num_layers, len(QUANTILES))),
            "norm_ratio": np.zeros((0, num_layers)), "outlier_layer": np.zeros(0, dtype=np.int64),
        }
    stop_after = int(os.environ.get(INTERRUPT_ENV, "0") or 0)
    from tqdm.auto import tqdm

    done = int(state["done"].size)
    bar = tqdm(total=len(names), initial=done, desc="stats", unit="img", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    finished = 0
    try:
        for i in range(done, len(names)):
            x = io.prepare(source.load(i), bundle, size=size)
            _add_image(state, bundle, x, outlier_layer, norm_threshold, grid)
            state["done"] = np.append(state["done"], i)
            _write_npz_atomic(state_dir / "state.npz", state)
            bar.update(1)
            finished += 1
            if stop_after and finished >= stop_after and i + 1 < len(names):
                raise KeyboardInterrupt
    finally:
        bar.close()
    _write_result(out, state, fp, top, num_layers)
    return out


def _add_image(state: dict[str, np.ndarray], bundle: Any, x: torch.Tensor,
               outlier_layer: int | None, norm_threshold: float | None,
               grid: tuple[int, int]) -> None:
    num_layers = state["hits"].shape[0]
    src = nr.outlier_sources(bundle, x, outlier_layer=outlier_layer,
                             norm_threshold=norm_threshold, max_layer=num_layers)
    used = src.n_used
    state["n_used"] = state["n_used"] + used
    state["neuron_sum"] += used * src.neuron_scores.double().numpy()
    state["chan_sum"] += used * src.channel_scores.double().numpy()
    state["typ_sum"] += src.channel_typical.double().numpy()
    state["top_sum"] += src.top_magnitudes.double().numpy()
    state["med_sum"] += src.median_magnitude.double().numpy()
    state["hits"] += src.hits.double().numpy()
    state["total"] = state["total"] + float(src.hits[src.outlier_layer - 1])
    norms = src.patch_norms[0]  # (L, N)
    state["recurrence"] += (nr.outlier_mask(norms, norm_threshold).double()
                            .reshape(num_layers, *grid).numpy())
    q = torch.quantile(norms.double(), torch.tensor(QUANTILES, dtype=torch.float64), dim=1).T
    state["norm_quantiles"] = np.concatenate([state["norm_quantiles"], q.numpy()[None]])
    ratio = (norms.amax(1) / norms.median(1).values).double().numpy()
    state["norm_ratio"] = np.concatenate([state["norm_ratio"], ratio[None]])
    state["outlier_layer"] = np.append(state["outlier_layer"], src.outlier_layer)


def _write_result(out: Path, state: dict[str, np.ndarray], fp: dict[str, Any], top: int,
                  num_layers: int) -> None:
    n = int(state["done"].size)
    n_used = int(state["n_used"])
    used = max(n_used, 1)
    total = float(state["total"])
    onset = state["hits"] / total if total else np.zeros(num_layers)
    layers = state["outlier_layer"]
    mode = int(np.bincount(layers).argmax()) if n else num_layers
    reached = [l for l in range(1, mode + 1) if onset[l - 1] >= nr.ONSET_SHARE]
    max_layer = reached[0] if reached else mode
    neuron_scores = state["neuron_sum"] / used
    flat = neuron_scores[:max_layer].ravel()
    order = np.argsort(-flat, kind="stable")[: int(top)]
    d = neuron_scores.shape[1]
    top_neurons = np.array([[i // d + 1, i % d, flat[i]] for i in order]).reshape(-1, 3)
    chan = state["chan_sum"] / used
    corder = np.argsort(-chan[mode - 1], kind="stable")[: int(top)]
    top_channels = np.array([[mode, c, chan[mode - 1, c]] for c in corder]).reshape(-1, 3)
    header = {**fp, "sfp_version": __version__, "n_images": n, "n_used": n_used,
              "max_layer": max_layer, "common_outlier_layer": mode}
    arrays = {
        "header": np.array(json.dumps(header)),
        "quantiles": np.array(QUANTILES),
        "norm_quantiles": state["norm_quantiles"],
        "norm_ratio": state["norm_ratio"],
        "outlier_layer": layers,
        "recurrence": state["recurrence"] / max(n, 1),
        "onset": onset,
        "neuron_scores": neuron_scores,
        "top_neurons": top_neurons,
        "channel_scores": chan,
        "channel_typical": state["typ_sum"] / max(n, 1),
        "top_channels": top_channels,
        "top_magnitudes": state["top_sum"] / max(n, 1),
        "median_magnitude": state["med_sum"] / max(n, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_npz_atomic(out, arrays)


def load_stats(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a statistics file: ``(header, arrays)`` (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No statistics file at {path}; make one with `sfp stats`.")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays.pop("header")))
    return header, arrays
