"""Outlier detectors for ViT patch tokens, and neighbour-mean mitigation.

Everything here is a pure function on tensors, batched over images (no hidden state; the
detector registry :data:`DETECTORS` is the only module-level table). Shapes use B images,
H heads, T = 1 + N tokens (token 0 is the class token, then N patch tokens in row-major order
on a gh x gw grid), C channels.

Detectors return an :class:`OutlierResult` (per-token scores, higher = more outlying, and a
boolean mask of the flagged patches):

- :func:`som`: the SFP self-adaptive outlier mitigator criterion on attention
  (class token attends to patch i more than i attends to itself);
- :func:`l2`: the ``top_k`` patches with the largest L2 norm;
- :func:`lof`: Local Outlier Factor, as SC-CLIP/SFP release it (``"sc-clip"``) or textbook;
- :func:`norm_z`: robust (median/MAD) z-score of the patch norms;
- :func:`dbscan`: density clustering (DBSCAN) of the patch tokens; noise points and the
  members of small clusters are the outliers.

Detectors compute half / bfloat16 inputs in float32 (fp16 norms tie often and squared
distances overflow); float32 and float64 inputs are used as they are.

:func:`detect` runs a registered detector on a recorded trace (or on a dict of tensors),
:func:`mitigate` replaces flagged patches by the mean of their unflagged grid neighbours, and
:func:`layer_statistics` / :func:`persistence` summarise detections across layers for views.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sfp.core.errors import SFPError
from sfp.core.registry import Param, Registry, RegistryError, signature_defaults

__all__ = [
    "DETECTORS",
    "Detector",
    "FlagCounts",
    "LayerStats",
    "MissingInputError",
    "MitigationReport",
    "OutlierResult",
    "available_detectors",
    "dbscan",
    "detect",
    "get_detector",
    "l2",
    "layer_statistics",
    "lof",
    "mitigate",
    "mitigate_with_report",
    "norm_z",
    "persistence",
    "register_detector",
    "som",
]

Needs = Literal["attention", "hidden"]
LofVariant = Literal["sc-clip", "standard"]

# Floor for a mean reachability distance of exactly 0 in LOF (a point with >= k exact
# duplicates). Without it the density is 1/0 = inf and inf/inf = NaN spreads into the LOF
# quantile, so nothing at all is flagged. A floor (not an additive epsilon) leaves every
# non-degenerate value bit-identical to the formula without it.
_LOF_MIN_REACH = 1e-10
# Relative floor for a MAD of exactly 0 in norm_z (more than half of the norms coincide).
_MAD_REL_FLOOR = 1e-12
# Largest tensor (elements) materialised at once when computing pairwise differences in LOF.
_LOF_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutlierResult:
    """What a detector found.

    scores: (B, N) float, higher = more outlying (meaning depends on the detector).
    mask: (B, N) bool, True where a patch token is flagged as an outlier (kept).
    candidates: (B, N) bool, the patches that passed the detector's criterion before a top-k
        cut kept some of them (``mask`` is a subset); all True for a detector without a
        criterion (``l2`` only ranks); None when the detector does not say (then ``mask``).
    """

    scores: Tensor
    mask: Tensor
    candidates: Tensor | None = None

    def __post_init__(self) -> None:
        if self.scores.ndim != 2 or self.mask.shape != self.scores.shape:
            raise ValueError(
                "OutlierResult needs scores (B, N) and mask (B, N) of the same shape, got "
                f"scores {tuple(self.scores.shape)} and mask {tuple(self.mask.shape)}"
            )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"OutlierResult.mask must be bool, got {self.mask.dtype}")
        c = self.candidates
        if c is not None and (c.shape != self.mask.shape or c.dtype != torch.bool):
            raise ValueError("OutlierResult.candidates must be (B, N) bool like mask, got "
                             f"{tuple(c.shape)} {c.dtype}")

    def passed(self) -> Tensor:
        """Patches that passed the criterion per image: (B,) long (``count()`` when the
        detector reports no candidates)."""
        return (self.mask if self.candidates is None else self.candidates).sum(dim=-1)

    def flag_counts(self, index: int = 0) -> FlagCounts:
        """How many patches passed the criterion and how many were kept, for one image."""
        return FlagCounts(passed=int(self.passed()[index]), kept=int(self.count()[index]),
                          total=int(self.mask.shape[-1]))

    def indices(self) -> list[Tensor]:
        """Flagged patch indices per image, ascending: a list of B LongTensors."""
        return [torch.nonzero(row, as_tuple=False).flatten() for row in self.mask]

    def count(self) -> Tensor:
        """Number of flagged patches per image: (B,) long."""
        return self.mask.sum(dim=-1)


@dataclass(frozen=True)
class FlagCounts:
    """Candidates and kept flags of one detector on one image (one layer).

    passed: patches that passed the criterion (all ``total`` for a detector without one);
    kept: patches flagged after the top-k cut (<= passed); total: patches N. The texts are
    the one wording every figure and widget uses.
    """

    passed: int
    kept: int
    total: int

    @property
    def none_above(self) -> bool:
        """No patch passed the criterion: nothing is an outlier here."""
        return self.passed == 0

    @property
    def text(self) -> str:
        """E.g. "10 kept of 37 above the criterion (top-k)"; see :attr:`short`."""
        if self.none_above:
            return "no outlier above the criterion"
        if self.passed >= self.total and self.kept < self.total:
            return (f"{self.kept} kept of all {self.total} (every patch passes the criterion: "
                    "top-k only)")
        if self.kept < self.passed:
            return f"{self.kept} kept of {self.passed} above the criterion (top-k)"
        return f"{self.kept} above the criterion, all kept"

    @property
    def short(self) -> str:
        """E.g. "10 of 37 pass" / "no outlier": for panel titles."""
        if self.none_above:
            return "no outlier above the criterion"
        if self.kept < self.passed:
            return f"{self.kept} kept / {self.passed} pass"
        return f"{self.kept} pass, all kept"


@dataclass(frozen=True)
class MitigationReport:
    """What :func:`mitigate_with_report` did.

    flagged: (B, N) bool, the mask it was given.
    radius: (B, N) long, the window radius used for each replaced token (1 = its 3x3
        neighbourhood, 2 = 5x5, ...); 0 for tokens that were not replaced (unflagged, or
        flagged in an image where every token is flagged).
    """

    flagged: Tensor
    radius: Tensor

    @property
    def mitigated(self) -> Tensor:
        """(B,) long: flagged tokens that were replaced."""
        return (self.radius > 0).sum(dim=-1)

    @property
    def widened(self) -> Tensor:
        """(B,) long: replaced tokens that needed a window larger than 3x3."""
        return (self.radius > 1).sum(dim=-1)

    @property
    def max_radius(self) -> Tensor:
        """(B,) long: largest window radius used (0 when nothing was replaced)."""
        return self.radius.amax(dim=-1)

    @property
    def unchanged(self) -> Tensor:
        """(B,) long: flagged tokens left as they were (only when a whole image is flagged)."""
        return (self.flagged & (self.radius == 0)).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _shape(x: Any) -> tuple[int, ...] | str:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _check_top_k(top_k: int | None, allow_none: bool) -> None:
    if top_k is None:
        if allow_none:
            return
        raise ValueError("top_k must be an int >= 1, got None")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(
            f"top_k must be an int >= 1{' or None' if allow_none else ''}, got {top_k!r}"
        )


def _head_average(attention: Tensor, cls_scale: float) -> tuple[Tensor, Tensor]:
    """Return (cls_scale * r, s), each (B, N), from attention (B, H, T, T) or (B, T, T)."""
    expected = "attention must be (B, H, T, T) or head-averaged (B, T, T) with T = 1 + N"
    if not isinstance(attention, Tensor) or attention.ndim not in (3, 4):
        raise ValueError(f"{expected}, got {_shape(attention)}")
    if attention.shape[-1] != attention.shape[-2] or attention.shape[-1] < 2:
        raise ValueError(f"{expected} (square, T >= 2), got {tuple(attention.shape)}")
    if not attention.is_floating_point():
        raise ValueError(f"attention must be a floating-point tensor, got {attention.dtype}")
    attention = _compute_dtype(attention)
    if attention.ndim == 3:
        attention = attention.unsqueeze(1)
    # Scale the cls -> patch entries per head, then average over heads, as the release does
    # (mathematically the same as cls_scale * mean; this keeps its rounding).
    scaled_r = (attention[:, :, 0, 1:] * cls_scale).mean(dim=1)
    s = torch.diagonal(attention[:, :, 1:, 1:], dim1=-2, dim2=-1).mean(dim=1)
    return scaled_r, s


def _patches(hidden: Tensor, has_cls: bool) -> Tensor:
    """Patch tokens (B, N, C) of hidden (B, T, C) (has_cls) or (B, N, C) (not has_cls)."""
    expected = (
        "hidden must be (B, T, C) with the class token first"
        if has_cls
        else "hidden must be (B, N, C) patch tokens (has_cls=False)"
    )
    if not isinstance(hidden, Tensor) or hidden.ndim != 3:
        raise ValueError(f"{expected}, got {_shape(hidden)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    patches = hidden[:, 1:] if has_cls else hidden
    if patches.shape[1] < 1:
        raise ValueError(f"{expected} and at least one patch token, got {tuple(hidden.shape)}")
    return patches


def _compute_dtype(x: Tensor) -> Tensor:
    """Half / bfloat16 -> float32; float32 / float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _top_k_mask(key: Tensor, k: int, eligible: Tensor | None = None) -> Tensor:
    """(B, N) bool: the k largest entries of key per row (ties: lower index first).

    Only ``eligible`` entries can be selected (all when None).
    """
    k = min(k, key.shape[-1])
    neg = -key if eligible is None else torch.where(eligible, -key, torch.inf)
    order = torch.sort(neg, dim=-1, stable=True).indices[:, :k]
    mask = torch.zeros_like(key, dtype=torch.bool)
    mask.scatter_(1, order, True)
    if eligible is not None:
        mask &= eligible
    return mask


