"""Tests for sfp.core.outliers: detectors, registry/dispatch, mitigation, layer statistics.

Expected numbers come from hand calculations (written out in comments), scikit-learn, or
planted outliers; none are read back from the implementation.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from sfp.core.outliers import (
    LayerStats,
    MissingInputError,
    OutlierResult,
    available_detectors,
    detect,
    get_detector,
    l2,
    layer_statistics,
    lof,
    mitigate,
    mitigate_with_report,
    norm_z,
    persistence,
    register_detector,
    som,
)


def _as_set(result: OutlierResult, b: int = 0) -> set[int]:
    return set(result.indices()[b].tolist())


# --------------------------------------------------------------------------------------------
# OutlierResult
# --------------------------------------------------------------------------------------------


def test_outlier_result_indices_and_count():
    mask = torch.tensor([[False, True, False, True], [False, False, False, False]])
    res = OutlierResult(scores=torch.zeros(2, 4), mask=mask)
    idx = res.indices()
    assert [t.tolist() for t in idx] == [[1, 3], []]
    assert all(t.dtype == torch.long for t in idx)
    assert res.count().tolist() == [2, 0]


def test_outlier_result_validates():
    with pytest.raises(ValueError, match="same shape"):
        OutlierResult(scores=torch.zeros(2, 4), mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        OutlierResult(scores=torch.zeros(2, 4), mask=torch.zeros(2, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        OutlierResult(scores=torch.zeros(1, 1), mask=torch.zeros(1, 1, dtype=torch.bool)).mask = 1


# --------------------------------------------------------------------------------------------
# SOM
# --------------------------------------------------------------------------------------------

# Head-averaged values for N = 6 patches (T = 7):
#   r = A[cls, i]   = [0.15, 0.30, 0.05, 0.20, 0.20, 0.02]
#   s = A[i, i]     = [0.20, 0.10, 0.10, 0.10, 0.25, 0.50]
# cls_scale = 1.5: 1.5 r = [0.225, 0.45, 0.075, 0.30, 0.30, 0.03]
#   1.5 r > s  ->  patches 0, 1, 3, 4      (0.225 > 0.20, 0.45 > 0.10, 0.30 > 0.10, 0.30 > 0.25)
# cls_scale = 1.0:  r > s -> patches 1, 3  (0.15 < 0.20, 0.20 < 0.25)
# Ranking by r among the 1.5-candidates: 1 (0.30), then 3 and 4 tied (0.20) -> 3 first.
R = [0.15, 0.30, 0.05, 0.20, 0.20, 0.02]
S = [0.20, 0.10, 0.10, 0.10, 0.25, 0.50]


def _attention(r, s, heads: int = 2) -> torch.Tensor:
    """(1, heads, T, T) attention whose head average has the given cls row r and diagonal s.

    Heads differ (+-delta) so that averaging matters; patches 3 and 4 get identical head
    values so their tie is exact.
    """
    n = len(r)
    a = torch.full((1, heads, n + 1, n + 1), 0.01, dtype=torch.float64)
    delta = torch.tensor([0.01, -0.02, 0.01, 0.0, 0.0, 0.005], dtype=torch.float64)[:n]
    r, s = torch.tensor(r, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    signs = [1.0, -1.0] if heads == 2 else [0.0] * heads
    for h in range(heads):
        a[0, h, 0, 1:] = r + signs[h] * delta
        a[0, h, 1:, 1:].diagonal().copy_(s - signs[h] * delta)
    return a


def test_som_hand_example_candidates_and_scores():
    a = _attention(R, S)
    res = som(a, top_k=None, cls_scale=1.5)
    assert _as_set(res) == {0, 1, 3, 4}
    expected = 1.5 * torch.tensor(R, dtype=torch.float64) - torch.tensor(S, dtype=torch.float64)
    torch.testing.assert_close(res.scores[0], expected)
    # default top_k=10 keeps all 4 candidates
    assert _as_set(som(a)) == {0, 1, 3, 4}


def test_som_cls_scale_effect():
    a = _attention(R, S)
    assert _as_set(som(a, top_k=None, cls_scale=1.0)) == {1, 3}
    assert _as_set(som(a, top_k=None, cls_scale=1.5)) == {0, 1, 3, 4}
    # a large enough factor makes every patch a candidate (max s / r = 0.5 / 0.02 = 25)
    assert _as_set(som(a, top_k=None, cls_scale=26.0)) == set(range(6))


def test_som_top_k_truncation_and_ties():
    a = _attention(R, S)
    assert _as_set(som(a, top_k=1)) == {1}
    assert _as_set(som(a, top_k=2)) == {1, 3}  # 3 and 4 tie on r: lower index wins
    assert _as_set(som(a, top_k=3)) == {1, 3, 4}
    assert _as_set(som(a, top_k=4)) == {0, 1, 3, 4}
    # all patches tied on r and all candidates: top_k picks the lowest indices
    tied = torch.full((1, 7, 7), 0.1)
    tied[0, 0, 1:] = 0.3  # head-averaged input, every r equal and every patch a candidate
    assert _as_set(som(tied, top_k=2)) == {0, 1}


def test_som_empty_when_no_candidates():
    a = _attention([0.01] * 6, [0.5] * 6)
    res = som(a)
    assert res.count().tolist() == [0]
    assert res.indices()[0].numel() == 0
    assert bool((res.scores < 0).all())


def test_som_accepts_head_averaged_inputs():
    a = _attention(R, S)
    for variant in (a.mean(dim=1), a.mean(dim=1, keepdim=True)):
        assert _as_set(som(variant, top_k=2)) == {1, 3}
        assert _as_set(som(variant, top_k=None)) == {0, 1, 3, 4}


def test_som_batch_matches_loop_reference():
    torch.manual_seed(0)
    b, h, n = 3, 4, 49
    att = torch.softmax(torch.randn(b, h, n + 1, n + 1) * 2, dim=-1)
    res = som(att, top_k=5, cls_scale=1.5)
    for i in range(b):
        avg = att[i].double().mean(dim=0)
        r, s = avg[0, 1:].tolist(), avg.diagonal()[1:].tolist()
        cands = [j for j in range(n) if 1.5 * r[j] > s[j]]
        expected = sorted(cands, key=lambda j: (-r[j], j))[:5]
        assert _as_set(res, i) == set(expected)


def test_som_validation():
    with pytest.raises(ValueError, match=r"\(B, H, T, T\).*got \(3, 5\)"):
        som(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="square"):
        som(torch.zeros(1, 2, 7, 6))
    with pytest.raises(ValueError, match="top_k"):
        som(_attention(R, S), top_k=0)
    with pytest.raises(ValueError, match="cls_scale"):
        som(_attention(R, S), cls_scale=0.0)


# --------------------------------------------------------------------------------------------
# L2
# --------------------------------------------------------------------------------------------


def test_l2_hand_example_ties_and_cls_excluded():
    # class token with a huge norm must be ignored; patch norms: 5, 1, 5, 2, 0
    hidden = torch.tensor(
        [[[1000.0, 0.0], [3.0, 4.0], [0.0, 1.0], [4.0, 3.0], [2.0, 0.0], [0.0, 0.0]]]
    )
    res = l2(hidden, top_k=1)
    torch.testing.assert_close(res.scores[0], torch.tensor([5.0, 1.0, 5.0, 2.0, 0.0]))
    assert _as_set(res) == {0}  # tie 0/2 -> lower index
    assert _as_set(l2(hidden, top_k=2)) == {0, 2}
    assert _as_set(l2(hidden, top_k=3)) == {0, 2, 3}
    assert _as_set(l2(hidden, top_k=99)) == set(range(5))
    assert _as_set(l2(hidden[:, 1:], top_k=3, has_cls=False)) == {0, 2, 3}


def test_l2_validation():
    with pytest.raises(ValueError, match=r"\(B, T, C\).*got \(4, 5\)"):
        l2(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="top_k"):
        l2(torch.zeros(1, 5, 3), top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        l2(torch.zeros(1, 5, 3), top_k=None)


# --------------------------------------------------------------------------------------------
# Planted outliers (all hidden-state detectors)
# --------------------------------------------------------------------------------------------

PLANTED = [{5, 77, 150}, {0, 100, 195}]


def _planted_hidden(seed: int = 0) -> torch.Tensor:
    """(2, 197, 64) random tokens; patches in PLANTED get 100x the norm."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 197, 64, generator=g)
    for b, idx in enumerate(PLANTED):
        for i in idx:
            hidden[b, 1 + i] *= 100.0
    return hidden


