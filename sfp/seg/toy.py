"""Measurements on the toy benchmark: mIoU per method, clean vs planted outliers, and how well
the detectors find the planted outliers.

These functions are what ``benchmarks/toy_outliers.py`` prints and what the tests check. They
run on the toy CLIP (:mod:`sfp.models.toy`) and its generated benchmark
(:class:`sfp.seg.datasets.ToyDataset`); numbers on toy data say nothing about real CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sfp.core.errors import SFPError
from sfp.seg.datasets import ToyDataset
from sfp.seg.evaluate import evaluate
from sfp.seg.pipeline import Segmenter

__all__ = ["MethodRow", "clean_vs_planted", "planted_recall", "toy_miou"]


def toy_miou(bundle: Any, method: str = "clip", preset: Any = None, n: int = 100,
             split: str = "val", progress: bool = False, **overrides: Any) -> float:
    """mIoU (fraction, 0..1) of ``method`` (with ``preset``, a preset name or a configuration
    ``make_encoder`` takes) on the first ``n`` scenes of the toy benchmark."""
    seg = Segmenter.for_benchmark(bundle, "toy", method=method, config=preset,
                                  text_cache=False, **overrides)
    return float(evaluate(seg, ToyDataset(split), limit=n, progress=progress).metrics.miou)


@torch.no_grad()
def planted_recall(bundle: Any, truth: Any, detector: str = "som", n: int = 100,
                   layer: int | None = None, top_k: int | None = None,
                   split: str = "val") -> tuple[float, int]:
    """Recall of ``detector`` on the planted outliers of ``n`` toy scenes: (found / planted,
    planted tokens in all). layer: default L - 1; top_k: the detector's default."""
    from sfp.core.io import normalize
    from sfp.core.outliers import detect
    from sfp.core.probe import record

    layer = bundle.num_layers - 1 if layer is None else layer
    ds = ToyDataset(split)
    images = torch.stack([torch.from_numpy(ds[i].image).permute(2, 0, 1).float() / 255
                          for i in range(n)])
    x = normalize(images, bundle)
    planted = truth.mask(x).flatten(1)
    trace = record(bundle, x, layers=[layer])
    params = {} if top_k is None else {"top_k": top_k}
    found = detect(detector, trace, layer=layer, **params).mask
    total = int(planted.sum())
    return (int((found & planted).sum()) / total if total else float("nan")), total


@dataclass(frozen=True)
class MethodRow:
    """One method's mIoU (fractions) on the clean toy CLIP, with the planted circuit but no
    outliers (``circuit``: the same weight edits, outlier norm ~0; None when not measured) and
    on the planted toy CLIP (None: the method does not apply, ``skipped`` says why)."""

    label: str
    clean: float | None
    planted: float | None
    skipped: str = ""
    circuit: float | None = None

    @property
    def drop(self) -> float | None:
        return None if self.clean is None or self.planted is None else self.clean - self.planted


def clean_vs_planted(clean: Any, planted: Any, variants: Sequence[tuple[Any, ...]],
                     n: int = 100, progress: bool = True, circuit: Any = None
                     ) -> list[MethodRow]:
    """mIoU of every ``(method, preset)`` on the clean and the planted toy CLIP (and on
    ``circuit``, the planted circuit without outliers, when given). A variant may be
    ``(method, config, label)``: ``config`` any configuration ``make_encoder`` takes (e.g. an
    SFP stage's ``SFPConfig``), ``label`` its row name."""
    from tqdm.auto import tqdm

    rows = []
    for variant in tqdm(list(variants), desc="methods", disable=not progress):
        method, preset = variant[:2]
        label = variant[2] if len(variant) > 2 else (
            method if preset is None else f"{method}/{preset}")
        try:
            a = toy_miou(clean, method, preset, n)
            b = toy_miou(planted, method, preset, n)
            c = None if circuit is None else toy_miou(circuit, method, preset, n)
        except SFPError as exc:
            rows.append(MethodRow(label, None, None, str(exc)))
            continue
        rows.append(MethodRow(label, a, b, circuit=c))
    return rows
