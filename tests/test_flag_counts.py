"""Candidates vs kept flags (FlagCounts): by hand and against the planted model's truth."""

from __future__ import annotations

import pytest
import torch

from sfp.core.outliers import FlagCounts, l2, layer_statistics, lof, norm_z, som


def _attention(r: list[float], s: list[float]) -> torch.Tensor:
    """(1, 1, T, T) attention with class->patch row ``r`` and patch self-attention ``s``."""
    n = len(r)
    a = torch.zeros(1, 1, n + 1, n + 1)
    a[0, 0, 0, 1:] = torch.tensor(r)
    a[0, 0, 0, 0] = 1 - sum(r)
    for i, v in enumerate(s):
        a[0, 0, 1 + i, 1 + i] = v
        a[0, 0, 1 + i, 0] = 1 - v
    return a


def test_som_candidates_and_kept_by_hand() -> None:
    # 1.5 r > s for patches 0, 1, 3, 4 (0.15 > 0.1, 0.3 > 0.2, 0.45 > 0.1, 0.06 > 0.05);
    # patch 2: 0.015 < 0.5. top_k=2 keeps the two largest r among them: patches 3 and 1.
    a = _attention([0.1, 0.2, 0.01, 0.3, 0.04], [0.1, 0.2, 0.5, 0.1, 0.05])
    res = som(a, top_k=2)
    assert res.candidates[0].tolist() == [True, True, False, True, True]
    assert res.mask[0].tolist() == [False, True, False, True, False]
    fc = res.flag_counts()
    assert (fc.passed, fc.kept, fc.total) == (4, 2, 5)
    assert fc.text == "2 kept of 4 above the criterion (top-k)"
    assert som(a, top_k=None).flag_counts().text == "4 above the criterion, all kept"


def test_som_with_no_candidate_says_so() -> None:
    a = _attention([0.01, 0.01, 0.01], [0.5, 0.5, 0.5])
    fc = som(a).flag_counts()
    assert (fc.passed, fc.kept) == (0, 0) and fc.none_above
    assert fc.text == "no outlier above the criterion"
    assert fc.short == "no outlier above the criterion"


def test_l2_has_no_criterion_every_patch_passes() -> None:
    h = torch.zeros(1, 1 + 6, 4)
    h[0, 1:, 0] = torch.arange(6.0)
    fc = l2(h, top_k=2).flag_counts()
    assert (fc.passed, fc.kept, fc.total) == (6, 2, 6)
    assert "every patch passes the criterion" in fc.text


def test_threshold_detectors_keep_every_candidate() -> None:
    h = torch.ones(1, 1 + 40, 3)
    h[0, 5] *= 30.0  # one huge-norm patch (index 4)
    for res in (norm_z(h), lof(h, n_neighbors=5)):
        fc = res.flag_counts()
        assert fc.passed == fc.kept == int(res.mask.sum())
    assert norm_z(h).mask[0].nonzero().flatten().tolist() == [4]


def test_flag_counts_texts() -> None:
    assert FlagCounts(3, 3, 196).short == "3 pass, all kept"
    assert FlagCounts(37, 10, 196).short == "10 kept / 37 pass"


@pytest.fixture(scope="module")
def planted_s16():
    from sfp.core.io import normalize
    from sfp.core.probe import record
    from sfp.models.synthetic import planted_model, synthetic_scene

    bundle, truth = planted_model("ViT-S-16", seed=0)
    x = normalize(synthetic_scene(0), bundle)[None]
    return record(bundle, x), truth.mask(x).flatten(1)[0], truth.onset_layer


def test_som_counts_against_the_planted_truth(planted_s16) -> None:
    trace, planted, onset = planted_s16
    stats = layer_statistics(trace, trace.layers, ("som",))
    n_planted = int(planted.sum())
    for i, layer in enumerate(stats.layers):
        fc = stats.flag_counts("som", layer)
        hits = int((stats.masks["som"][i, 0] & planted).sum())
        if layer < onset:
            # Before the attention reacts (block l's attention reads block l-1's output) most
            # patches pass the criterion; top-k keeps 10 that are not the planted ones.
            assert fc.passed > 100 and fc.kept == 10 and hits == 0
        elif layer == onset:
            # block onset's attention holds the planted competition head (each patch looks
            # at the class token or at a flatter patch of its cell), not the sinks yet
            assert fc.passed > 100 and fc.kept == 10 and hits < n_planted
        else:
            assert fc.passed == fc.kept == hits == n_planted


def _passed_by_hand(trace, layer: int, cls_scale: float) -> int:
    a = trace.attention(layer)[0].double().mean(0)  # (T, T) head mean
    return int((cls_scale * a[0, 1:] > torch.diagonal(a)[1:]).sum())