def test_planted_outliers_found_by_l2_norm_z_lof():
    hidden = _planted_hidden()
    for b in range(2):
        assert _as_set(l2(hidden, top_k=3), b) == PLANTED[b]
        assert _as_set(norm_z(hidden), b) == PLANTED[b]
        # (1 - 0.015) * 195 = 192.075 -> threshold between the 3rd and 4th largest LOF
        for variant in ("sc-clip", "standard"):
            res = lof(hidden, contamination=0.015, variant=variant)
            assert _as_set(res, b) == PLANTED[b]
            top3 = set(torch.topk(res.scores[b], 3).indices.tolist())
            assert top3 == PLANTED[b]


# --------------------------------------------------------------------------------------------
# LOF
# --------------------------------------------------------------------------------------------

# Six points on a line, k = 2, squared distances:
#   a=0  b=1  c=3  d=7  e=12  f=20
#   a: b 1, c 9               -> neighbours {b, c}, kdist(a) = 9
#   b: a 1, c 4               -> {a, c}, kdist(b) = 4
#   c: b 4, a 9 (d 16)        -> {b, a}, kdist(c) = 9
#   d: c 16, e 25 (b 36)      -> {c, e}, kdist(d) = 25
#   e: d 25, f 64 (c 81)      -> {d, f}, kdist(e) = 64
#   f: e 64, d 169 (c 289)    -> {e, d}, kdist(f) = 169
# "sc-clip": reach(p, o) = max(kdist(p), d(p, o)) = kdist(p), lrd(p) ∝ 1 / kdist(p),
#   LOF(a) = 9 * (1/4 + 1/9) / 2       = 117/72
#   LOF(b) = 4 * (1/9 + 1/9) / 2       = 4/9
#   LOF(c) = 9 * (1/4 + 1/9) / 2       = 117/72
#   LOF(d) = 25 * (1/9 + 1/64) / 2     = 1825/1152
#   LOF(e) = 64 * (1/25 + 1/169) / 2   = 6208/4225
#   LOF(f) = 169 * (1/64 + 1/25) / 2   = 15041/3200
# "standard": reach(p, o) = max(kdist(o), d(p, o)):
#   a: max(4, 1)=4, max(9, 9)=9      mean 13/2   lrd 2/13
#   b: max(9, 1)=9, max(9, 4)=9      mean 9      lrd 1/9
#   c: max(4, 4)=4, max(9, 9)=9      mean 13/2   lrd 2/13
#   d: max(9, 16)=16, max(64, 25)=64 mean 40     lrd 1/40
#   e: max(25, 25)=25, max(169, 64)=169 mean 97  lrd 1/97
#   f: max(64, 64)=64, max(25, 169)=169 mean 233/2 lrd 2/233
#   LOF(a) = (1/9 + 2/13)/2 / (2/13) = 31/36,  LOF(b) = (2/13 + 2/13)/2 * 9 = 18/13,
#   LOF(c) = 31/36, LOF(d) = (2/13 + 1/97)/2 * 40 = 4140/1261,
#   LOF(e) = (1/40 + 2/233)/2 * 97 = 30361/18640, LOF(f) = (1/97 + 1/40)/2 * 233/2 = 31921/15520
LINE = torch.tensor([0.0, 1.0, 3.0, 7.0, 12.0, 20.0], dtype=torch.float64).reshape(1, 6, 1)
F_ = Fraction
LOF_SCCLIP = [F_(117, 72), F_(4, 9), F_(117, 72), F_(1825, 1152), F_(6208, 4225), F_(15041, 3200)]
LOF_STANDARD = [
    F_(31, 36),
    F_(18, 13),
    F_(31, 36),
    F_(4140, 1261),
    F_(30361, 18640),
    F_(31921, 15520),
]