def _median(x: Tensor) -> Tensor:
    """Median over the last dim, averaging the two middle values for even counts: (B,)."""
    return torch.quantile(x, 0.5, dim=-1)


# --------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------


def som(attention: Tensor, top_k: int | None = 10, cls_scale: float = 1.5) -> OutlierResult:
    """SFP's self-adaptive outlier mitigator (SOM) criterion on one layer's attention.

    attention: (B, H, T, T) per-head attention probabilities, or head-averaged (B, T, T) /
    (B, 1, T, T), T = 1 + N, token 0 = class token. With Ā the head average,
    r_i = Ā[cls, i] and s_i = Ā[i, i] for each patch i. Candidates: cls_scale * r_i > s_i.
    At most ``top_k`` candidates are kept, those with the largest cls_scale * r_i (ties: lower
    patch index first); ``top_k=None`` keeps every candidate (paper eq. 4 with cls_scale=1).
    No candidate -> empty mask.

    The release scales the cls -> patch entries of each head by cls_scale (5 x res_cls = 1.5)
    before averaging; this does the same. Returns scores (B, N) = cls_scale * r - s (> 0 exactly
    for candidates) and mask (B, N).
    """
    _check_top_k(top_k, allow_none=True)
    if not cls_scale > 0:
        raise ValueError(f"cls_scale must be > 0, got {cls_scale!r}")
    scaled_r, s = _head_average(attention, cls_scale)
    candidates = scaled_r > s
    if top_k is None:
        mask = candidates
    else:
        mask = _top_k_mask(scaled_r, top_k, eligible=candidates)
    return OutlierResult(scores=scaled_r - s, mask=mask, candidates=candidates)


