"""Tests of the "where outliers come from" figures on the planted ViT-S/16."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from sfp.core import io
from sfp.models.synthetic import planted_model
from sfp.seg.stats import dataset_stats, image_source
from sfp.viz.figures import (
    coactivation_clustermap,
    dataset_figure,
    neuron_coactivation,
    outlier_sources_data,
    outlier_sources_figure,
)


@pytest.fixture(scope="module")
def s16():
    return planted_model("ViT-S-16", seed=0)


def test_outlier_sources_figure(s16):
    bundle, truth = s16
    arr = io.sample_images()["astronaut"]
    x = io.prepare(arr, bundle)
    d = outlier_sources_data(bundle, x, arr, top=3)
    assert {(l, n) for l, n, _ in d.neurons[:2]} == {
        (truth.onset_layer, n) for n in truth.register_neurons}
    planted = truth.mask(x)[0].numpy()
    assert planted.sum() > 0
    for m in d.neuron_maps[:2]:
        assert (m[planted] > 100).all() and (np.abs(m[~planted]) < 1).all()
    ratio = {k: m.max() / np.median(m) for k, m in d.norm_maps.items()}
    assert ratio["original"] > 10 and ratio["ablated"] < 2 and ratio["registers"] < 2
    assert d.register_norm > 10 * np.median(d.norm_maps["registers"])
    assert d.top_magnitudes.shape == (truth.num_layers, 3)
    assert (d.top_magnitudes[truth.onset_layer - 1 :, 0] > 10 * d.top_magnitudes[0, 0]).all()
    fig = outlier_sources_figure(d)
    assert isinstance(fig, Figure)
    assert "synthetic" in fig._suptitle.get_text()


def test_dataset_figure(s16, tmp_path):
    bundle, _ = s16
    from PIL import Image

    for k, v in list(io.sample_images().items())[:2]:
        Image.fromarray(v).save(tmp_path / f"{k}.png")
    out = dataset_stats(bundle, image_source(tmp_path), tmp_path / "s.npz", progress=False)
    fig = dataset_figure(out)
    assert isinstance(fig, Figure) and len(fig.axes) >= 3
    assert "2 images" in fig._suptitle.get_text()


def test_coactivation_of_the_planted_pair(s16):
    bundle, truth = s16
    x = io.prepare(io.sample_images()["astronaut"], bundle)
    a, b = truth.register_neurons
    other = [(truth.onset_layer, n) for n in range(3) if n not in truth.register_neurons][:2]
    labels, corr = neuron_coactivation(bundle, x, [(truth.onset_layer, a),
                                                   (truth.onset_layer, b), *other])
    assert labels[:2] == [f"{truth.onset_layer}:{a}", f"{truth.onset_layer}:{b}"]
    assert np.allclose(np.diag(corr), 1.0)
    assert corr[0, 1] > 0.999  # the clipped-ramp pair fires on the same tokens
    assert np.abs(corr[:2, 2:]).max() < 0.5
    fig = coactivation_clustermap(labels, corr)
    assert isinstance(fig, Figure)