def test_lof_sc_clip_hand_example():
    res = lof(LINE, n_neighbors=2, contamination=0.5, has_cls=False)
    expected = torch.tensor([float(v) for v in LOF_SCCLIP], dtype=torch.float64)
    torch.testing.assert_close(res.scores[0], expected, rtol=1e-12, atol=0)
    # sorted: 4/9, 1.469, 1.584, 1.625, 1.625, 4.700
    # q = 0.5: position 2.5 -> threshold (1.584 + 1.625) / 2 -> a, c, f are strictly above
    assert _as_set(res) == {0, 2, 5}
    # q = 0.8: position 4 -> threshold = 1.625 exactly; strict ">" leaves only f
    assert _as_set(lof(LINE, n_neighbors=2, contamination=0.2, has_cls=False)) == {5}


def test_lof_standard_hand_example():
    res = lof(LINE, n_neighbors=2, contamination=0.5, variant="standard", has_cls=False)
    expected = torch.tensor([float(v) for v in LOF_STANDARD], dtype=torch.float64)
    torch.testing.assert_close(res.scores[0], expected, rtol=1e-12, atol=0)


def _sq_dists(x: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def test_lof_sc_clip_identity_kdist_ratio():
    # Derivation: the k neighbours of p are the k nearest, so d(p, o) <= kdist(p) for each,
    # hence reach(p, o) = max(kdist(p), d(p, o)) = kdist(p); lrd(p) = k / mean reach
    # = k / kdist(p), and LOF(p) = mean_o lrd(o) / lrd(p) = kdist(p) * mean_o 1 / kdist(o).
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 50, 8))
    k = 7
    res = lof(torch.from_numpy(x), n_neighbors=k, has_cls=False)
    for b in range(2):
        d = _sq_dists(x[b])
        order = np.argsort(d, axis=1)
        assert (order[:, 0] == np.arange(50)).all()  # self comes first
        nbrs = order[:, 1 : k + 1]
        kdist = d[np.arange(50), order[:, k]]
        expected = kdist * (1.0 / kdist[nbrs]).mean(axis=1)
        np.testing.assert_allclose(res.scores[b].numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 10, 59])