def test_outlier_grid_shows_candidates_kept_and_none(planted_s16) -> None:
    from sfp.viz.figures import outlier_grid, outlier_grid_data

    trace, _, onset = planted_s16
    d = outlier_grid_data(trace, layers=[onset, onset + 1], as_released=False)
    n = _passed_by_hand(trace, onset, 1.5)
    assert n > 10
    assert d.flag_text(onset) == f"10 kept / {n} pass"
    assert d.flag_text(onset + 1) == "10 pass, all kept"
    fig = outlier_grid(d)
    titles = [ax.get_title() for ax in fig.axes]
    assert f"flagged (yellow): 10 kept / {n} pass" in titles
    none = outlier_grid_data(trace, layers=[2], detector_params={"cls_scale": 0.05},
                             as_released=False)
    assert _passed_by_hand(trace, 2, 0.05) == 0
    assert none.flag_text(2) == "no outlier above the criterion"
    texts = [t.get_text() for ax in outlier_grid(none).axes for t in ax.texts]
    assert "no outlier above\nthe criterion" in texts


def test_outlier_grid_as_released_keeps_every_candidate(planted_s16) -> None:
    """The released criterion has no top-k: every patch past 1.5 A[cls, i] > A[i, i] is kept."""
    from sfp.viz.figures import outlier_grid_data

    trace, _, onset = planted_s16
    d = outlier_grid_data(trace, layers=[onset, onset + 1])
    for layer in (onset, onset + 1):
        n = _passed_by_hand(trace, layer, 1.5)
        fc = d.counts[layer]
        assert (fc.passed, fc.kept, fc.total) == (n, n, trace.num_patches)
        assert int(d.masks[layer].sum()) == n


def test_explorer_status_says_candidates_and_none(planted_s16) -> None:
    from sfp.viz.widgets import OutlierExplorer

    trace, _, onset = planted_s16
    ex = OutlierExplorer(trace, layer=onset)
    n = _passed_by_hand(trace, onset, 1.5)
    assert f"10 kept of {n} above the criterion (top-k)" in ex.status.value
    assert "one layer after the norms" in ex.status.value
    ex.param_sliders["cls_scale"].value = 0.1
    assert _passed_by_hand(trace, onset, 0.1) == 0
    assert "no outlier above the criterion" in ex.status.value
    assert "no outlier above the criterion" in ex.figure.layout.title.text


@pytest.fixture(scope="module")
def planted_s16_bundle():
    from sfp.core.io import normalize
    from sfp.models.synthetic import planted_model, synthetic_scene

    bundle, truth = planted_model("ViT-S-16", seed=0)
    scene = synthetic_scene(0)
    return bundle, scene, normalize(scene, bundle)[None], truth


def test_sfp_stages_count_candidates_against_the_plain_attention(planted_s16,
                                                                 planted_s16_bundle) -> None:
    """SOM inside SFP reports what passed its criterion: blocks 1..L-2 are unchanged by the
    official preset, so the candidates at L-1 are the plain forward's 1.5 A[cls,i] > A[i,i];
    with SOM from block 1 the first layer (its attention reads the unmodified input) too."""
    from sfp.methods.config import SFPConfig
    from sfp.methods.purify import SFPEncoder

    bundle, _, x, truth = planted_s16_bundle
    trace, planted, onset = planted_s16
    detect = bundle.num_layers - 1
    st = SFPEncoder(bundle, SFPConfig.official()).stages(x)
    fc = st.flag_counts()
    assert fc.passed == _passed_by_hand(trace, detect, 1.5) == int(planted.sum())
    assert fc.kept == int(st.mask[0].sum()) == int(planted.sum())
    early = SFPEncoder(bundle, SFPConfig.official(som_start=1)).stages(x)
    fc1 = early.flag_counts(1)
    assert fc1.passed == _passed_by_hand(trace, 1, 1.5) > 10 and fc1.kept == 10
    with pytest.raises(KeyError, match="did not run"):
        st.flag_counts(1)


def test_stage_ablation_and_layerwise_figures_show_counts(planted_s16_bundle) -> None:
    from sfp.methods.config import SFPConfig
    from sfp.methods.purify import SFPEncoder
    from sfp.viz.figures import (
        image_view,
        layerwise_data,
        layerwise_purification,
        layerwise_purification_plotly,
        stage_ablation,
        stage_ablation_data,
    )

    bundle, scene, _, _ = planted_s16_bundle
    view = image_view(bundle, scene.permute(1, 2, 0).numpy(), name="scene")
    d = stage_ablation_data(bundle, view, ["sky", "grass"])
    want = SFPEncoder(bundle, SFPConfig.official()).stages(view.pixels).flag_counts()
    assert d.counts == want and d.flag_text == want.text
    assert want.text in stage_ablation(d).texts[0].get_text().replace("\n", " ")
    cfg = SFPConfig.official(som_start=1)
    lw = layerwise_data(bundle, view, layers=[1, 11], config=cfg)
    st = SFPEncoder(bundle, cfg).stages(view.pixels)
    assert [lw.flag_text(k) for k in range(2)] == [st.flag_counts(1).short,
                                                   st.flag_counts(11).short]
    assert lw.flag_text(0) == f"10 kept / {st.flag_counts(1).passed} pass"
    texts = [t.get_text() for ax in layerwise_purification(lw).axes for t in ax.texts]
    assert lw.flag_text(0) in texts and lw.flag_text(1) in texts
    titles = [a.text for a in layerwise_purification_plotly(lw).layout.annotations]
    assert lw.flag_text(0) in titles
