"""Tests of the NeuronView widget on the planted ViT-S/16 (driven through its controls)."""

from __future__ import annotations

import numpy as np
import pytest

from sfp.core import io
from sfp.models.synthetic import planted_model
from sfp.viz.widgets import NeuronView


@pytest.fixture(scope="module")
def view():
    bundle, truth = planted_model("ViT-S-16", seed=0)
    img = io.sample_images()["astronaut"]
    return NeuronView(bundle, img, classes="person; sky", segmenter_kwargs={
        "templates": "simple"}), truth


def test_finds_the_planted_neurons_and_lists_them(view):
    v, truth = view
    planted = {(truth.onset_layer, n) for n in truth.register_neurons}
    assert {value for _, value in v.neuron_select.options[:2]} == planted
    assert v.neurons == truth.neurons


def test_interventions_update_the_panels(view):
    v, truth = view
    v.layer_slider.value = truth.num_layers - 1
    v.intervention.value = "none"

    def ratio() -> float:
        z = np.asarray(v.fig.data[4].z)
        return float(z.max() / np.median(z))

    assert ratio() > 10
    seg_before = v.fig.data[6].source
    for key in ("zero", "ttr"):
        v.intervention.value = key
        assert ratio() < 2, key
        assert "max / median patch norm" in v.status.value
    assert "register norm" in v.status.value
    assert v.fig.data[6].source == v.segmentations["ttr"] != seg_before
    assert seg_before.startswith("data:image/png;base64,")
    v.layer_slider.value = 2
    v.intervention.value = "none"
    assert ratio() < 2  # before the onset there are no outliers
    assert list(v.fig.data[2].x) == [2, 2]
    fig = v.to_figure()
    assert len(fig.data) == 7