def test_lof_standard_matches_sklearn(k):
    sklearn_neighbors = pytest.importorskip("sklearn.neighbors")
    rng = np.random.default_rng(k)
    x = rng.normal(size=(2, 60, 5))
    res = lof(torch.from_numpy(x), n_neighbors=k, variant="standard", has_cls=False)
    for b in range(2):
        est = sklearn_neighbors.LocalOutlierFactor(n_neighbors=k, metric="sqeuclidean")
        est.fit(x[b])
        np.testing.assert_allclose(res.scores[b].numpy(), -est.negative_outlier_factor_, rtol=1e-4)


def test_lof_matches_design_formula_bit_for_bit():
    # LOF as the releases compute it (sfp.core.outliers.lof), one image at a time, float32.
    torch.manual_seed(3)
    hidden = torch.randn(2, 197, 64)
    res = lof(hidden)
    k = 30
    for b in range(2):
        x = hidden[b, 1:]
        dist = torch.norm(x[:, None] - x[None, :], dim=2, p=2) ** 2
        knn_d, knn_i = torch.topk(dist, k + 1, largest=False)
        knn_d, knn_i = knn_d[:, 1:], knn_i[:, 1:]
        reach = torch.maximum(knn_d, knn_d[:, -1:])
        lrd = k / reach.mean(dim=1)
        scores = (lrd[knn_i] / lrd[:, None]).mean(dim=1)
        flagged = scores > torch.quantile(scores.float(), 0.95)
        assert torch.equal(res.scores[b], scores)
        assert torch.equal(res.mask[b], flagged)


def test_lof_quantile_flags_exactly_ten_of_196():
    torch.manual_seed(4)
    hidden = torch.randn(3, 197, 32)
    for variant in ("sc-clip", "standard"):
        res = lof(hidden, variant=variant)
        assert res.count().tolist() == [10, 10, 10]
        for b in range(3):
            assert _as_set(res, b) == set(torch.topk(res.scores[b], 10).indices.tolist())


def test_lof_duplicates_stay_finite():
    torch.manual_seed(5)
    hidden = torch.randn(1, 41, 4)
    hidden[0, 1:36] = hidden[0, 1]  # 35 identical patch tokens
    for variant in ("sc-clip", "standard"):
        res = lof(hidden, n_neighbors=5, variant=variant)
        assert bool(torch.isfinite(res.scores).all())
        assert 1 <= int(res.count()) <= 5


def test_lof_half_precision_is_computed_in_float32():
    torch.manual_seed(6)
    hidden = torch.randn(1, 50, 16)
    res16 = lof(hidden.half(), n_neighbors=5)
    res32 = lof(hidden.half().float(), n_neighbors=5)
    assert res16.scores.dtype == torch.float32
    assert torch.equal(res16.scores, res32.scores)


def test_lof_validation():
    hidden = torch.randn(1, 11, 4)  # N = 10 patches
    assert lof(hidden, n_neighbors=9).mask.shape == (1, 10)
    with pytest.raises(ValueError, match=r"n_neighbors=10.*N=10"):
        lof(hidden, n_neighbors=10)
    with pytest.raises(ValueError, match="n_neighbors"):
        lof(hidden, n_neighbors=0)
    for bad in (0.0, -0.1, 0.51, 1.0):
        with pytest.raises(ValueError, match="contamination"):
            lof(hidden, n_neighbors=3, contamination=bad)
    assert lof(hidden, n_neighbors=3, contamination=0.5).mask.shape == (1, 10)
    with pytest.raises(ValueError, match="variant"):
        lof(hidden, n_neighbors=3, variant="textbook")
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        lof(torch.randn(11, 4))