def l2(hidden: Tensor, top_k: int = 10, *, has_cls: bool = True) -> OutlierResult:
    """The ``top_k`` patch tokens with the largest L2 norm.

    hidden: (B, T, C) with the class token first, or (B, N, C) with ``has_cls=False``.
    Returns scores (B, N) = L2 norms and mask (B, N) of the top_k (ties: lower index first;
    all N when top_k >= N).
    """
    _check_top_k(top_k, allow_none=False)
    norms = torch.linalg.vector_norm(_compute_dtype(_patches(hidden, has_cls)), dim=-1)
    return OutlierResult(scores=norms, mask=_top_k_mask(norms, top_k),
                         candidates=torch.ones_like(norms, dtype=torch.bool))


def _squared_distances(x: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances (B, N, N) of x (B, N, C).

    Computed as the release does (norm of the differences, squared), in row chunks so that
    memory stays bounded; the diagonal is exactly 0.
    """
    b, n, c = x.shape
    rows = max(1, _LOF_CHUNK_ELEMENTS // max(1, b * n * c))
    parts = [
        torch.linalg.vector_norm(x[:, i : i + rows, None, :] - x[:, None, :, :], dim=-1) ** 2
        for i in range(0, n, rows)
    ]
    return torch.cat(parts, dim=1)


def lof(
    hidden: Tensor,
    n_neighbors: int = 30,
    contamination: float = 0.05,
    variant: LofVariant = "sc-clip",
    *,
    has_cls: bool = True,
) -> OutlierResult:
    """Local Outlier Factor of the patch tokens.

    hidden: (B, T, C) with the class token first, or (B, N, C) with ``has_cls=False``.
    Distances are squared Euclidean. Neighbours of p: the k + 1 = n_neighbors + 1 nearest
    tokens by ``torch.topk`` (smallest) with the first one (p itself, distance 0) dropped;
    ties between equal distances are resolved however ``torch.topk`` orders them (with exact
    duplicates of p the dropped one may be a duplicate, and p stays among its neighbours).
    kdist(p) = distance to the k-th neighbour.

    - ``"sc-clip"`` (what SC-CLIP's and SFP's released code compute): the reachability of p's
      neighbours uses p's own k-distance, reach(p, o) = max(kdist(p), d(p, o)) = kdist(p);
      lrd(p) = k / mean_o reach(p, o) (the release's scale; the factor k cancels in the LOF),
      so LOF(p) = mean_o lrd(o) / lrd(p) = kdist(p) * mean_o 1 / kdist(o).
    - ``"standard"``: textbook LOF (Breunig et al. 2000), reach(p, o) = max(kdist(o), d(p, o)),
      lrd(p) = 1 / mean_o reach(p, o), LOF(p) = mean_o lrd(o) / lrd(p); equals scikit-learn's
      ``LocalOutlierFactor(metric="sqeuclidean")`` (which adds 1e-10 to the mean reach).

    A mean reach below 1e-10 (in practice exactly 0: k exact duplicates of p) is raised to
    1e-10 so the result stays finite (the release gives inf / NaN there); other values are
    untouched.
    Flagged: LOF > torch.quantile(LOF, 1 - contamination) in float32 with linear
    interpolation (for N = 196 and contamination 0.05, exactly the 10 largest when the LOF
    values are distinct). Returns scores (B, N) = LOF and mask (B, N).
    """
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be an int >= 1, got {n_neighbors!r}")
    if not 0.0 < contamination <= 0.5:
        raise ValueError(f"contamination must be in (0, 0.5], got {contamination!r}")
    if variant not in ("sc-clip", "standard"):
        raise ValueError(f"variant must be 'sc-clip' or 'standard', got {variant!r}")
    x = _compute_dtype(_patches(hidden, has_cls))
    b, n, _ = x.shape
    k = n_neighbors
    if k > n - 1:
        raise ValueError(
            f"n_neighbors={k} needs at least {k + 1} patch tokens, got N={n}; "
            f"use n_neighbors <= {n - 1}"
        )
    dist = _squared_distances(x)
    knn_dist, knn_idx = torch.topk(dist, k + 1, dim=-1, largest=False)
    knn_dist, knn_idx = knn_dist[..., 1:], knn_idx[..., 1:]  # (B, N, k)
    kdist = knn_dist[..., -1]  # (B, N)
    if variant == "sc-clip":
        reach = torch.maximum(knn_dist, kdist.unsqueeze(-1))
        lrd = k / reach.mean(dim=-1).clamp_min(_LOF_MIN_REACH)
    else:
        kdist_o = torch.gather(kdist, 1, knn_idx.reshape(b, n * k)).reshape(b, n, k)
        reach = torch.maximum(knn_dist, kdist_o)
        lrd = 1.0 / reach.mean(dim=-1).clamp_min(_LOF_MIN_REACH)
    lrd_o = torch.gather(lrd, 1, knn_idx.reshape(b, n * k)).reshape(b, n, k)
    scores = (lrd_o / lrd.unsqueeze(-1)).mean(dim=-1)
    threshold = torch.quantile(scores.float(), 1.0 - contamination, dim=-1, keepdim=True)
    mask = scores > threshold
    return OutlierResult(scores=scores, mask=mask, candidates=mask)


def norm_z(hidden: Tensor, threshold: float = 3.5, *, has_cls: bool = True) -> OutlierResult:
    """Robust z-score of the patch-token L2 norms (Iglewicz & Hoaglin's modified z-score).

    hidden: (B, T, C) with the class token first, or (B, N, C) with ``has_cls=False``.
    z = 0.6745 * (norm - median) / MAD per image, MAD = median |norm - median| (medians
    average the two middle values for even N). Flagged: z > threshold; 3.5 is Iglewicz &
    Hoaglin's recommended cut-off. Only unusually large norms are flagged. If MAD is 0 (more
    than half of the norms coincide) it is replaced by 1e-12 x median (or 1e-12 if that is 0
    too), so any token above the shared norm gets a huge z. Returns scores (B, N) = z, mask.
    """
    if not threshold == threshold:  # NaN
        raise ValueError("threshold must be a number, got NaN")
    norms = torch.linalg.vector_norm(_compute_dtype(_patches(hidden, has_cls)), dim=-1)
    median = _median(norms).unsqueeze(-1)
    mad = _median((norms - median).abs()).unsqueeze(-1)
    floor = (median.abs() * _MAD_REL_FLOOR).clamp_min(_MAD_REL_FLOOR)
    mad = torch.where(mad > 0, mad, floor)
    z = 0.6745 * (norms - median) / mad
    mask = z > threshold
    return OutlierResult(scores=z, mask=mask, candidates=mask)


DbscanMetric = Literal["cosine", "euclidean"]
DbscanFlag = Literal["noise", "small"]


def _components(adj: Tensor) -> Tensor:
    """Connected components of a symmetric (N, N) bool graph: (N,) long, each node labelled by
    the smallest index in its component (min-label propagation until stable)."""
    n = adj.shape[0]
    lab = torch.arange(n, device=adj.device)
    big = torch.full((n, n), n, device=adj.device, dtype=torch.long)
    while True:
        new = torch.minimum(lab, torch.where(adj, lab.expand(n, n), big).min(dim=1).values)
        if torch.equal(new, lab):
            return lab
        lab = new


def dbscan(
    hidden: Tensor,
    eps: float = 2.0,
    min_samples: int = 4,
    metric: DbscanMetric = "euclidean",
    flag: DbscanFlag = "small",
    max_cluster: float = 0.1,
    *,
    has_cls: bool = True,
) -> OutlierResult:
    """DBSCAN (Ester et al. 1996) on the patch tokens of one layer; outliers from its clusters.

    hidden: (B, T, C) with the class token first, or (B, N, C) with ``has_cls=False``.
    Per image: distances d(i, j) between patch tokens (``"euclidean"``; ``"cosine"``:
    1 - cosine similarity); the radius is ``eps`` times the median over patches of the
    distance to the ``min_samples``-th nearest token (itself included), so it adapts to the
    layer's scale and ``eps > 1`` makes most tokens core points. Patch i is a core
    point when at least ``min_samples`` tokens (itself included) lie within ``eps`` of it;
    clusters are the connected components of core points within ``eps`` of each other; a
    non-core point within ``eps`` of a core point joins the cluster of its nearest core point
    (scikit-learn gives such a border point to the first core point that reaches it, so the two
    can differ there); the rest are noise.

    Flagged (``flag``): ``"noise"``: the noise points; ``"small"`` (default): the noise points
    and every cluster of at most ``max_cluster * N`` tokens other than the largest cluster
    (high-norm outlier tokens resemble each other and form such a small cluster). On the
    planted model (:mod:`sfp.models.synthetic`) the defaults flag exactly the planted tokens
    from the onset layer on and nothing before it; with ``"cosine"`` distances the bounded
    range lets the radius join outliers to ordinary tokens at these defaults. Returns
    scores (B, N) = 1 - (size of the token's cluster) / N (1 for noise) and mask (B, N).
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise ValueError(f"min_samples must be an int >= 1, got {min_samples!r}")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    if flag not in ("noise", "small"):
        raise ValueError(f"flag must be 'noise' or 'small', got {flag!r}")
    if not 0.0 <= max_cluster <= 1.0:
        raise ValueError(f"max_cluster must be in [0, 1], got {max_cluster!r}")
    x = _compute_dtype(_patches(hidden, has_cls))
    b, n, _ = x.shape
    scores = torch.ones(b, n, dtype=x.dtype, device=x.device)
    mask = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    off_diag = ~torch.eye(n, dtype=torch.bool, device=x.device)
    for bi in range(b):
        if metric == "cosine":
            u = F.normalize(x[bi], dim=-1)
            d = (1.0 - u @ u.T).clamp_min(0.0)
        else:
            d = torch.cdist(x[bi][None], x[bi][None])[0]
        d = d.masked_fill(~off_diag, 0.0)
        kth = min(min_samples, n) - 1  # the min_samples-th nearest token, itself included
        scale = torch.sort(d, dim=1).values[:, kth].median()
        near = d <= eps * scale if scale > 0 else d <= 0
        core = near.sum(dim=1) >= min_samples
        comp = _components(near & core[:, None] & core[None, :])
        # border points: the cluster of the nearest core point within eps
        dc = torch.where(near & core[None, :], d, torch.inf)
        nearest = dc.argmin(dim=1)
        reached = torch.isfinite(dc.min(dim=1).values)
        label = torch.where(core, comp, torch.where(reached, comp[nearest], -1))
        clustered = label >= 0
        sizes = torch.bincount(label[clustered], minlength=n)
        size_of = torch.where(clustered, sizes[label.clamp_min(0)], 0)
        scores[bi] = 1.0 - size_of.to(x.dtype) / n
        flagged = ~clustered
        if flag == "small" and clustered.any():
            largest = int(sizes.argmax())
            flagged |= clustered & (size_of <= max_cluster * n) & (label != largest)
        mask[bi] = flagged
    return OutlierResult(scores=scores, mask=mask)


# --------------------------------------------------------------------------------------------
# Registry and dispatch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detector:
    """A registered detector: ``fn(x, **params) -> OutlierResult`` on one layer's ``needs``
    input (attention (B, H, T, T) or hidden (B, T, C)).

    display: label in figures and widgets. params: its tunable parameters, defaults taken from
    ``fn``'s signature (the one place they are written), ranges for sliders.
    """

    name: str
    fn: Callable[..., OutlierResult]
    needs: Needs
    display: str = ""
    doc: str = ""
    params: tuple[Param, ...] = ()

    def __call__(self, x: Tensor, **params: Any) -> OutlierResult:
        return self.fn(x, **params)

    def defaults(self) -> dict[str, Any]:
        """``{parameter: default}``, e.g. ``{"top_k": 10, "cls_scale": 1.5}`` for som."""
        return {p.name: p.default for p in self.params}


class MissingInputError(SFPError, ValueError):
    """A detector's input (attention or hidden states) was not recorded."""


#: Every detector by name (value: :class:`Detector`).
DETECTORS: Registry[Detector] = Registry("detector")


def register_detector(
    name: str,
    fn: Callable[..., OutlierResult],
    needs: Needs = "hidden",
    overwrite: bool = False,
    *,
    display: str | None = None,
    doc: str = "",
    ranges: Mapping[str, Mapping[str, Any]] | None = None,
) -> Detector:
    """Register ``fn(x, **params) -> OutlierResult`` under ``name``.

    needs: "attention" (fn gets (B, H, T, T)) or "hidden" (fn gets (B, T, C), class token
    first). ranges: ``{param: {"low": .., "high": .., "step": ..}}`` or ``{"choices": (..)}``
    for the widgets' controls; defaults come from ``fn``'s signature. Re-registering a name
    raises RegistryError unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise RegistryError(f"detector name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise RegistryError(f"detector {name!r}: fn must be callable, got {type(fn).__name__}")
    if needs not in ("attention", "hidden"):
        raise RegistryError(
            f"detector {name!r}: needs must be 'attention' or 'hidden', got {needs!r}"
        )
    ranges = dict(ranges or {})
    params = tuple(
        Param(p, default, **ranges.get(p, {}))
        for p, default in signature_defaults(fn).items() if p != "has_cls"
    )
    detector = Detector(name=name, fn=fn, needs=needs, display=display or name, doc=doc,
                        params=params)
    DETECTORS.register(name, detector, display=detector.display, doc=doc, params=params,
                       overwrite=overwrite, needs=needs)
    return detector


def available_detectors() -> list[str]:
    """Names of the registered detectors, in registration order."""
    return list(DETECTORS.names())


def get_detector(name: str) -> Detector:
    """The registered :class:`Detector` called ``name``; RegistryError (with suggestions)."""
    return DETECTORS.get(name).value


register_detector(
    "som", som, needs="attention", display="SOM",
    doc="SFP's criterion: cls_scale * A[cls, i] > A[i, i], top-k by class-token attention",
    ranges={"top_k": {"low": 1, "high": 50, "step": 1},
            "cls_scale": {"low": 0.1, "high": 5.0, "step": 0.05}},
)
register_detector(
    "l2", l2, needs="hidden", display="L2 norm", doc="the top-k patch tokens by L2 norm",
    ranges={"top_k": {"low": 1, "high": 50, "step": 1}},
)
register_detector(
    "lof", lof, needs="hidden", display="LOF",
    doc="Local Outlier Factor of the patch tokens (SC-CLIP's variant or textbook)",
    ranges={"n_neighbors": {"low": 1, "high": 60, "step": 1},
            "contamination": {"low": 0.01, "high": 0.5, "step": 0.01},
            "variant": {"choices": ("sc-clip", "standard")}},
)
register_detector(
    "norm_z", norm_z, needs="hidden", display="norm z-score",
    doc="robust (median/MAD) z-score of the patch-token norms above a threshold",
    ranges={"threshold": {"low": 0.0, "high": 20.0, "step": 0.1}},
)
register_detector(
    "dbscan", dbscan, needs="hidden", display="DBSCAN",
    doc="density clustering of the patch tokens: noise points and small clusters are outliers",
    ranges={"eps": {"low": 0.1, "high": 6.0, "step": 0.1},
            "min_samples": {"low": 1, "high": 30, "step": 1},
            "metric": {"choices": ("cosine", "euclidean")},
            "flag": {"choices": ("small", "noise")},
            "max_cluster": {"low": 0.0, "high": 0.5, "step": 0.01}},
)


def _fetch(source: Any, needs: Needs, layer: int | None, detector: str) -> Tensor:
    """One layer's ``needs`` tensor from a Trace-like object or a Mapping."""
    how = f'record it with record(..., store=("{needs}",))'
    if isinstance(source, Mapping):
        value = source.get(needs)
        if value is None:
            raise MissingInputError(
                f"detector {detector!r} needs {needs!r}, but the mapping has only "
                f"{sorted(map(str, source))}; pass {{'{needs}': tensor}} or {how}"
            )
        return value
    getter = getattr(source, needs, None)
    if not callable(getter):
        raise TypeError(
            "source must be a Trace-like object with attention(layer) / hidden(layer) methods "
            f"or a Mapping with 'attention' / 'hidden' tensors, got {type(source).__name__}"
        )
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 1:
        raise ValueError(f"layer must be a 1-indexed int when source is a trace, got {layer!r}")
    layer = int(layer)
    try:
        value = getter(layer)
    except (LookupError, ValueError) as err:
        raise MissingInputError(
            f"detector {detector!r} needs the {needs} of layer {layer}, which the trace "
            f"could not give ({err}); {how}"
        ) from err
    if value is None:
        raise MissingInputError(
            f"detector {detector!r} needs the {needs} of layer {layer}, which the trace did "
            f"not record; {how}"
        )
    return value


def detect(method: str, source: Any, layer: int | None = None, **params: Any) -> OutlierResult:
    """Run the registered detector ``method`` on one layer.

    source: a Trace-like object with ``attention(l) -> (B, H, T, T)`` and
    ``hidden(l) -> (B, T, C)`` (1-indexed ``layer``), or a Mapping with "attention" and/or
    "hidden" tensors of a single layer (``layer`` is then ignored and may be None).
    params: passed to the detector (e.g. ``top_k=10``).
    """
    detector = get_detector(method)
    return detector(_fetch(source, detector.needs, layer, detector.name), **params)


# --------------------------------------------------------------------------------------------
# Mitigation
# --------------------------------------------------------------------------------------------


def _check_grid(tokens: Tensor, grid: Sequence[int], mask: Tensor) -> tuple[int, int]:
    if not isinstance(tokens, Tensor) or tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, N, C) patch tokens, got {_shape(tokens)}")
    if len(grid) != 2 or any(isinstance(g, bool) or int(g) != g or g < 1 for g in grid):
        raise ValueError(f"grid must be (gh, gw) with positive ints, got {grid!r}")
    gh, gw = int(grid[0]), int(grid[1])
    b, n, _ = tokens.shape
    if gh * gw != n:
        raise ValueError(f"grid {gh}x{gw} = {gh * gw} tokens, but tokens (B, N, C) has N = {n}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (b, n):
        raise ValueError(
            f"mask must be (B, N) = ({b}, {n}) bool, got {_shape(mask)}"
            + (f" {mask.dtype}" if isinstance(mask, Tensor) else "")
        )
    return gh, gw


def mitigate_with_report(
    tokens: Tensor, grid: Sequence[int], mask: Tensor
) -> tuple[Tensor, MitigationReport]:
    """:func:`mitigate`, plus a :class:`MitigationReport` of what it did."""
    gh, gw = _check_grid(tokens, grid, mask)
    b, n, c = tokens.shape
    if n == 0 or c == 0 or not bool(mask.any()):
        return tokens.clone(), MitigationReport(
            flagged=mask.clone(), radius=torch.zeros(b, n, dtype=torch.long, device=tokens.device)
        )
    keep = ~mask
    fmap = tokens.transpose(1, 2).reshape(b, c, gh, gw)
    valid = keep.reshape(b, 1, gh, gw).to(tokens.dtype)
    # Sum and count of the unflagged tokens among the 8 neighbours: a 3x3 depthwise kernel
    # with a zero centre over the zero-padded map (the same arithmetic as the release).
    kernel = torch.ones(c, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    kernel[:, :, 1, 1] = 0
    nsum = F.conv2d(F.pad(fmap * valid, (1, 1, 1, 1)), kernel, groups=c)
    ncount = F.conv2d(F.pad(valid, (1, 1, 1, 1)), kernel[:1])
    mean = (nsum / ncount.clamp_min(1)).reshape(b, c, n).transpose(1, 2)
    has_nb = (ncount > 0).reshape(b, n)
    replace = mask & has_nb
    out = torch.where(replace.unsqueeze(-1), mean, tokens)
    radius = replace.long()

    # Rare fallback: flagged tokens with no unflagged 8-neighbour get the mean of the unflagged
    # tokens in the smallest larger square window (5x5, 7x7, ...) that holds one. Images whose
    # tokens are all flagged are left unchanged.
    has_any = keep.any(dim=-1)
    leftover = mask & ~has_nb & has_any.unsqueeze(-1)
    if bool(leftover.any()):
        grid_tokens = tokens.reshape(b, gh, gw, c)
        grid_keep = keep.reshape(b, gh, gw)
        for bi, idx in torch.nonzero(leftover, as_tuple=False).tolist():
            y, x = divmod(idx, gw)
            for r in range(2, max(gh, gw)):
                rows = slice(max(0, y - r), min(gh, y + r + 1))
                cols = slice(max(0, x - r), min(gw, x + r + 1))
                window_keep = grid_keep[bi, rows, cols]
                count = int(window_keep.sum())
                if count:
                    picked = grid_tokens[bi, rows, cols][window_keep]
                    out[bi, idx] = picked.sum(dim=0) / count
                    radius[bi, idx] = r
                    break
    return out, MitigationReport(flagged=mask.clone(), radius=radius)


def mitigate(tokens: Tensor, grid: Sequence[int], mask: Tensor) -> Tensor:
    """Replace each flagged patch token by the mean of its unflagged grid neighbours.

    tokens: (B, N, C) patch tokens (no class token), row-major on grid = (gh, gw), N = gh * gw.
    mask: (B, N) bool, True = flagged. Each flagged token becomes the mean of the (up to 8)
    tokens of its 3x3 neighbourhood that lie inside the grid and are not flagged, all taken
    from the input (not updated one after another). If there is none, the window grows to
    5x5, 7x7, ... until it holds an unflagged token. If every token of an image is flagged,
    that image is returned unchanged. Unflagged tokens are returned bit-identical.
    Returns (B, N, C).
    """
    return mitigate_with_report(tokens, grid, mask)[0]


# --------------------------------------------------------------------------------------------
# Across layers
# --------------------------------------------------------------------------------------------


def _persistence_matrix(masks: Tensor) -> Tensor:
    """(L, L) float from masks (L, B, N); see :func:`persistence`."""
    m = masks.to(torch.float64)
    inter = torch.einsum("lbn,mbn->lmb", m, m)  # |F_l ∩ F_m| per image
    size = m.sum(dim=-1)  # (L, B) |F_l|
    frac = inter / size.unsqueeze(1)  # NaN where F_l is empty (0 / 0)
    frac = torch.where(size.unsqueeze(1) > 0, frac, torch.nan)
    defined = ~torch.isnan(frac)
    total = torch.where(defined, frac, 0.0).sum(dim=-1)
    count = defined.sum(dim=-1)
    out = torch.where(count > 0, total / count.clamp_min(1), torch.nan)
    upper = torch.ones_like(out, dtype=torch.bool).triu(diagonal=1)
    return torch.where(upper, out, torch.nan)


def persistence(masks_by_layer: Mapping[int, Tensor]) -> dict[int, dict[int, float]]:
    """How long flagged tokens stay flagged in later layers.

    masks_by_layer: {layer: (B, N) bool} for one detector. For layers l < m and each image,
    the fraction |F_l ∩ F_m| / |F_l| of the tokens flagged at l that are still flagged at m
    (undefined when F_l is empty); the result averages it over the images where it is defined
    (NaN if none). Returns {l: {m: fraction}} for every pair l < m of the given layers.
    """
    layers = sorted(masks_by_layer)
    if not layers:
        return {}
    stacked = torch.stack([masks_by_layer[l].bool() for l in layers])
    if stacked.ndim != 3:
        raise ValueError(f"each mask must be (B, N), got {tuple(stacked.shape[1:])}")
    matrix = _persistence_matrix(stacked)
    return {
        l: {m: float(matrix[i, j]) for j, m in enumerate(layers) if j > i}
        for i, l in enumerate(layers)
    }


@dataclass(frozen=True)
class LayerStats:
    """Per-layer outlier statistics (see :func:`layer_statistics`).

    layers: the L layers, ascending. max_norm, median_norm: (L, B) patch-token L2 norms.
    counts: {detector: (L, B) long} kept flags. masks: {detector: (L, B, N) bool}.
    scores: {detector: (L, B, N) float}. passed: {detector: (L, B) long} patches that passed
    the criterion before the top-k cut (:meth:`OutlierResult.passed`).
    """

    layers: list[int]
    max_norm: Tensor
    median_norm: Tensor
    counts: dict[str, Tensor]
    masks: dict[str, Tensor]
    scores: dict[str, Tensor]
    passed: dict[str, Tensor] = field(default_factory=dict)

    def flag_counts(self, detector: str, layer: int, index: int = 0) -> FlagCounts:
        """Candidates and kept flags of ``detector`` at ``layer`` for image ``index``."""
        i = self.layers.index(layer)
        kept = int(self.counts[detector][i, index])
        passed = int(self.passed[detector][i, index]) if detector in self.passed else kept
        return FlagCounts(passed=passed, kept=kept, total=int(self.masks[detector].shape[-1]))

    def persistence(self, detector: str) -> Tensor:
        """(L, L) float: entry [i, j] (j > i) is the batch-averaged fraction of the tokens
        flagged at layers[i] still flagged at layers[j] (see :func:`persistence`); NaN on and
        below the diagonal and where undefined."""
        if detector not in self.masks:
            raise ValueError(f"no masks for detector {detector!r}; have {sorted(self.masks)}")
        return _persistence_matrix(self.masks[detector])


def layer_statistics(
    source: Any,
    layers: Iterable[int],
    detectors: Sequence[str] = ("som", "l2", "lof", "norm_z"),
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> LayerStats:
    """Run detectors and norm statistics over several layers of a trace.

    source: Trace-like object with ``attention(l)`` / ``hidden(l)`` (1-indexed layers).
    layers: the layers to analyse (duplicates dropped, sorted ascending).
    params: optional {detector: {param: value}} passed to each detector.
    Norms are of the patch tokens of ``hidden(l)`` (class token excluded); medians average
    the two middle values for even N.
    """
    if isinstance(source, Mapping):
        raise TypeError(
            "layer_statistics needs a Trace-like source with attention(l) / hidden(l); "
            "a Mapping holds a single layer (use detect() for that)"
        )
    layer_list = sorted(set(layers))
    if not layer_list:
        raise ValueError("layers must name at least one layer")
    params = dict(params or {})
    unknown = set(params) - set(detectors)
    if unknown:
        raise ValueError(f"params given for detectors not in detectors: {sorted(unknown)}")
    specs = [get_detector(name) for name in detectors]
    max_norm, median_norm = [], []
    masks: dict[str, list[Tensor]] = {d.name: [] for d in specs}
    scores: dict[str, list[Tensor]] = {d.name: [] for d in specs}
    passed: dict[str, list[Tensor]] = {d.name: [] for d in specs}
    for layer in layer_list:
        hidden = _fetch(source, "hidden", layer, "layer_statistics")
        norms = torch.linalg.vector_norm(_compute_dtype(_patches(hidden, True)), dim=-1)
        max_norm.append(norms.amax(dim=-1))
        median_norm.append(_median(norms))
        inputs: dict[str, Tensor] = {"hidden": hidden}
        for spec in specs:
            if spec.needs not in inputs:
                inputs[spec.needs] = _fetch(source, spec.needs, layer, spec.name)
            result = spec(inputs[spec.needs], **dict(params.get(spec.name, {})))
            masks[spec.name].append(result.mask)
            scores[spec.name].append(result.scores)
            passed[spec.name].append(result.passed())
    stacked_masks = {name: torch.stack(m) for name, m in masks.items()}
    return LayerStats(
        layers=layer_list,
        max_norm=torch.stack(max_norm),
        median_norm=torch.stack(median_norm),
        counts={name: m.sum(dim=-1) for name, m in stacked_masks.items()},
        masks=stacked_masks,
        scores={name: torch.stack(s) for name, s in scores.items()},
        passed={name: torch.stack(p) for name, p in passed.items()},
    )
