"""Tests of sfp.viz.figures: every family on a random and a synthetic ViT-S/16, the writers,
the CLI.

Figures are checked by structure (panels, colour bars, traces, image shapes = the patch grid,
titles naming the model and "synthetic (planted outliers)") and, where the planted model
makes it possible, by what they show (outliers found where they were planted, removed after
SOM).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sfp.core.io import sample_images
from sfp.core.outliers import layer_statistics
from sfp.core.probe import record
from sfp.methods.config import SFPConfig
from sfp.methods.encoders import make_encoder
from sfp.models.synthetic import planted_model, synthetic_scene
from sfp.viz.figures import (
    SYNTHETIC_TAG,
    agreement_data,
    default_layers,
    default_purification_layers,
    detector_agreement,
    detector_agreement_plotly,
    external_urls,
    image_view,
    jaccard,
    layerwise_data,
    layerwise_purification,
    layerwise_purification_plotly,
    norm_maps,
    norm_maps_plotly,
    outlier_grid,
    outlier_grid_data,
    outlier_grid_plotly,
    pca_rgb,
    propagation,
    propagation_data,
    propagation_plotly,
    save_figure,
    som_detections,
    som_detections_data,
    som_detections_plotly,
    stage_ablation,
    stage_ablation_data,
    stage_ablation_plotly,
    style,
    write_plotly_page,
)
from sfp.viz.figures.views import patch_index

CLASSES = "background; cat; person; grass"
TEMPLATES = ["a photo of a {}."]


# --------------------------------------------------------------------------------------------
# fixtures: one model, view, trace and data set per case, computed once
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_s16():
    # 6 cells: on the 14 x 20 grid below, where positions that share a resized priority can
    # both be planted, the count stays within SOM's top_k = 10
    return planted_model("ViT-S-16", seed=0, n_outliers=6)


def _main_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _title(fig) -> str:
    return fig._suptitle.get_text() if fig._suptitle is not None else ""


class Case:
    """Everything the figure tests need for one model."""

    def __init__(self, bundle, truth, view):
        self.bundle, self.truth, self.view = bundle, truth, view
        self.trace = record(bundle, view.pixels)
        self.stats = layer_statistics(self.trace, self.trace.layers,
                                      ["som", "l2", "lof", "norm_z"])
        self.grid = self.trace.grid
        self.synthetic = bundle.is_synthetic
        self.depth = bundle.num_layers


@pytest.fixture(scope="module", params=["random", "synthetic"])
def case(request, tiny_vit, synthetic_s16):
    if request.param == "random":
        # A random 6-block ViT (conftest): depth-dependent defaults get exercised too.
        view = image_view(tiny_vit, sample_images()["chelsea"], name="chelsea")
        return Case(tiny_vit, None, view)
    bundle, truth = synthetic_s16
    # A non-square generated scene: grid 14 x 20.
    view = image_view(bundle, synthetic_scene(3, 224, 320), crop=False, name="scene")
    return Case(bundle, truth, view)


def _check_title(fig_title: str, case: Case) -> None:
    assert case.bundle.label in fig_title
    assert (SYNTHETIC_TAG in fig_title) == case.synthetic


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def test_default_layers_follow_depth():
    assert default_layers(12) == [1, 6, 8, 11]
    assert default_layers(24) == [2, 12, 16, 22]
    assert default_layers(6) == [1, 3, 4, 6]
    assert default_purification_layers(12) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert default_purification_layers(24) == [4, 6, 8, 10, 12, 14, 16, 18]


def test_patch_index():
    assert patch_index(None, (14, 20)) == 7 * 20 + 10
    assert patch_index((2, 3), (14, 20)) == 43
    with pytest.raises(ValueError):
        patch_index((14, 0), (14, 20))


def test_jaccard_values():
    a = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    b = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=bool)
    j = jaccard(a, b)
    assert j[0] == pytest.approx(1 / 3)
    assert np.isnan(j[1])


def test_pca_rgb_shared_basis():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    a, b = pca_rgb(x, x)
    assert a.shape == (50, 3) and np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


# --------------------------------------------------------------------------------------------
# 1. outlier grid
# --------------------------------------------------------------------------------------------


def test_outlier_grid(case):
    d = outlier_grid_data(case.trace, case.view.rgb)
    fig = outlier_grid(d)
    gh, gw = case.grid
    assert len(_main_axes(fig)) == 7 * 4
    assert len(_colorbars(fig)) == 6 * 4  # every continuous panel, not the mask row
    _check_title(_title(fig), case)
    assert "layers " + ", ".join(map(str, default_layers(case.depth))) in _title(fig)
    axes = np.array(_main_axes(fig)).reshape(7, 4)
    assert axes[0, 0].images[0].get_array().shape == (gh * gw, gh * gw)
    for r in (1, 3, 5):
        assert axes[r, 2].images[0].get_array().shape == (gh, gw)
    # overlays: the image below, the map at grid resolution above
    assert axes[2, 1].images[0].get_array().shape == case.view.rgb.shape
    assert axes[2, 1].images[1].get_array().shape == (gh, gw)
    # the cleaned map is the selected patch's attention with the flagged patches zeroed
    layer = d.layers[-1]
    clean = d.patch_map_clean(layer)
    assert np.all(clean[d.masks[layer]] == 0)
    assert np.array_equal(clean[~d.masks[layer]], d.patch_map(layer)[~d.masks[layer]])

    figp = outlier_grid_plotly(d)
    assert len(figp.data) == 4 * (7 + 3 + 3)  # heatmaps, images under overlays, stars
    assert (SYNTHETIC_TAG in figp.layout.title.text) == case.synthetic
    if case.synthetic:
        # SOM as the notebook computes it (eq. 4, no top-k) finds exactly the planted tokens
        late = case.truth.onset_layer + 2
        d = outlier_grid_data(case.trace, case.view.rgb, layers=[late],
                              detector_params={"top_k": None, "cls_scale": 1.0},
                              as_released=False)
        planted = case.truth.mask(case.view.pixels)[0].numpy()
        assert planted.sum() > 0
        assert np.array_equal(d.masks[late], planted)


def test_outlier_grid_options(case):
    d = outlier_grid_data(case.trace, None, layers=[2, 4, 6], detector="l2", head=1,
                          patch=(1, 2), as_released=False)
    fig = outlier_grid(d)
    assert "sfp variant" in _title(fig) and "as released" not in _title(fig)
    assert len(_main_axes(fig)) == 7 * 3
    assert "head 1" in _title(fig) and "l2" in _title(fig)
    assert d.patch == 1 * case.grid[1] + 2
    assert all(m.sum() == 10 for m in d.masks.values())  # l2 flags its top 10
    att = case.trace.attention(4)[0, 1].numpy()
    np.testing.assert_allclose(d.attention[4], att)
    with pytest.raises(ValueError, match="head"):
        outlier_grid_data(case.trace, None, head=99, as_released=False)


def test_outlier_grid_as_released_by_hand(case):
    d = outlier_grid_data(case.trace, case.view.rgb)
    assert d.as_released and "as released" in _title(outlier_grid(d))
    gh, gw = case.grid
    assert d.patch == (gh // 2) * gw + gw // 2
    for layer in d.layers:
        # the notebook: head mean, then the class token's row (patch columns) x 1.5
        a = case.trace.attention(layer)[0].double().numpy().mean(axis=0)
        a[0, 1:] *= 1.5
        np.testing.assert_allclose(d.attention[layer], a, rtol=1e-5, atol=1e-7)
        # outliers: 1.5 A[cls, i] > A[i, i] for every patch, no top-k
        want = np.array([a[0, 1 + i] > a[1 + i, 1 + i] for i in range(gh * gw)])
        assert np.array_equal(d.masks[layer].reshape(-1), want)
        # row 7: patch 105's (here: the centre's) attention with the outliers zeroed
        row = a[1 + d.patch, 1:].copy()
        row[want] = 0.0
        np.testing.assert_allclose(d.patch_map_clean(layer).reshape(-1), row, rtol=1e-5,
                                   atol=1e-7)
    for bad in ({"head": 0}, {"detector": "l2"}, {"detector_params": {"top_k": 3}}):
        with pytest.raises(ValueError, match="as_released=False"):
            outlier_grid_data(case.trace, None, **bad)


def test_as_released_patch_105_and_squashed_view(tiny_vit, vit_b16) -> None:
    # columns 0..89 red, the rest blue, 100 x 300: squashing keeps the whole width (red ends
    # at column 90 * 224 / 300 = 67.2), the centre crop (columns 100..200) has no red
    img = np.zeros((100, 300, 3), dtype=np.uint8)
    img[:, :90, 0] = 255
    img[:, 90:, 2] = 255
    sq = image_view(tiny_vit, img, squash=True)
    assert sq.rgb.shape == (224, 224, 3)
    assert sq.rgb[:, :64, 0].min() > 0.99 and sq.rgb[:, :64, 2].max() < 0.01
    assert sq.rgb[:, 71:, 2].min() > 0.99 and sq.rgb[:, 71:, 0].max() < 0.01
    cropped = image_view(tiny_vit, img)  # the centre crop sees no red at all
    assert cropped.rgb[..., 0].max() < 0.01
    view = image_view(vit_b16, img, squash=True)
    d = outlier_grid_data(record(vit_b16, view.pixels, layers=[1]), view.rgb, layers=[1])
    assert d.grid == (14, 14) and d.patch == 105


# --------------------------------------------------------------------------------------------
# 2. propagation
# --------------------------------------------------------------------------------------------


def test_propagation(case):
    d = propagation_data(case.trace, case.view.rgb, stats=case.stats)
    n_l = case.depth
    assert d.layers == list(range(1, n_l + 1))
    assert d.detectors == ["som", "l2", "lof", "norm_z"]
    assert d.norms.shape == (n_l, *case.grid)
    np.testing.assert_allclose(d.max_norm, d.norms.reshape(n_l, -1).max(-1), rtol=1e-5)
    fig = propagation(d)
    assert len(_main_axes(fig)) == 5 and len(_colorbars(fig)) == 1
    _check_title(_title(fig), case)
    per = d.persistence["som"]
    assert per.shape == (n_l, n_l) and np.all(np.isnan(per[np.tril_indices(n_l)]))
    if case.synthetic:
        # planted outliers: norms jump at the onset layer and SOM's flags persist after it
        onset = case.truth.onset_layer
        ratio = d.max_norm / d.median_norm
        assert ratio[onset - 1] > 5 > ratio[onset - 2]
        # (SOM keeps its top 10 of the scene's planted tokens, so a few may swap places)
        early, late = np.nanmean(per[: onset - 1]), np.nanmean(per[onset:])
        assert late > 0.5 > early
        assert d.max_cls_attention[onset] > 10 * d.uniform_attention

    figp = propagation_plotly(d)
    # l2 has no criterion (every patch passes), lof / norm_z keep every candidate: only a
    # top-k detector that dropped candidates (SOM) gets a dotted "passed" line.
    assert set(d.cut_detectors()) <= {"som"}
    assert len(figp.data) == 2 + 2 + 4 + len(d.cut_detectors()) + 1

    fig = norm_maps(d, detector="som")
    n_panels = int(np.ceil(n_l / min(6, n_l))) * min(6, n_l)
    assert len(_main_axes(fig)) == n_panels and len(_colorbars(fig)) == 1
    assert _main_axes(fig)[n_l - 1].images[0].get_array().shape == case.grid
    _check_title(_title(fig), case)
    figp = norm_maps_plotly(d)
    assert len(figp.frames) == n_l


# --------------------------------------------------------------------------------------------
# 3. detector agreement
# --------------------------------------------------------------------------------------------


def test_detector_agreement(case):
    d = agreement_data(case.trace, stats=case.stats)
    n = len(d.detectors)
    assert d.jaccard.shape == (case.depth, n, n)
    np.testing.assert_allclose(d.jaccard, d.jaccard.transpose(0, 2, 1), equal_nan=True)
    masks = case.stats.masks
    k = case.depth - 2
    expected = jaccard(masks["som"][k, 0], masks["l2"][k, 0])
    i, j = d.detectors.index("som"), d.detectors.index("l2")
    np.testing.assert_allclose(d.jaccard[k, i, j], expected, equal_nan=True)
    fig = detector_agreement(d)
    assert len(_main_axes(fig)) == len(default_layers(case.depth)) + 1
    assert len(_colorbars(fig)) == 1
    _check_title(_title(fig), case)
    assert len(detector_agreement_plotly(d).data) == 1 + n * (n - 1) // 2
    if case.synthetic:
        # once the sinks form (layer onset + 1 on), every token SOM flags is one of the
        # planted high-norm tokens that norm_z flags: J = |som| / |norm_z|
        z = d.detectors.index("norm_z")
        for k in range(case.truth.onset_layer, case.depth):
            assert d.counts[k, z] >= d.counts[k, i] > 0
            assert d.jaccard[k, i, z] == pytest.approx(d.counts[k, i] / d.counts[k, z])


# --------------------------------------------------------------------------------------------
# 4. stage ablation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablation(case):
    # With the trace, CLIP's and SCLIP's columns reuse its hidden states (as render_image does).
    return stage_ablation_data(case.bundle, case.view, CLASSES, baselines=("sclip",),
                               templates=TEMPLATES, trace=case.trace)


def test_stage_ablation(case, ablation):
    d = ablation
    assert d.columns == ["CLIP", "+SOM", "+SOM+SAE", "SFP", "SCLIP"]
    gh, gw = case.grid
    assert d.tokens.shape[:2] == (5, gh * gw) and d.features.shape[:2] == (5, gh * gw)
    assert d.labels.shape == (5, gh * 16, gw * 16)
    assert d.labels.max() < 4
    np.testing.assert_allclose(d.cosine(0, 0), 1.0, atol=1e-5)
    fig = stage_ablation(d)
    assert len(_main_axes(fig)) == 2 * 6 and len(_colorbars(fig)) == 5
    _check_title(_title(fig), case)
    assert _main_axes(fig)[1].images[0].get_array().shape == (gh, gw)
    fig = stage_ablation(d, mode="pca", space="features")
    assert len(_colorbars(fig)) == 0
    assert _main_axes(fig)[1].images[0].get_array().shape == (gh, gw, 3)
    figp = stage_ablation_plotly(d)
    present = [d.class_names[c] for c in np.unique(d.labels)]
    legend = [t.name for t in figp.data if getattr(t, "showlegend", None)]
    assert len(figp.data) == 3 * 5 + len(present) and legend == present  # class legend
    assert sum(1 for t in figp.data if t.type == "heatmap" and t.showscale) == 5  # colour bars
    # the columns taken from the trace equal the encoders' own forwards
    for k, method in ((0, "clip"), (4, "sclip")):
        own = make_encoder(case.bundle, method).encode_tokens(case.view.pixels)[0, 1:]
        np.testing.assert_allclose(d.tokens[k], own.numpy(), rtol=1e-4, atol=1e-3)
    if case.synthetic:
        # SOM finds planted outliers, and mitigation removes their massive norm
        planted = case.truth.mask(case.view.pixels)[0].numpy()
        assert d.outliers.sum() > 0 and np.all(planted[d.outliers])
        clip_norm, som_norm = d.norms(0), d.norms(1)
        assert clip_norm[d.outliers].min() > 5 * np.median(clip_norm)
        assert som_norm[d.outliers].max() < 2 * np.median(som_norm)


# --------------------------------------------------------------------------------------------
# 5. layer-wise purification and SOM detections
# --------------------------------------------------------------------------------------------


def test_layerwise_purification(case):
    # The paper preset with SOM's top-10 cap (an option the design keeps): fewer mitigations.
    d = layerwise_data(case.bundle, case.view, plain_trace=case.trace,
                       config=SFPConfig.paper(top_k=10))
    assert d.layers == default_purification_layers(case.depth)
    n, n_tok = len(d.layers), case.grid[0] * case.grid[1]
    assert d.raw.shape[:2] == (n, n_tok) and d.purified.shape == d.raw.shape
    np.testing.assert_allclose(d.raw[0], case.trace.hidden(d.layers[0])[0, 1:].numpy())
    fig = layerwise_purification(d)
    assert len(_main_axes(fig)) == 2 * n and len(_colorbars(fig)) == n
    _check_title(_title(fig), case)
    assert "paper Fig. 5" in _title(fig)
    fig = layerwise_purification(d, mode="pca", over_image=False)
    assert _main_axes(fig)[0].images[0].get_array().shape == (*case.grid, 3)
    figp = layerwise_purification_plotly(d)
    assert len(figp.data) == 2 * n + n  # two heatmaps per layer, row (b)'s flag boxes
    boxes = [t for t in figp.data if t.type == "scatter"]
    assert [len(t.x) for t in boxes] == [int(m.sum()) for m in d.masks]  # the caption's boxes
    assert sum(1 for t in figp.data if t.type == "heatmap" and t.showscale) == n
    jet = style.plotly_colorscale(style.OVERLAY_CMAP)
    assert figp.data[0].colorscale[0][1] == jet[0][1] == "rgb(0,0,128)"  # matplotlib's jet
    if case.synthetic:
        raw, pur = d.norm_maps()
        k = d.layers.index(case.truth.onset_layer + 2)
        assert raw[k].max() > 5 * np.median(raw[k])  # outliers propagate without SOM
        # per-layer SOM (top 10 of the scene's planted tokens) removes the massive ones
        assert pur[k].max() < 0.25 * raw[k].max()


def test_som_detections(case):
    views = [case.view, image_view(case.bundle, sample_images()["coffee"], name="coffee")]
    d = som_detections_data(case.bundle, views)
    assert d.layer == case.depth - 1 and d.names[1] == "coffee"
    fig = som_detections(d)
    assert len(_main_axes(fig)) == 4 and len(_colorbars(fig)) == 2
    _check_title(_title(fig), case)
    assert _main_axes(fig)[2].images[0].get_array().shape == case.grid
    assert len(som_detections_plotly(d).data) == 3 * 2
    reuse = som_detections_data(case.bundle, [case.view], traces=[case.trace])
    assert int(reuse.masks[0].sum()) == int(d.masks[0].sum())
    assert np.array_equal(reuse.masks[0], d.masks[0])


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------


def test_writers_offline(tmp_path, case):
    d = propagation_data(case.trace, stats=case.stats)
    paths = save_figure(propagation(d), tmp_path / "prop", formats=("png", "svg"), dpi=40)
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size for p in paths)
    svg = paths[1].read_text(encoding="utf-8")
    assert "<text" in svg and "(a) patch-token L2 norm" in svg  # text stays text
    assert case.bundle.label in svg
    page = write_plotly_page(tmp_path / "p.html", [("prop", propagation_plotly(d))],
                             title="t", banner="b")
    text = page.read_text(encoding="utf-8")
    assert external_urls(text) == []
    assert "cdn.plot.ly" not in text.split("<body>")[1]
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js is inlined


def test_external_urls_detects_resources():
    page = ('<script src="https://cdn.plot.ly/plotly.min.js"></script>'
            '<link rel="stylesheet" href="//fonts.example.com/a.css">'
            '<img src="http://example.com/x.png"><a href="https://example.com">ok</a>'
            '<style>@import url("https://x.org/y.css");</style>'
            '<img src="data:image/png;base64,AAAA">')
    assert sorted(external_urls(page)) == sorted([
        "https://cdn.plot.ly/plotly.min.js", "//fonts.example.com/a.css",
        "http://example.com/x.png", "https://x.org/y.css"])
    assert external_urls('<script>var a = "<a href=\\"https://plotly.com\\">";</script>') == []


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_figures_writes_expected_files(tmp_path, tiny_vit, monkeypatch, capsys):
    import sfp.cli.app as cli
    from sfp.cli import common

    img = tmp_path / "photo one.png"
    Image.fromarray(sample_images()["astronaut"]).save(img)
    out = tmp_path / "figs"
    monkeypatch.setattr(common, "load_bundle_from_args", lambda args: tiny_vit)
    rc = cli.main(["figures", "--image", str(img), "--out", str(out), "--model", "ViT-S-16",
                   "--pretrained", "random", "--templates", "simple", "--classes",
                   "cat; person", "--formats", "png", "--dpi", "40", "--baselines", "",
                   "--layers", "2,5"])
    assert rc == 0
    sub = out / "photo_one"
    for key in ("outlier_grid", "propagation", "norm_maps", "detector_agreement",
                "stage_ablation", "layerwise_purification"):
        assert (sub / f"{key}.png").is_file(), key
    assert (sub / "interactive.html").is_file() and (out / "som_detections.png").is_file()
    index = (out / "index.html").read_text(encoding="utf-8")
    assert 'href="photo_one/outlier_grid.png"' in index
    assert 'href="photo_one/interactive.html"' in index
    assert tiny_vit.label in index
    for page in (index, (sub / "interactive.html").read_text(encoding="utf-8")):
        assert external_urls(page) == []
    err = capsys.readouterr().err
    assert "9/9" in err  # the progress bar: 7 render steps + the page, then Fig. 2 + index
    assert err.count("not a pretrained CLIP") == 1  # random weights: said once
    with Image.open(sub / "outlier_grid.png") as im:  # ... and inside every picture
        assert im.text["sfp:provenance"] == "random" and "sfp:caveat" in im.text


def test_cli_figures_parser():
    from sfp.cli.app import build_parser

    args = build_parser().parse_args(["figures", "--image", "a.png", "--out", "o", "--synthetic",
                                      "--layers", "2,4,6", "--head", "3", "--patch", "4,5"])
    assert args.layers == [2, 4, 6] and args.head == 3 and args.patch == (4, 5)
    assert args.synthetic and args.detector == "som"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["figures", "--image", "a", "--out", "o", "--layers", "x"])


def test_figures_accept_non_square_grid_without_image(synthetic_s16):
    bundle, _ = synthetic_s16
    x = torch.zeros(1, 3, 160, 320)
    trace = record(bundle, x, layers=[6, 7])
    fig = outlier_grid(trace, None, layers=[6, 7])
    axes = np.array(_main_axes(fig)).reshape(7, 2)
    assert axes[1, 0].images[0].get_array().shape == (10, 20)


def test_cli_figures_checks_inputs_before_loading(tmp_path, monkeypatch, capsys):
    import sfp.cli.app as cli
    from sfp.cli import common

    def no_load(args):  # pragma: no cover - must not be reached
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(common, "load_bundle_from_args", no_load)
    rc = cli.main(["figures", "--image", str(tmp_path / "missing.png"), "--out",
                   str(tmp_path / "o")])
    assert rc == 2 and "missing.png: no such file" in capsys.readouterr().err
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    with pytest.raises(SystemExit):  # argparse names the registered detectors
        cli.main(["figures", "--image", str(img), "--out", str(tmp_path / "o"), "--detector",
                  "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    # one head is the sfp variant's: refused (before loading) unless --no-as-released
    rc = cli.main(["figures", "--image", str(img), "--out", str(tmp_path / "o"), "--head", "2"])
    assert rc == 2 and "--no-as-released" in capsys.readouterr().err
    from sfp.cli.app import build_parser

    args = build_parser().parse_args(["figures", "--image", "a", "--out", "o"])
    assert args.as_released is True
    args = build_parser().parse_args(["figures", "--image", "a", "--out", "o",
                                      "--no-as-released"])
    assert args.as_released is False


def test_data_or_build_refuses_options_with_ready_data():
    from dataclasses import dataclass as _dc

    from sfp.viz.figures.style import data_or_build

    @_dc
    class Ready:
        value: int

    built = data_or_build(3, Ready, lambda s, k=1: Ready(s * k), (), {"k": 2})
    assert built == Ready(6)
    ready = Ready(1)
    assert data_or_build(ready, Ready, None, (None,), {}) is ready
    with pytest.raises(TypeError, match="pass either Ready or a trace with options"):
        data_or_build(ready, Ready, None, ("image",), {})
    with pytest.raises(TypeError, match="not both"):
        data_or_build(ready, Ready, None, (), {"k": 2})