# --------------------------------------------------------------------------------------------
# norm_z
# --------------------------------------------------------------------------------------------


def test_norm_z_hand_example_odd():
    # norms 1, 2, 3, 4, 100: median 3, |dev| = 2, 1, 0, 1, 97 -> MAD 1
    # z = 0.6745 * (-2, -1, 0, 1, 97)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64).reshape(1, 5, 1)
    res = norm_z(x, has_cls=False)
    expected = 0.6745 * torch.tensor([-2.0, -1.0, 0.0, 1.0, 97.0], dtype=torch.float64)
    torch.testing.assert_close(res.scores[0], expected)
    assert _as_set(res) == {4}


def test_norm_z_hand_example_even_and_threshold():
    # norms 1..5, 60: median (3 + 4) / 2 = 3.5; |dev| sorted 0.5, 0.5, 1.5, 1.5, 2.5, 56.5
    # -> MAD (1.5 + 1.5) / 2 = 1.5; z(5) = 0.6745, z(60) = 0.6745 * 56.5 / 1.5
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 60.0], dtype=torch.float64).reshape(1, 6, 1)
    res = norm_z(x, has_cls=False)
    assert res.scores[0, 4].item() == pytest.approx(0.6745)
    assert res.scores[0, 5].item() == pytest.approx(0.6745 * 56.5 / 1.5)
    assert _as_set(res) == {5}
    assert _as_set(norm_z(x, threshold=0.5, has_cls=False)) == {4, 5}


def test_norm_z_zero_mad_uses_floor():
    # more than half of the norms equal 2 -> MAD 0; only the token above the shared norm
    x = torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0, 3.0, 1.0]).reshape(1, 7, 1)
    res = norm_z(x, has_cls=False)
    assert bool(torch.isfinite(res.scores).all())
    assert _as_set(res) == {5}


# --------------------------------------------------------------------------------------------
# Registry and detect
# --------------------------------------------------------------------------------------------


@pytest.fixture
def registry():
    """The conftest's autouse fixture restores the registries after each test."""


def test_builtin_detectors_registered():
    assert {"som", "l2", "lof", "norm_z"} <= set(available_detectors())
    assert get_detector("som").needs == "attention"
    for name in ("l2", "lof", "norm_z"):
        assert get_detector(name).needs == "hidden"
    assert get_detector("l2").fn is l2


def test_unknown_detector_lists_names_and_suggests():
    with pytest.raises(ValueError, match="unknown detector 'lfo'") as info:
        get_detector("lfo")
    msg = str(info.value)
    assert "som" in msg and "norm_z" in msg and "Did you mean 'lof'" in msg


def test_register_detector_and_overwrite(registry):
    def first_token(hidden, *, has_cls=True):
        p = hidden[:, 1:] if has_cls else hidden
        mask = torch.zeros(p.shape[:2], dtype=torch.bool)
        mask[:, 0] = True
        return OutlierResult(scores=mask.float(), mask=mask)

    register_detector("first", first_token, needs="hidden")
    assert "first" in available_detectors()
    res = detect("first", {"hidden": torch.randn(2, 5, 3)})
    assert res.count().tolist() == [1, 1]
    with pytest.raises(ValueError, match="already registered"):
        register_detector("first", first_token)
    register_detector("first", l2, overwrite=True)
    assert get_detector("first").fn is l2
    with pytest.raises(ValueError, match="needs"):
        register_detector("bad", l2, needs="tokens")


class FakeTrace:
    """Duck-typed stand-in for sfp.core.probe.Trace: stored per-layer tensors, 1-indexed."""

    def __init__(self, hidden=None, attention=None):
        self._hidden = hidden or {}
        self._attention = attention or {}

    def hidden(self, layer):
        return self._hidden[layer]

    def attention(self, layer):
        return self._attention[layer]


