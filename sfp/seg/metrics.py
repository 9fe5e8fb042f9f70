"""Semantic-segmentation metrics, defined exactly as mmsegmentation's ``IoUMetric``.

Everything is built on a confusion matrix ``M`` of shape ``(C, C)`` (rows = ground truth,
columns = prediction) accumulated over the whole dataset; pixels whose ground truth equals
``ignore_index`` are dropped first. With ``I = diag(M)``, ``G = M.sum(1)`` (ground-truth area)
and ``P = M.sum(0)`` (predicted area):

* ``iou[c] = I[c] / (G[c] + P[c] - I[c])`` -- NaN when the class is in neither prediction nor
  ground truth (union 0); such classes are left out of ``miou = nanmean(iou)``;
* ``acc[c] = I[c] / G[c]`` -- NaN when the class is absent from the ground truth;
* ``aacc = I.sum() / G.sum()`` (overall pixel accuracy), ``macc = nanmean(acc)``.

Values are stored as fractions in ``[0, 1]``; :meth:`SegMetrics.to_dict` and
:meth:`SegMetrics.table` report percent, like mmseg's logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ConfusionAccumulator", "SegMetrics", "confusion_matrix"]


def _to_numpy(x: Any, what: str) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor or array-like) as a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class labels, got dtype {arr.dtype}")
    return arr


def _describe_bad(values: np.ndarray, num_classes: int) -> str:
    bad = np.unique(values)
    shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
    return f"{values.size} pixel(s) with value(s) {shown}; valid labels are 0..{num_classes - 1}"


def confusion_matrix(
    pred: Any, gt: Any, num_classes: int, ignore_index: int | None = 255
) -> np.ndarray:
    """Confusion matrix of one prediction against its ground truth.

    Args:
        pred: predicted labels, any shape ``S`` (e.g. ``(H, W)``), integer values in
            ``[0, num_classes)`` wherever ``gt`` is not ignored. numpy array or torch tensor.
        gt: ground-truth labels, same shape ``S``; values in ``[0, num_classes)`` or
            ``ignore_index``.
        num_classes: ``C``.
        ignore_index: ground-truth value whose pixels are dropped (``None``: drop nothing).

    Returns:
        ``(C, C)`` int64 array; entry ``[g, p]`` counts pixels of ground-truth class ``g``
        predicted as ``p``.

    Raises:
        ValueError: on a shape mismatch, non-integer input, or a label outside ``[0, C)``
            at a non-ignored pixel (predictions at ignored pixels are not checked).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    p = _to_numpy(pred, "pred")
    g = _to_numpy(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(
            f"pred and gt must have the same shape, got pred {tuple(p.shape)} and "
            f"gt {tuple(g.shape)} (resize the prediction to the label's resolution first)"
        )
    p = p.reshape(-1).astype(np.int64, copy=False)
    g = g.reshape(-1).astype(np.int64, copy=False)
    if ignore_index is not None:
        keep = g != ignore_index
        p, g = p[keep], g[keep]
    bad_g = (g < 0) | (g >= num_classes)
    if bad_g.any():
        ignore_txt = f" (ignore_index is {ignore_index})" if ignore_index is not None else ""
        raise ValueError(
            f"gt has labels outside [0, {num_classes}){ignore_txt}: "
            f"{_describe_bad(g[bad_g], num_classes)}"
        )
    bad_p = (p < 0) | (p >= num_classes)
    if bad_p.any():
        raise ValueError(
            f"pred has labels outside [0, {num_classes}) at non-ignored pixels: "
            f"{_describe_bad(p[bad_p], num_classes)}"
        )
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _nanmean(x: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else math.nan


def _pct(x: float, decimals: int | None) -> float | None:
    """Fraction -> percent (rounded to ``decimals`` when not None); NaN -> None."""
    if math.isnan(x):
        return None
    v = float(x) * 100.0
    return round(v, decimals) if decimals is not None else v


@dataclass(frozen=True, eq=False)
class SegMetrics:
    """Dataset-level segmentation scores (fractions in ``[0, 1]``).

    Attributes:
        iou: ``(C,)`` per-class IoU, NaN where the class is in neither prediction nor gt.
        acc: ``(C,)`` per-class accuracy (recall), NaN where the class is absent from gt.
        miou: nanmean of ``iou``.
        aacc: overall pixel accuracy over non-ignored pixels (NaN if there are none).
        macc: nanmean of ``acc``.
        class_names: ``C`` names, in label order.
        num_pixels: number of non-ignored pixels counted.
    """

    iou: np.ndarray
    acc: np.ndarray
    miou: float
    aacc: float
    macc: float
    class_names: tuple[str, ...]
    num_pixels: int
    matrix: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_confusion(
        cls, matrix: np.ndarray, class_names: Sequence[str] | None = None
    ) -> SegMetrics:
        """Scores from a ``(C, C)`` confusion matrix (rows = gt, cols = prediction)."""
        m = np.asarray(matrix, dtype=np.int64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"confusion matrix must be square (C, C), got {m.shape}")
        c = m.shape[0]
        names = tuple(str(i) for i in range(c)) if class_names is None else tuple(class_names)
        if len(names) != c:
            raise ValueError(f"got {len(names)} class names for {c} classes")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"class names must be unique, duplicated: {dup}")
        inter = np.diag(m).astype(np.float64)
        area_gt = m.sum(axis=1).astype(np.float64)
        area_pred = m.sum(axis=0).astype(np.float64)
        union = area_gt + area_pred - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, np.nan)
            acc = np.where(area_gt > 0, inter / area_gt, np.nan)
        total = float(area_gt.sum())
        aacc = float(inter.sum()) / total if total > 0 else math.nan
        return cls(
            iou=iou,
            acc=acc,
            miou=_nanmean(iou),
            aacc=aacc,
            macc=_nanmean(acc),
            class_names=names,
            num_pixels=int(total),
            matrix=m.copy(),
        )

    @property
    def num_classes(self) -> int:
        """``C``."""
        return int(self.iou.shape[0])

    def to_dict(self, decimals: int | None = 2) -> dict[str, Any]:
        """JSON-friendly summary in **percent** (NaN -> None), rounded like mmseg's logs.

        Keys: ``mIoU``, ``aAcc``, ``mAcc``, ``num_pixels``, ``units`` (= "percent") and
        ``per_class`` = ``{name: {"IoU": ..., "Acc": ...}}`` in label order.
        """
        return {
            "mIoU": _pct(self.miou, decimals),
            "aAcc": _pct(self.aacc, decimals),
            "mAcc": _pct(self.macc, decimals),
            "num_pixels": self.num_pixels,
            "units": "percent",
            "per_class": {
                name: {"IoU": _pct(float(i), decimals), "Acc": _pct(float(a), decimals)}
                for name, i, a in zip(self.class_names, self.iou, self.acc, strict=True)
            },
        }

    def table(self) -> str:
        """Aligned per-class table (IoU / Acc in percent, 2 decimals) plus a summary line."""
        width = max([len("Class")] + [len(n) for n in self.class_names])

        def fmt(x: float) -> str:
            return f"{'nan' if math.isnan(x) else f'{x * 100:.2f}':>8}"

        head = f"{'Class':<{width}} | {'IoU (%)':>8} | {'Acc (%)':>8}"
        rule = "-" * len(head)
        rows = [
            f"{n:<{width}} | {fmt(float(i))} | {fmt(float(a))}"
            for n, i, a in zip(self.class_names, self.iou, self.acc, strict=True)
        ]
        summary = (
            f"aAcc {fmt(self.aacc).strip()} | mIoU {fmt(self.miou).strip()} | "
            f"mAcc {fmt(self.macc).strip()}  (percent; {self.num_pixels} pixels)"
        )
        return "\n".join([head, rule, *rows, rule, summary])

    def __str__(self) -> str:
        return self.table()


