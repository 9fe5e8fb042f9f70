"""Tests for sfp.viz.widgets: drive every widget from Python and check what its figures show.

Models: the synthetic ViT-S-16 (planted outliers, known positions) and a tiny random ViT.
One trace per model is recorded per module; images are 224 px (synthetic) and 64 px (tiny).
"""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from conftest import make_tiny_bundle
from PIL import Image
from plotly.callbacks import Points

from sfp.core.io import normalize
from sfp.core.outliers import available_detectors, detect, layer_statistics
from sfp.core.probe import record
from sfp.methods.config import SFPConfig
from sfp.methods.purify import SFPEncoder
from sfp.models.synthetic import planted_model, synthetic_scene
from sfp.seg.metrics import ConfusionAccumulator
from sfp.seg.pipeline import Segmenter, postprocess
from sfp.viz.widgets import (
    SYNTHETIC_LABEL,
    OutlierExplorer,
    PropagationView,
    StageComparison,
    ThresholdTuner,
)
from sfp.viz.widgets._common import label_colors, patch_at, patch_centers

logging.getLogger("sfp.models.loading").setLevel(logging.ERROR)

CLASSES = "background; stripes; checkerboard"


# --------------------------------------------------------------------------------------------
# fixtures (module scope: one model and one trace each)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    """Synthetic ViT-S-16 with planted outliers, a 224 px scene and its trace."""
    bundle, truth = planted_model("ViT-S-16", seed=0)
    scene = synthetic_scene(0)  # (3, 224, 224) in [0, 1]
    x = normalize(scene, bundle)[None]
    trace = record(bundle, x)
    return bundle, truth, scene, x, trace


@pytest.fixture(scope="module")
def tiny():
    """Tiny random ViT (6 blocks, 64 px: a 4 x 4 grid) and its trace."""
    bundle = make_tiny_bundle()
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 64, 64, generator=g)
    x = normalize(img, bundle)[None]
    return bundle, img, x, record(bundle, x)


def _z(fig_trace) -> np.ndarray:
    return np.asarray(fig_trace.z, dtype=np.float64)