def test_detect_on_mapping_and_trace():
    a = _attention(R, S)
    hidden = _planted_hidden()
    assert torch.equal(detect("som", {"attention": a}, None, top_k=2).mask, som(a, top_k=2).mask)
    trace = FakeTrace(hidden={3: hidden}, attention={3: a})
    assert _as_set(detect("som", trace, 3, top_k=2)) == {1, 3}
    assert _as_set(detect("l2", trace, 3, top_k=3), 1) == PLANTED[1]
    assert torch.equal(detect("norm_z", trace, 3).mask, norm_z(hidden).mask)


def test_detect_missing_input_says_how_to_record():
    with pytest.raises(MissingInputError, match=r"'som' needs 'attention'") as info:
        detect("som", {"hidden": torch.randn(1, 5, 3)})
    assert 'record(..., store=("attention",))' in str(info.value)
    trace = FakeTrace(hidden={2: torch.randn(1, 5, 3)})
    with pytest.raises(MissingInputError, match="layer 2") as info:
        detect("som", trace, 2)
    assert 'store=("attention",)' in str(info.value)
    with pytest.raises(ValueError, match="layer"):
        detect("l2", trace, None)
    with pytest.raises(TypeError, match="Trace-like"):
        detect("l2", [torch.randn(1, 5, 3)], 1)


# --------------------------------------------------------------------------------------------
# Mitigation
# --------------------------------------------------------------------------------------------

# 3 x 4 grid, row-major indices        channel 0 = index, channel 1 = index ** 2
#    0  1  2  3
#    4  5  6  7
#    8  9 10 11
TOK = torch.stack([torch.arange(12.0), torch.arange(12.0) ** 2], dim=-1).double().unsqueeze(0)


def _mask(n: int, flagged) -> torch.Tensor:
    m = torch.zeros(1, n, dtype=torch.bool)
    m[0, list(flagged)] = True
    return m


def _v(*idx) -> torch.Tensor:
    """Mean of tokens idx of TOK: (2,)."""
    return TOK[0, list(idx)].mean(dim=0)


@pytest.mark.parametrize(
    "flagged, expected",
    [
        # interior: 0 1 2 4 6 8 9 10 -> (40/8, 302/8)
        ({5}, {5: (5.0, 37.75)}),
        # border (row 1, col 3): 2 3 6 10 11 -> (32/5, 270/5)
        ({7}, {7: (6.4, 54.0)}),
        # corner: 1 4 5 -> (10/3, 42/3)
        ({0}, {0: (10 / 3, 14.0)}),
        # adjacent 5, 6 exclude each other: 5 <- 0 1 2 4 8 9 10, 6 <- 1 2 3 7 9 10 11
        ({5, 6}, {5: (34 / 7, 266 / 7), 6: (43 / 7, 365 / 7)}),
    ],
)
def test_mitigate_hand_examples(flagged, expected):
    out, report = mitigate_with_report(TOK, (3, 4), _mask(12, flagged))
    for i, (c0, c1) in expected.items():
        torch.testing.assert_close(out[0, i], torch.tensor([c0, c1], dtype=torch.float64))
    keep = [i for i in range(12) if i not in flagged]
    assert torch.equal(out[0, keep], TOK[0, keep])
    assert report.mitigated.tolist() == [len(flagged)]
    assert report.widened.tolist() == [0]
    assert report.max_radius.tolist() == [1]
    assert report.unchanged.tolist() == [0]


def test_mitigate_widens_ring_when_surrounded():
    # Flag the 3x3 block around 5: {0, 1, 2, 4, 5, 6, 8, 9, 10}; unflagged: 3, 7, 11.
    #   5: all 8 neighbours flagged -> 5x5 window (rows 0-2, cols 0-3) -> 3, 7, 11, radius 2
    #   1, 9: 3x3 all flagged; 5x5 (cols 0-3) holds 3, 7, 11 -> radius 2
    #   0, 4, 8: 3x3 and 5x5 (cols 0-2) all flagged; 7x7 -> 3, 7, 11, radius 3
    #   2: neighbours 3, 7 -> radius 1;  6: 3, 7, 11 -> radius 1;  10: 7, 11 -> radius 1
    flagged = {0, 1, 2, 4, 5, 6, 8, 9, 10}
    out, report = mitigate_with_report(TOK, (3, 4), _mask(12, flagged))
    far = torch.tensor([7.0, 179 / 3], dtype=torch.float64)  # mean of 3, 7, 11
    for i in (0, 1, 4, 5, 6, 8, 9):
        torch.testing.assert_close(out[0, i], far)
    torch.testing.assert_close(out[0, 2], torch.tensor([5.0, 29.0], dtype=torch.float64))
    torch.testing.assert_close(out[0, 10], torch.tensor([9.0, 85.0], dtype=torch.float64))
    assert torch.equal(out[0, [3, 7, 11]], TOK[0, [3, 7, 11]])
    expected_radius = [3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0]
    assert report.radius[0].tolist() == expected_radius
    assert report.mitigated.tolist() == [9]
    assert report.widened.tolist() == [6]
    assert report.max_radius.tolist() == [3]