class ConfusionAccumulator:
    """Running ``(C, C)`` int64 confusion matrix over many images (rows = gt, cols = pred)."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self._matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.num_images = 0

    @property
    def matrix(self) -> np.ndarray:
        """The accumulated ``(C, C)`` int64 matrix (a read-only view)."""
        view = self._matrix.view()
        view.flags.writeable = False
        return view

    def update(self, pred: Any, gt: Any) -> ConfusionAccumulator:
        """Add one image (or a batch: any equal shapes); returns ``self``."""
        self._matrix += confusion_matrix(pred, gt, self.num_classes, self.ignore_index)
        self.num_images += 1
        return self

    def reset(self) -> None:
        """Zero the matrix and the image count."""
        self._matrix[:] = 0
        self.num_images = 0

    def _check_compatible(self, other: object) -> ConfusionAccumulator:
        if not isinstance(other, ConfusionAccumulator):
            raise TypeError(f"cannot merge ConfusionAccumulator with {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                "cannot merge accumulators with different settings: "
                f"(num_classes={self.num_classes}, ignore_index={self.ignore_index}) vs "
                f"(num_classes={other.num_classes}, ignore_index={other.ignore_index})"
            )
        return other

    def merge(self, other: ConfusionAccumulator) -> ConfusionAccumulator:
        """Add ``other``'s counts into ``self`` (in place); returns ``self``."""
        other = self._check_compatible(other)
        self._matrix += other._matrix
        self.num_images += other.num_images
        return self

    def copy(self) -> ConfusionAccumulator:
        """An independent copy."""
        out = ConfusionAccumulator(self.num_classes, self.ignore_index)
        return out.merge(self)

    def __add__(self, other: ConfusionAccumulator) -> ConfusionAccumulator:
        return self.copy().merge(other)

    def __iadd__(self, other: ConfusionAccumulator) -> ConfusionAccumulator:
        return self.merge(other)

    def summary(self, class_names: Sequence[str] | None = None) -> SegMetrics:
        """Scores of everything accumulated so far."""
        return SegMetrics.from_confusion(self._matrix, class_names)

    def __repr__(self) -> str:
        return (
            f"ConfusionAccumulator(num_classes={self.num_classes}, "
            f"ignore_index={self.ignore_index}, num_images={self.num_images}, "
            f"num_pixels={int(self._matrix.sum())})"
        )
