"""Tests for sfp.seg.stats and ``sfp stats``: contents against the planted truth and a recorded
trace, resuming after an interruption to the same file, a stale state refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sfp.cli.app import main
from sfp.core import io, probe
from sfp.models.synthetic import planted_model, synthetic_scene
from sfp.seg.stats import INTERRUPT_ENV, QUANTILES, load_stats


@pytest.fixture(scope="module")
def s16():
    return planted_model("ViT-S-16", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    photos = list(io.sample_images().values())[:2]
    scenes = [(synthetic_scene(s, 240, 256).permute(1, 2, 0).numpy() * 255).round()
              .astype(np.uint8) for s in range(2)]
    for i, arr in enumerate(photos + scenes):
        Image.fromarray(arr).save(root / f"im{i}.png")
    return root


ARGS = ["--synthetic", "--model", "ViT-S-16", "--no-progress"]


def _run(folder, out, *extra):
    return main(["stats", "--images", str(folder), "--out", str(out), *ARGS, *extra])


@pytest.fixture(scope="module")
def full(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "stats.npz"
    assert _run(folder, out) == 0
    return load_stats(out)


def test_resumes_after_an_interruption_to_the_same_file(folder, tmp_path, full, monkeypatch):
    out = tmp_path / "stats.npz"
    monkeypatch.setenv(INTERRUPT_ENV, "2")
    assert _run(folder, out) == 130  # interrupted after 2 of 4 images
    assert not out.exists()
    with np.load(tmp_path / "stats.npz.state" / "state.npz") as z:
        assert z["done"].tolist() == [0, 1]
    monkeypatch.delenv(INTERRUPT_ENV)
    assert _run(folder, out) == 0
    header, arrays = load_stats(out)
    ref_header, ref = full
    assert header == ref_header
    assert arrays.keys() == ref.keys()
    for k in ref:
        assert np.array_equal(arrays[k], ref[k]), k


def test_stale_state_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert _run(folder, out, "--limit", "1") == 0
    assert _run(folder, out, "--limit", "2") == 2
    assert "different run" in capsys.readouterr().err
    assert _run(folder, out, "--limit", "2", "--restart") == 0
    assert load_stats(out)[0]["n_images"] == 2


def test_contents_match_the_planted_truth_and_a_trace(folder, full, s16):
    bundle, truth = s16
    header, a = full
    assert header["n_images"] == header["n_used"] == 4
    assert header["max_layer"] == truth.onset_layer
    pairs = {(int(l), int(n)) for l, n, _ in a["top_neurons"][:2]}
    assert pairs == {(truth.onset_layer, n) for n in truth.register_neurons}
    assert {int(c) for _, c, _ in a["top_channels"][:2]} == set(truth.channels)
    x = torch.cat([io.prepare(str(p), bundle) for p in sorted(folder.glob("*.png"))])
    planted = truth.mask(x).float()  # (4, gh, gw)
    rec = a["recurrence"]
    assert rec.shape == (truth.num_layers, 14, 14)
    for layer in range(truth.onset_layer, truth.num_layers + 1):
        assert np.allclose(rec[layer - 1], planted.mean(0).numpy())
    assert rec[: truth.onset_layer - 1].max() == 0
    norms = probe.record(bundle, x, store=()).token_norms
    q = a["norm_quantiles"]
    assert q.shape == (4, truth.num_layers, len(QUANTILES))
    for layer in (1, truth.num_layers):
        n = norms(layer)[:, 1:].double()
        assert np.allclose(q[:, layer - 1, 0], n.amin(1).numpy(), rtol=1e-5)
        assert np.allclose(q[:, layer - 1, -1], n.amax(1).numpy(), rtol=1e-5)
    assert (a["norm_ratio"][:, truth.onset_layer - 1 :] > 10).all()
    assert (a["onset"][truth.onset_layer - 1 :] == 1).all()


def test_bad_input(tmp_path, capsys):
    assert main(["stats", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o.npz"),
                 *ARGS]) == 2
    assert "No folder of images" in capsys.readouterr().err
    assert main(["stats", "--benchmark", "voc21", "--out", str(tmp_path / "o.npz"), *ARGS]) == 2
    assert "data root" in capsys.readouterr().err