def test_mitigate_all_flagged_leaves_image_unchanged():
    mask = torch.ones(1, 12, dtype=torch.bool)
    out, report = mitigate_with_report(TOK, (3, 4), mask)
    assert torch.equal(out, TOK)
    assert report.mitigated.tolist() == [0]
    assert report.unchanged.tolist() == [12]
    assert report.max_radius.tolist() == [0]


def test_mitigate_nothing_flagged_is_identity():
    out, report = mitigate_with_report(TOK, (3, 4), torch.zeros(1, 12, dtype=torch.bool))
    assert torch.equal(out, TOK)
    assert report.mitigated.tolist() == [0]


def test_mitigate_non_square_and_transpose():
    # 2 x 5 grid, flag (0, 0) -> mean of (0, 1), (1, 0), (1, 1) = tokens 1, 5, 6
    torch.manual_seed(7)
    tok = torch.randn(1, 10, 3, dtype=torch.float64)
    mask = _mask(10, {0, 7})
    out = mitigate(tok, (2, 5), mask)
    torch.testing.assert_close(out[0, 0], tok[0, [1, 5, 6]].mean(dim=0))
    # (1, 2) -> neighbours (0, 1..3), (1, 1), (1, 3) = tokens 1, 2, 3, 6, 8
    torch.testing.assert_close(out[0, 7], tok[0, [1, 2, 3, 6, 8]].mean(dim=0))
    # the same tokens laid out on the transposed 5 x 2 grid give the transposed result
    perm = torch.tensor([i * 5 + j for j in range(5) for i in range(2)])  # (j, i) <- (i, j)
    out_t = mitigate(tok[:, perm], (5, 2), mask[:, perm])
    torch.testing.assert_close(out_t, out[:, perm], rtol=1e-12, atol=1e-12)


def test_mitigate_batch_with_different_masks():
    tok = torch.cat([TOK, TOK.flip(1)], dim=0)
    mask = torch.cat([_mask(12, {5}), _mask(12, {0, 11})], dim=0)
    out, report = mitigate_with_report(tok, (3, 4), mask)
    for b in range(2):
        assert torch.equal(out[b : b + 1], mitigate(tok[b : b + 1], (3, 4), mask[b : b + 1]))
    assert report.mitigated.tolist() == [1, 2]


def _reference_mitigate(tok: torch.Tensor, grid, mask: torch.Tensor) -> torch.Tensor:
    gh, gw = grid
    out = tok.clone()
    for b in range(tok.shape[0]):
        if bool(mask[b].all()):
            continue
        for i in torch.nonzero(mask[b]).flatten().tolist():
            y, x = divmod(i, gw)
            r = 1
            while True:
                picked = [
                    yy * gw + xx
                    for yy in range(y - r, y + r + 1)
                    for xx in range(x - r, x + r + 1)
                    if 0 <= yy < gh and 0 <= xx < gw and not mask[b, yy * gw + xx]
                ]
                if picked:
                    out[b, i] = tok[b, picked].mean(dim=0)
                    break
                r += 1
    return out


def test_mitigate_matches_brute_force_on_random_masks():
    g = torch.Generator().manual_seed(8)
    tok = torch.randn(6, 35, 4, dtype=torch.float64, generator=g)
    density = torch.tensor([0.05, 0.3, 0.6, 0.85, 0.95, 1.0]).unsqueeze(-1)
    mask = torch.rand(6, 35, generator=g) < density
    mask[5] = True
    out = mitigate(tok, (5, 7), mask)
    torch.testing.assert_close(out, _reference_mitigate(tok, (5, 7), mask))
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[~mask], tok[~mask])


