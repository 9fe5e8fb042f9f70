"""Tests of ``sfp demo``: the quick run writes the report, says which weights it used, prints
the tables; without weights it falls back to the planted-outlier model and says so."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from sfp.models.loading import WeightsUnavailableError
from sfp.viz import demo
from sfp.viz.figures import external_urls


def test_generated_scene():
    img = demo.generated_scene()
    assert img.shape == (224, 320, 3) and img.dtype == np.float32
    assert 0 <= img.min() and img.max() <= 1
    assert np.array_equal(img, demo.generated_scene())
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 100  # textured, not flat


def test_demo_quick_writes_report_and_prints_tables(tmp_path, tiny_vit, monkeypatch, capsys):
    import sfp.cli.app as cli

    monkeypatch.setattr(demo, "_load", lambda *a, **k: (tiny_vit, "Using tiny test weights."))
    out = tmp_path / "demo_output"
    rc = cli.main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = out / "report.html"
    text = report.read_text(encoding="utf-8")
    assert "Using tiny test weights." in text
    for key in ("outlier_grid", "propagation", "norm_maps", "detector_agreement",
                "stage_ablation", "layerwise_purification"):
        assert (out / "astronaut" / f"{key}.png").is_file(), key
        assert f'src="astronaut/{key}.png"' in text
    assert (out / "som_detections.png").is_file()
    assert text.count('class="what"') == 7  # a note on what to look at for every figure
    assert external_urls(text) == []
    page = out / "interactive.html"
    assert page.is_file()
    # plotly.js (4.7 MB) inlined once, compressed, and one image's figures: a few MB at most.
    assert page.stat().st_size < 3_000_000
    assert external_urls(page.read_text(encoding="utf-8")) == []

    printed = capsys.readouterr().out
    assert "Using tiny test weights." in printed
    assert re.search(r"voc21\s+21\s+56\s+1\s+32", printed)  # classes, names, templates, dim
    rows = [line for line in printed.splitlines()
            if re.match(r"\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+", line)]
    assert len(rows) == tiny_vit.num_layers  # one row per layer
    assert "SOM (" in printed and "cosine similarity" in printed
    assert str(report.resolve()) in printed


def test_demo_falls_back_to_planted_model(monkeypatch, tiny_vit):
    import sfp.models.loading
    import sfp.models.synthetic

    def no_weights(*args, **kwargs):
        raise WeightsUnavailableError("no network and not in the local cache")

    class Fake:
        label = "tiny / synthetic (planted outliers)"

    monkeypatch.setattr(sfp.models.loading, "load_model", no_weights)
    monkeypatch.setattr(sfp.models.synthetic, "planted_model",
                        lambda name, device=None: (Fake(), None))
    bundle, note = demo._load("ViT-B-16", synthetic=False, device=None, stream=io.StringIO())
    assert isinstance(bundle, Fake)
    assert note.startswith("No pretrained weights: no network")
    assert "synthetic (planted outliers)" in note and "SFP_CHECKPOINT" in note


@pytest.mark.parametrize("argv", [["demo"], ["demo", "--quick", "--out", "x", "--synthetic"]])
def test_demo_parser(argv):
    from sfp.cli.app import build_parser

    args = build_parser().parse_args(argv)
    assert args.out in ("demo_output", "x")
    assert callable(args.func)


def test_demo_on_the_toy_clip_scores_its_segmentations(tmp_path, monkeypatch):
    import sfp.cli.app as cli
    from sfp.models.toy import toy_planted_model

    bundle, _ = toy_planted_model()
    monkeypatch.setattr(demo, "_load", lambda *a, **k: (bundle, "Using the planted toy CLIP."))
    out = tmp_path / "demo_output"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    text = (out / "report.html").read_text(encoding="utf-8")
    assert (out / "toy_scene_0" / "stage_ablation.png").is_file()
    scores = re.search(r"Against the ground truth \(bottom left\), this image&#x27;s mIoU: "
                       r"CLIP ([\d.]+), \+SOM ([\d.]+), \+SOM\+SAE ([\d.]+), SFP ([\d.]+), "
                       r"SCLIP ([\d.]+)\.", text)
    assert scores, "the stage ablation's note gives each column's mIoU"
    assert all(0 <= float(s) <= 1 for s in scores.groups())
