"""The dbscan detector: a hand-worked example, scikit-learn's DBSCAN, the planted model."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from sfp.core import io, probe
from sfp.core.outliers import DETECTORS, dbscan, detect
from sfp.models.synthetic import planted_model, synthetic_scene

# 13 points on a line (has_cls=False), min_samples 3:
#   A = 0..7 (8 points, spacing 1), B = 50, 51, 52, and two loners 30, 80.
# Distance to the 3rd nearest point, itself included (= 2nd nearest other):
#   A: 2 (ends), 1 (six interior); B: 2, 1, 2; 30: 23 (to 50 is 20, to 7 is 23); 80: 29.
#   Sorted: 1 x7, 2 x4, 23, 29 -> median (7th of 13) = 1, so eps 1.5 -> radius 1.5.
# Within 1.5 (itself included): A interior 3 -> core, A ends 2 -> border of A; 51 core,
#   50/52 border of B; 30 and 80 reach nobody -> noise.
# Clusters A (8), B (3). max_cluster 0.25 * 13 = 3.25 >= 3 -> B is small.
POINTS = [0, 1, 2, 3, 4, 5, 6, 7, 50, 51, 52, 30, 80]
A, B, NOISE = set(range(8)), {8, 9, 10}, {11, 12}


def _line() -> torch.Tensor:
    return torch.tensor(POINTS, dtype=torch.float64).reshape(1, -1, 1)


def test_hand_example() -> None:
    res = dbscan(_line(), eps=1.5, min_samples=3, max_cluster=0.25, has_cls=False)
    assert set(res.indices()[0].tolist()) == B | NOISE
    want = [Fraction(5, 13)] * 8 + [Fraction(10, 13)] * 3 + [Fraction(1)] * 2
    torch.testing.assert_close(res.scores[0], torch.tensor([float(w) for w in want],
                                                           dtype=torch.float64))
    noise = dbscan(_line(), eps=1.5, min_samples=3, flag="noise", has_cls=False)
    assert set(noise.indices()[0].tolist()) == NOISE
    # B too large to be "small": only the noise is flagged
    big = dbscan(_line(), eps=1.5, min_samples=3, max_cluster=0.2, has_cls=False)
    assert set(big.indices()[0].tolist()) == NOISE


def test_matches_sklearn_labels() -> None:
    sk = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 3, generator=g), torch.randn(6, 3, generator=g) * 0.2 + 8,
                   torch.randn(3, 3, generator=g) * 6])
    res = dbscan(x[None].double(), eps=1.8, min_samples=5, flag="noise", has_cls=False)
    d = torch.cdist(x.double(), x.double())
    kth = torch.sort(d, dim=1).values[:, 4].median().item()
    labels = sk.DBSCAN(eps=1.8 * kth, min_samples=5).fit(x.double().numpy()).labels_
    assert res.mask[0].tolist() == (labels == -1).tolist()
    assert 0 < res.mask.sum() < 49


def test_bad_arguments() -> None:
    h = torch.randn(1, 10, 4)
    for kw, msg in (({"eps": 0}, "eps"), ({"min_samples": 0}, "min_samples"),
                    ({"metric": "l1"}, "metric"), ({"flag": "all"}, "flag"),
                    ({"max_cluster": 2.0}, "max_cluster")):
        with pytest.raises(ValueError, match=msg):
            dbscan(h, **kw)


def test_registered_with_sliders() -> None:
    entry = DETECTORS.get("dbscan")
    assert entry.meta["needs"] == "hidden"
    assert {p.name for p in entry.params} == {"eps", "min_samples", "metric", "flag",
                                              "max_cluster"}
    assert all(p.low is not None for p in entry.params
               if p.name in ("eps", "min_samples", "max_cluster"))


@pytest.mark.slow
def test_planted_model_truth() -> None:
    bundle, truth = planted_model("ViT-S-16", seed=1, onset_layer=4, n_outliers=8,
                                  strength=15.0)
    photos = [io.prepare(a, bundle) for a in list(io.sample_images().values())[:2]]
    imgs = torch.cat(photos + [io.normalize(synthetic_scene(0), bundle)[None]])
    trace = probe.record(bundle, imgs, store=("hidden",))
    planted = truth.mask(imgs).flatten(1)
    assert planted.sum() > 0
    for layer in range(truth.onset_layer, bundle.num_layers + 1):
        got = detect("dbscan", trace, layer).mask
        assert torch.equal(got, planted), layer
    for layer in range(1, truth.onset_layer):
        assert not detect("dbscan", trace, layer).mask.any(), layer


def test_explorer_grows_dbscan_sliders() -> None:
    from conftest import make_tiny_bundle

    from sfp.core.io import normalize
    from sfp.viz.widgets import OutlierExplorer

    bundle = make_tiny_bundle()
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    trace = probe.record(bundle, normalize(img, bundle)[None], store=("hidden",))
    ex = OutlierExplorer(trace, img, map="norm", detector="dbscan")
    assert ex.eps_slider.value == 2.0 and ex.min_samples_slider.value == 4
    assert ex.max_cluster_slider.value == 0.1
    ex.eps_slider.value = 1.0
    assert ex.detector_params() == {"eps": 1.0, "min_samples": 4, "max_cluster": 0.1}
    want = detect("dbscan", trace, ex.layer, eps=1.0).mask[0]
    assert torch.equal(ex.current_result().mask[0], want)