def test_mitigate_validation():
    with pytest.raises(ValueError, match=r"grid 3x3 = 9 tokens.*N = 12"):
        mitigate(TOK, (3, 3), _mask(12, {0}))
    with pytest.raises(ValueError, match=r"mask must be \(B, N\)"):
        mitigate(TOK, (3, 4), torch.zeros(1, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"tokens must be \(B, N, C\)"):
        mitigate(TOK[0], (3, 4), _mask(12, {0}))


# --------------------------------------------------------------------------------------------
# Across layers
# --------------------------------------------------------------------------------------------

# image 0: layer 1 {3, 5}, layer 2 {3, 8}, layer 3 {3, 5}
# image 1: layer 1 {0},    layer 2 {},     layer 3 {0}
LAYER_PLANTS = {1: [{3, 5}, {0}], 2: [{3, 8}, set()], 3: [{3, 5}, {0}]}
# persistence (mean over images where F_l is non-empty):
#   1 -> 2: image 0 |{3}| / 2 = 0.5, image 1 0 / 1 = 0      -> 0.25
#   1 -> 3: image 0 2 / 2 = 1,       image 1 1 / 1 = 1      -> 1.0
#   2 -> 3: image 0 |{3}| / 2 = 0.5, image 1 undefined      -> 0.5
EXPECTED_PERSISTENCE = {1: {2: 0.25, 3: 1.0}, 2: {3: 0.5}, 3: {}}


def _layer_trace() -> FakeTrace:
    g = torch.Generator().manual_seed(9)
    hidden, attention = {}, {}
    for layer, plants in LAYER_PLANTS.items():
        h = torch.randn(2, 37, 16, generator=g)
        for b, idx in enumerate(plants):
            for i in idx:
                h[b, 1 + i] *= 50.0
        hidden[layer] = h
        attention[layer] = torch.softmax(torch.randn(2, 3, 37, 37, generator=g), dim=-1)
    return FakeTrace(hidden=hidden, attention=attention)


def test_layer_statistics_on_fake_trace():
    trace = _layer_trace()
    stats = layer_statistics(
        trace, [3, 1, 2], params={"lof": {"n_neighbors": 5}, "l2": {"top_k": 2}}
    )
    assert isinstance(stats, LayerStats)
    assert stats.layers == [1, 2, 3]
    assert set(stats.masks) == {"som", "l2", "lof", "norm_z"}
    for li, layer in enumerate(stats.layers):
        norms = trace.hidden(layer)[:, 1:].norm(dim=-1)
        torch.testing.assert_close(stats.max_norm[li], norms.max(dim=-1).values)
        torch.testing.assert_close(stats.median_norm[li], norms.quantile(0.5, dim=-1))
        for b in range(2):
            flagged = set(torch.nonzero(stats.masks["norm_z"][li, b]).flatten().tolist())
            assert flagged == LAYER_PLANTS[layer][b]
        assert torch.equal(stats.masks["som"][li], som(trace.attention(layer)).mask)
    assert stats.counts["l2"].tolist() == [[2, 2]] * 3
    assert stats.counts["norm_z"].tolist() == [[2, 1], [2, 0], [2, 1]]
    assert stats.masks["lof"].shape == (3, 2, 36)

    matrix = stats.persistence("norm_z")
    expected = torch.full((3, 3), math.nan, dtype=torch.float64)
    expected[0, 1], expected[0, 2], expected[1, 2] = 0.25, 1.0, 0.5
    torch.testing.assert_close(matrix, expected, equal_nan=True)
    masks_by_layer = {layer: stats.masks["norm_z"][i] for i, layer in enumerate(stats.layers)}
    assert persistence(masks_by_layer) == EXPECTED_PERSISTENCE
    with pytest.raises(ValueError, match="no masks"):
        stats.persistence("nope")


def test_persistence_undefined_is_nan():
    empty = torch.zeros(2, 4, dtype=torch.bool)
    some = torch.tensor([[True, False, False, False]] * 2)
    result = persistence({1: empty, 2: some, 5: some})
    assert math.isnan(result[1][2]) and math.isnan(result[1][5])
    assert result[2] == {5: 1.0}


def test_layer_statistics_errors():
    trace = _layer_trace()
    no_attention = FakeTrace(hidden=trace._hidden)
    with pytest.raises(MissingInputError, match="attention"):
        layer_statistics(no_attention, [1])
    stats = layer_statistics(no_attention, [1, 2], detectors=("l2",))
    assert set(stats.counts) == {"l2"}
    with pytest.raises(TypeError, match="Trace-like"):
        layer_statistics({"hidden": trace.hidden(1)}, [1])
    with pytest.raises(ValueError, match="params"):
        layer_statistics(trace, [1], detectors=("l2",), params={"lof": {}})
    with pytest.raises(ValueError, match="unknown detector"):
        layer_statistics(trace, [1], detectors=("l3",))