def _png(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    data = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _marker_indices(scatter, grid, patch_px) -> list[int]:
    xs, ys = np.asarray(scatter.x, dtype=float), np.asarray(scatter.y, dtype=float)
    return sorted(patch_at(x, y, grid, patch_px) for x, y in zip(xs, ys, strict=True))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def test_patch_geometry_round_trip():
    grid, px = (3, 5), (16.0, 16.0)
    xs, ys = patch_centers(np.arange(15), grid, px)
    assert [patch_at(x, y, grid, px) for x, y in zip(xs, ys, strict=True)] == list(range(15))
    assert patch_at(-1.0, 3.0, grid, px) is None
    assert patch_at(80.0, 3.0, grid, px) is None  # x = 80 is the right border of column 4
    assert patch_at(79.9, 47.9, grid, px) == 14


# --------------------------------------------------------------------------------------------
# OutlierExplorer
# --------------------------------------------------------------------------------------------


def test_explorer_layer_slider_updates_cls_map(planted):
    bundle, truth, scene, x, trace = planted
    ex = OutlierExplorer(trace, x)
    l0 = ex.layer
    expected = trace.to_grid(trace.cls_attention(l0).mean(1))[0].numpy()
    np.testing.assert_allclose(_z(ex.heatmap), expected, rtol=1e-6)
    for layer in (3, 9):
        ex.layer_slider.value = layer
        expected = trace.to_grid(trace.cls_attention(layer).mean(1))[0].numpy()
        np.testing.assert_allclose(_z(ex.heatmap), expected, rtol=1e-6)
        assert f"layer {layer}" in ex.figure.layout.title.text
    assert SYNTHETIC_LABEL in ex.figure.layout.title.text
    assert SYNTHETIC_LABEL in ex.children[0].value


def test_explorer_heads_and_maps(planted):
    bundle, truth, scene, x, trace = planted
    ex = OutlierExplorer(trace, scene, layer=8)
    ex.head_dropdown.value = 2
    np.testing.assert_allclose(_z(ex.heatmap),
                               trace.to_grid(trace.cls_attention(8)[:, 2])[0].numpy(), rtol=1e-6)
    ex.map_dropdown.value = "self"
    np.testing.assert_allclose(_z(ex.heatmap),
                               trace.to_grid(trace.self_attention(8)[:, 2])[0].numpy(),
                               rtol=1e-6)
    ex.head_dropdown.value = -1
    ex.map_dropdown.value = "norm"
    assert ex.head_dropdown.disabled
    np.testing.assert_allclose(_z(ex.heatmap), trace.to_grid(trace.token_norms(8))[0].numpy(),
                               rtol=1e-6)
    ex.log_checkbox.value = True
    np.testing.assert_allclose(_z(ex.heatmap),
                               np.log10(trace.to_grid(trace.token_norms(8))[0].numpy()),
                               rtol=1e-5)
    ex.log_checkbox.value = False
    ex.map_dropdown.value = "score"
    ex.detector_dropdown.value = "norm_z"
    np.testing.assert_allclose(_z(ex.heatmap),
                               trace.to_grid(detect("norm_z", trace, 8).scores)[0].numpy(),
                               rtol=1e-6)
    ex.map_dropdown.value = "from_patch"
    ex.select_patch(37)
    a = trace.mean_attention(8)[0]
    np.testing.assert_allclose(_z(ex.heatmap), a[38, 1:].reshape(trace.grid).numpy(), rtol=1e-6)
    ex.map_dropdown.value = "to_patch"
    np.testing.assert_allclose(_z(ex.heatmap), a[1:, 38].reshape(trace.grid).numpy(), rtol=1e-6)
    ex.opacity_slider.value = 0.3
    assert ex.heatmap.opacity == pytest.approx(0.3)


def test_explorer_flag_markers_equal_detector_masks(planted):
    bundle, truth, scene, x, trace = planted
    ex = OutlierExplorer(trace, x, layer=10)
    for det in available_detectors():
        ex.detector_dropdown.value = det
        want = np.flatnonzero(detect(det, trace, 10, **ex.detector_params()).mask[0].numpy())
        assert list(ex.flag_markers.customdata) == want.tolist(), det
        assert _marker_indices(ex.flag_markers, ex.grid, ex.patch_px) == want.tolist()
    ex.detector_dropdown.value = "som"
    ex.top_k_slider.value = 3
    assert ex.detector_params() == {"top_k": 3, "cls_scale": 1.5}
    want = detect("som", trace, 10, top_k=3, cls_scale=1.5).mask[0]
    assert list(ex.flag_markers.customdata) == np.flatnonzero(want.numpy()).tolist()
    assert len(ex.flag_markers.x) == 3
    # only the detector's own parameters are shown
    assert ex.top_k_slider.layout.display == ""
    assert ex.threshold_slider.layout.display == "none"
    ex.show_flags_checkbox.value = False
    assert len(ex.flag_markers.x) == 0


def test_explorer_ground_truth_and_som_recover_planted_tokens(planted):
    bundle, truth, scene, x, trace = planted
    ex = OutlierExplorer(trace, x, truth=truth, layer=truth.onset_layer + 2)
    planted_idx = np.flatnonzero(truth.mask(x)[0].numpy()).tolist()
    assert planted_idx and list(ex.truth_markers.customdata) == planted_idx
    ex.top_k_slider.value = 20
    assert list(ex.flag_markers.customdata) == planted_idx  # SOM finds exactly the planted
    assert f"recovered {len(planted_idx)}/{len(planted_idx)}" in ex.status.value
    # a mask tensor works as well as the PlantedTruth object
    ex2 = OutlierExplorer(trace, scene, truth=truth.mask(x))
    assert list(ex2.truth_markers.customdata) == planted_idx
    with pytest.raises(ValueError, match="PlantedTruth"):
        OutlierExplorer(trace, scene, truth=truth)


def test_explorer_click_selects_patch(planted):
    bundle, truth, scene, x, trace = planted
    ex = OutlierExplorer(trace, x, map="from_patch", layer=7)
    # patch 16 px: pixel (40, 20) is row 1, col 2 -> patch 16
    ex._on_click(ex.heatmap, Points(point_inds=[[1, 2]], xs=[40.0], ys=[20.0],
                                    trace_name="map", trace_index=1))
    assert ex.selected_patch == 16
    assert list(ex.selection_marker.customdata) == [16]
    assert list(ex.selection_marker.x) == [40.0] and list(ex.selection_marker.y) == [24.0]
    a = trace.mean_attention(7)[0]
    np.testing.assert_allclose(_z(ex.heatmap), a[17, 1:].reshape(trace.grid).numpy(), rtol=1e-6)
    assert "selected patch 16 (row 1, col 2)" in ex.status.value
    ex._on_click(ex.heatmap, Points(point_inds=[], xs=[], ys=[], trace_name="map",
                                    trace_index=1))
    assert ex.selected_patch == 16  # empty clicks are ignored
    with pytest.raises(ValueError):
        ex.select_patch(10_000)


def test_explorer_static_figure_and_display_sync(planted):
    bundle, truth, scene, x, trace = planted
    ex = OutlierExplorer(trace, x)
    ex.layer_slider.value = 4
    fig = ex.to_figure()
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    heat = [t for t in fig.data if t.meta == "map"][0]
    np.testing.assert_allclose(np.asarray(heat.z),
                               trace.to_grid(trace.cls_attention(4).mean(1))[0].numpy(),
                               rtol=1e-6)
    bundle_ = ex._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle_
    # displaying syncs the traits plotly's anywidget view renders a child figure from
    synced = [t for t in ex.figure._widget_data if t.get("meta") == "map"][0]
    np.testing.assert_allclose(np.asarray(synced["z"]), np.asarray(heat.z))


def test_explorer_random_model_without_attention(tiny):
    bundle, img, x, _ = tiny
    trace = record(bundle, x, store=("hidden",))
    ex = OutlierExplorer(trace, img, map="norm", detector="lof")
    assert [v for _, v in ex.map_dropdown.options] == ["norm", "score"]
    assert "som" not in ex.detector_dropdown.options
    assert ex.n_neighbors_slider.value == 15  # at most N - 1 for a 4 x 4 grid
    want = detect("lof", trace, ex.layer, n_neighbors=15, contamination=0.05).mask[0]
    assert list(ex.flag_markers.customdata) == np.flatnonzero(want.numpy()).tolist()
    assert "random" in ex.figure.layout.title.text
    assert SYNTHETIC_LABEL not in ex.figure.layout.title.text
    with pytest.raises(ValueError, match="map"):
        OutlierExplorer(trace, img, map="cls")


# --------------------------------------------------------------------------------------------
# PropagationView
# --------------------------------------------------------------------------------------------


def test_propagation_curves_and_token_selection(planted):
    bundle, truth, scene, x, trace = planted
    view = PropagationView(trace, x, truth=truth)
    stats = layer_statistics(trace, trace.layers, view.detectors)
    c = view._curve
    np.testing.assert_allclose(c["max_norm"].y, stats.max_norm[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(c["median_norm"].y, stats.median_norm[:, 0].numpy(), rtol=1e-6)
    max_cls = [float(trace.cls_attention(l).mean(1)[0].max()) for l in trace.layers]
    np.testing.assert_allclose(c["max_cls"].y, max_cls, rtol=1e-6)
    for d in view.detectors:
        np.testing.assert_array_equal(c[f"count_{d}"].y, stats.counts[d][:, 0].numpy())
    assert SYNTHETIC_LABEL in view.map_figure.layout.title.text

    token = int(np.flatnonzero(truth.mask(x)[0].numpy())[0])
    view.select_token(token)
    assert view.token_input.value == token
    norms = [float(trace.token_norms(l)[0, 1 + token]) for l in trace.layers]
    np.testing.assert_allclose(c["sel_norm"].y, norms, rtol=1e-6)
    cls = [float(trace.cls_attention(l).mean(1)[0, token]) for l in trace.layers]
    np.testing.assert_allclose(c["sel_cls"].y, cls, rtol=1e-6)
    for d in view.detectors:
        flagged_at = [l for i, l in enumerate(trace.layers) if stats.masks[d][i, 0, token]]
        assert list(c[f"flag_{d}"].x) == flagged_at
    # SOM flags the planted token from the layer after the onset on (the sinks start there)
    assert list(c["flag_som"].x) == list(range(truth.onset_layer + 1, trace.num_layers + 1))
    assert list(view._map["selected"].customdata) == [token]

    view.layer_slider.value = 5
    assert view.curves.layout.shapes[0].x0 == 5
    np.testing.assert_allclose(_z(view._map["map"]),
                               trace.to_grid(trace.token_norms(5))[0].numpy(), rtol=1e-6)
    view.map_dropdown.value = "cls"
    np.testing.assert_allclose(_z(view._map["map"]),
                               trace.to_grid(trace.cls_attention(5).mean(1))[0].numpy(),
                               rtol=1e-6)
    view.mark_dropdown.value = "l2"
    assert list(view._map["flagged"].customdata) == np.flatnonzero(
        stats.masks["l2"][4, 0].numpy()).tolist()

    view._on_click(view._map["map"], Points(point_inds=[0], xs=[8.0], ys=[8.0],
                                            trace_name="map", trace_index=1))
    assert view.selected_token == 0 and view.token_input.value == 0
    view.token_input.value = -1
    assert view.selected_token is None and len(view._curve["sel_norm"].y) == 0
    fig = view.to_figure()
    assert isinstance(fig, go.Figure) and len(fig.data) == len(view.curves.data) + len(
        view.map_figure.data)


def test_propagation_tiny_random_model(tiny):
    bundle, img, x, trace = tiny
    view = PropagationView(trace, img)
    assert view.layers == list(range(1, 7))
    view.select_token(5)
    np.testing.assert_allclose(view._curve["sel_norm"].y,
                               [float(trace.token_norms(l)[0, 6]) for l in range(1, 7)],
                               rtol=1e-6)
    with pytest.raises(ValueError):
        PropagationView(record(bundle, x, store=("attention",)))


# --------------------------------------------------------------------------------------------
# StageComparison
# --------------------------------------------------------------------------------------------


def test_stage_comparison(tiny):
    bundle, img, x, trace = tiny
    # the tiny model sees 64 px crops: one 64 x 64 window, a 4 x 4 patch grid
    kw = dict(short_side=64, crop=64, stride=32)
    comp = StageComparison(bundle, img, CLASSES, baselines=("sclip",), **kw)
    assert comp.panels == ["CLIP", "+SOM", "+SOM+SAE", "SFP", "sclip"]
    assert len(comp.figure.data) == 10
    specs = comp.stages
    assert specs["CLIP"] == ("clip", None)
    assert specs["+SOM"][1].sae is False and specs["+SOM"][1].hai is False
    assert specs["+SOM"][1].pre_aggregate is False and specs["+SOM"][1].som is True
    assert specs["+SOM+SAE"][1].sae is True and specs["+SOM+SAE"][1].hai is False
    assert specs["SFP"][1] == SFPConfig.official()

    # outlier marks are the patches SFP's detector flags on the (single) crop
    stages = SFPEncoder(bundle).stages(x)
    mask = stages.mask[0].numpy()
    assert mask.any()
    xs, ys = patch_centers(np.flatnonzero(mask), (4, 4), (16.0, 16.0))
    assert sorted(zip(xs.tolist(), ys.tolist(), strict=True)) == sorted(
        map(tuple, comp.outlier_points.tolist()))
    # the full-SFP panel: cosine logits of those features with the text queries, released
    # post-processing (one window: no resizing, no stitching)
    queries = comp.segmenter("SFP").queries
    feats = torch.nn.functional.normalize(stages.features[0].float(), dim=-1)
    logits = (feats @ queries.embeddings.T).T.reshape(-1, 4, 4)
    logits = torch.nn.functional.interpolate(logits[None], size=(64, 64), mode="bilinear",
                                             align_corners=False)[0]
    labels, _ = postprocess(logits, queries.query_to_class, logit_scale=40.0)
    np.testing.assert_array_equal(comp.segmentations["SFP"].labels.numpy(), labels.numpy())
    # every panel equals its own Segmenter
    seg = Segmenter(bundle, CLASSES, method="sclip", templates="simple", **kw)
    np.testing.assert_array_equal(comp.segmentations["sclip"].labels.numpy(),
                                  seg.predict(img).labels.numpy())

    by_meta = {t.meta: t for t in comp.figure.data}
    for name in comp.panels:
        m = by_meta[f"outliers:{name}"]
        assert len(m.x) == int(mask.sum())
        assert m.marker.symbol == ("x" if name in ("+SOM", "+SOM+SAE", "SFP") else "circle-open")
    # the overlay is the label colours blended over the image
    labels = comp.segmentations["CLIP"].labels.numpy()
    shown = _png(by_meta["image:CLIP"].source).astype(int)
    colors = label_colors(3, comp.segmentations["CLIP"].class_names).astype(float)
    rgb = (comp.image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8).astype(float)
    want = (0.55 * colors[labels] + 0.45 * rgb).clip(0, 255).astype(np.uint8)
    assert np.abs(shown - want.astype(int)).max() <= 1

    comp.show_outliers_checkbox.value = False
    assert all(len(by_meta[f"outliers:{n}"].x) == 0 for n in comp.panels)
    comp.baselines_select.value = ()
    assert comp.panels == ["CLIP", "+SOM", "+SOM+SAE", "SFP"]
    assert comp.figure in comp.children
    assert len(comp.figure.data) == 8
    assert "random" in comp.children[0].value
    assert isinstance(comp.to_figure(), go.Figure)


def test_stage_comparison_labels_synthetic(planted, monkeypatch):
    bundle, truth, scene, x, trace = planted
    # no need to segment for the label: stub the segmentations
    monkeypatch.setattr(StageComparison, "_rebuild", lambda self: None)
    monkeypatch.setattr(StageComparison, "_find_outliers",
                        lambda self: (np.zeros((0, 2)), (16.0, 16.0)))
    comp = StageComparison(bundle, scene, CLASSES)
    assert SYNTHETIC_LABEL in comp.children[0].value


# --------------------------------------------------------------------------------------------
# ThresholdTuner
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuner_setup(planted):
    bundle, truth, scene, x, trace = planted
    g = np.random.default_rng(0)
    mask = g.integers(0, 3, size=(224, 224))
    mask[:10] = 255  # ignored rows
    return bundle, scene, mask


def test_tuner_post_processing_does_not_encode(tuner_setup, monkeypatch):
    bundle, scene, mask = tuner_setup
    calls = {"n": 0}
    original = SFPEncoder.encode_patches

    def counting(self, images):
        calls["n"] += 1
        return original(self, images)

    monkeypatch.setattr(SFPEncoder, "encode_patches", counting)
    tuner = ThresholdTuner(bundle, {"scene": scene}, CLASSES, masks={"scene": mask})
    assert calls["n"] == 1 and tuner.encoder_runs == 1
    assert SYNTHETIC_LABEL in tuner.children[0].value

    tuner.logit_scale_slider.value = 10.0
    tuner.prob_thd_slider.value = 0.4
    tuner.area_thd_slider.value = 0.2
    assert calls["n"] == 1 and tuner.encoder_runs == 1
    assert tuner.last_update["kind"] == "post-processing"
    assert tuner.last_update["encoder_runs"] == 0

    # labels = released post-processing on the cached logits, by hand
    scores = tuner.scores()[0]
    labels, _ = postprocess(scores.upsampled(), scores.query_to_class, logit_scale=10.0,
                            prob_thd=0.4, area_thd=0.2, num_classes=3)
    np.testing.assert_array_equal(tuner.segmentations[0].labels.numpy(), labels.numpy())
    # mIoU by hand: confusion of the non-ignored pixels, IoU = I / (G + P - I), nanmean
    keep = mask != 255
    conf = np.bincount(mask[keep] * 3 + labels.numpy()[keep], minlength=9).reshape(3, 3)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        miou = np.nanmean(np.where(union > 0, inter / union, np.nan))
    assert tuner.miou == pytest.approx(miou)
    acc = ConfusionAccumulator(3).update(labels, mask)
    assert tuner.miou == pytest.approx(acc.summary().miou)
    assert f"mIoU {100 * miou:.2f}" in tuner.figure.layout.title.text

    # encoder-level change: one encode; going back to a cached config: none
    tuner.top_k_slider.value = 3
    assert calls["n"] == 2 and tuner.last_update["kind"] == "encoder"
    assert tuner.current_config() == SFPConfig.official(top_k=3)
    tuner.top_k_slider.value = 10
    assert calls["n"] == 2 and tuner.last_update["encoder_runs"] == 0


def test_tuner_controls_and_config_code(tuner_setup, capsys):
    bundle, scene, mask = tuner_setup
    tuner = ThresholdTuner(bundle, [scene], CLASSES)
    assert tuner.miou is None and tuner.metrics is None
    tuner.couple_checkbox.value = True
    tuner.res_cls_slider.value = 0.2
    assert tuner.cls_scale_slider.value == pytest.approx(1.0)
    assert tuner.current_config() == SFPConfig.official(res_cls=0.2, cls_scale=1.0)
    runs = tuner.encoder_runs
    tuner.set(detector="l2", top_k=None)  # no limit: invalid for l2 -> error shown, no run
    assert "top_k=None" in tuner.status.value and tuner.encoder_runs == runs
    tuner.set(sim_threshold=0.5, top_k=5, logit_scale=50.0)  # one update, one encode
    assert tuner.encoder_runs == runs + 1
    with pytest.raises(ValueError, match="unknown controls"):
        tuner.set(topk=3)
    cfg = tuner.current_config()
    assert cfg == SFPConfig.official(res_cls=0.2, cls_scale=1.0, sim_threshold=0.5,
                                     detector="l2", top_k=5)
    tuner.copy_button.click()  # offers the code in a text field (to copy), prints nothing
    shown = tuner.code_text.value
    assert "SFPConfig.official(" in shown and "Segmenter(bundle" in shown
    assert tuner.code_text.layout.display == "" and capsys.readouterr().out == ""
    code = tuner.config_code()
    ns: dict = {"bundle": bundle}
    exec(code, ns)  # the printed code rebuilds the same settings
    assert ns["config"] == cfg
    seg: Segmenter = ns["segmenter"]
    assert (seg.logit_scale, seg.prob_thd, seg.area_thd, seg.short_side) == (50.0, 0.0, None,
                                                                             224)
    np.testing.assert_array_equal(seg.postprocess(tuner.scores()[0]).labels.numpy(),
                                  tuner.segmentations[0].labels.numpy())
    assert isinstance(tuner.to_figure(), go.Figure)
    tuner.logit_scale_slider.value = 41.00000000000001  # what a slider drag can produce
    assert "logit_scale=41.0," in tuner.config_code()
    with pytest.raises(ValueError, match="masks"):
        ThresholdTuner(bundle, [scene], CLASSES, masks=[mask, mask])


def test_stage_ladder_is_one_object_for_figure_and_widget(tiny):
    from sfp.methods import stages
    from sfp.viz.figures import ablation
    from sfp.viz.figures.ablation import stage_ablation_data
    from sfp.viz.widgets import stages as widget_stages

    assert ablation.stage_ladder is stages.stage_ladder is widget_stages.stage_ladder
    bundle, img, x, trace = tiny
    cfg = SFPConfig.official(top_k=3)
    comp = StageComparison(bundle, img, CLASSES, config=cfg, short_side=64, crop=64, stride=32)
    fig = stage_ablation_data(bundle, img, CLASSES, config=cfg, templates="simple")
    ladder = stages.stage_ladder(cfg)
    assert comp.panels == fig.columns == [name for name, _, _ in ladder]
    assert comp.stages == {name: (method, c) for name, method, c in ladder}
    # the figure's "+SOM" column is the widget's "+SOM" panel: the same switches are off
    assert ladder[1][2] == cfg.replace(sae=False, hai=False, pre_aggregate=False,
                                      post_aggregate=False)


def test_html_export_holds_no_network_script(tiny, tmp_path):
    from sfp.viz.figures import external_urls

    bundle, img, x, trace = tiny
    path = OutlierExplorer(trace, img).save_html(str(tmp_path / "explorer.html"))
    page = open(path, encoding="utf-8").read()
    assert external_urls(page) == []
    assert 'src="https://cdn.plot.ly' not in page and "Plotly.newPlot" in page
