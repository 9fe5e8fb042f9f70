"""What a person sees: PNG banners and text chunks, load messages, errors, colours, notebooks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from sfp.core.io import BANNER_FILL, save_png
from sfp.models.synthetic import SYNTHETIC_LABEL
from sfp.seg.pipeline import Segmenter, save_segmentation

SIMPLE = ["a photo of a {}."]


def _as(bundle, provenance: str, pretrained: str):
    """The same weights under another provenance (what the PNG writer reads)."""
    return dataclasses.replace(bundle, provenance=provenance, pretrained=pretrained)


def _banner_rows(arr: np.ndarray) -> int:
    """Number of leading rows whose pixels are mostly the banner colour."""
    fill = np.array(BANNER_FILL)
    rows = 0
    for row in arr[..., :3]:
        if (np.abs(row.astype(int) - fill).sum(-1) == 0).mean() < 0.5:
            break
        rows += 1
    return rows


@pytest.mark.parametrize("provenance,pretrained,caveat", [
    ("synthetic", SYNTHETIC_LABEL, "synthetic (planted outliers)"),
    ("random", "random", "random weights (results mean nothing)"),
])
def test_segment_pngs_of_synthetic_and_random_models_carry_banner_and_chunks(
        tiny_vit, tmp_path, provenance, pretrained, caveat) -> None:
    bundle = _as(tiny_vit, provenance, pretrained)
    seg = Segmenter(bundle, ["cat", "dog"], method="clip", templates=SIMPLE)
    img = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    result = seg.predict(img)
    lab, ov = save_segmentation(result, tmp_path, "x")
    plain = result.overlay(0.5)
    with Image.open(ov) as im:
        arr = np.asarray(im.convert("RGB"))
        info = dict(im.text)
    strip = arr.shape[0] - plain.shape[0]
    assert strip > 10 and arr.shape[1] == plain.shape[1]
    assert _banner_rows(arr) >= 3  # yellow rows at the top ...
    text_pixels = (arr[:strip].astype(int).sum(-1) < 100).sum()
    assert text_pixels > 20  # ... with dark text in them
    assert np.array_equal(arr[strip:], plain)  # the picture itself is untouched
    assert info["sfp:provenance"] == provenance
    assert info["sfp:caveat"] == caveat
    assert info["sfp:model"] == f"{tiny_vit.name} / {pretrained}"
    with Image.open(lab) as im:  # label maps keep class indices as pixels: chunks only
        assert np.array_equal(np.asarray(im), result.labels.numpy())
        assert im.text["sfp:caveat"] == caveat


def test_segment_pngs_of_a_file_model_have_no_banner(tiny_vit, tmp_path) -> None:
    bundle = _as(tiny_vit, "file", "/weights/tiny.pt")
    seg = Segmenter(bundle, ["cat", "dog"], method="clip", templates=SIMPLE)
    img = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    result = seg.predict(img)
    _, ov = save_segmentation(result, tmp_path, "x")
    with Image.open(ov) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), result.overlay(0.5))
        assert "sfp:caveat" not in im.text
        assert im.text["sfp:provenance"] == "file"
        assert im.text["sfp:model"] == f"{tiny_vit.name} / /weights/tiny.pt"


def test_save_figure_png_banner_follows_the_trace(tiny_vit, tmp_path) -> None:
    from sfp.core.probe import record
    from sfp.viz.figures import save_figure
    from sfp.viz.figures.style import new_figure

    def fig():
        f = new_figure(3, 2)
        f.add_subplot().imshow(np.zeros((4, 4)), cmap="gray")
        return f

    x = np.zeros((1, 3, 64, 64), np.float32)

    for provenance, pretrained, banner in [("synthetic", SYNTHETIC_LABEL, True),
                                           ("file", "/w.pt", False)]:
        trace = record(_as(tiny_vit, provenance, pretrained), torch.from_numpy(x))
        png, svg = save_figure(fig(), tmp_path / provenance, formats=("png", "svg"), dpi=50,
                               source=trace)
        with Image.open(png) as im:
            arr = np.asarray(im.convert("RGB"))
            assert (_banner_rows(arr) >= 3) is banner
            assert (arr.shape[0] > 100) is banner and arr.shape[1] == 150  # 3 x 2 in at 50 dpi
            assert im.text["sfp:provenance"] == provenance
            assert ("sfp:caveat" in im.text) is banner
        assert (SYNTHETIC_LABEL in svg.read_text()) is banner


def test_save_png_without_source_writes_only_the_software_chunk(tmp_path) -> None:
    p = save_png(np.zeros((20, 30, 3), np.uint8), tmp_path / "a.png")
    with Image.open(p) as im:
        assert im.size == (30, 20) and im.text == {"Software": "sfp"}


# --------------------------------------------------------------------------- loading a file
@pytest.fixture(scope="module")
def vit_s16_file(tmp_path_factory):
    """A random ViT-S-16 (width 384, 12 blocks, 16 px patches, 224 px, output 384) on disk."""
    import open_clip

    torch.manual_seed(3)
    model = open_clip.create_model("ViT-S-16").eval()
    path = tmp_path_factory.mktemp("w") / "vits16.pt"
    torch.save(model.state_dict(), path)
    return path


def test_file_load_prints_one_line_and_not_open_clips_random_notice(vit_s16_file, capfd,
                                                                     caplog) -> None:
    import logging

    from sfp.models.loading import load_model

    with caplog.at_level(logging.INFO):
        b = load_model("ViT-S-16", pretrained=vit_s16_file, device="cpu", quick_gelu=True)
    out = capfd.readouterr()
    everything = out.out + out.err + " ".join(r.getMessage() for r in caplog.records)
    assert "initialized randomly" not in everything
    assert "No pretrained weights" not in everything
    lines = [ln for ln in out.err.splitlines() if ln.startswith("sfp: loaded")]
    assert len(lines) == 1
    assert "ViT-S-16" in lines[0] and str(vit_s16_file.resolve()) in lines[0]
    assert "QuickGELU" in lines[0] and "not QuickGELU" not in lines[0]
    assert b.provenance == "file" and b.caveat is None
    load_model("ViT-S-16", pretrained=vit_s16_file, device="cpu", quick_gelu=False)
    assert "GELU (not QuickGELU)" in capfd.readouterr().err
    load_model("ViT-S-16", pretrained=vit_s16_file, device="cpu", quick_gelu=False, quiet=True)
    assert "sfp: loaded" not in capfd.readouterr().err


def test_wrong_architecture_error_names_what_the_file_holds(vit_s16_file) -> None:
    from sfp.models.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError) as err:
        load_model("ViT-B-16", pretrained=vit_s16_file, device="cpu", quick_gelu=False)
    msg = str(err.value)
    assert "width 384, 12 blocks, 16 px patches, 224 px input, output dim 384" in msg
    assert "open_clip name: ViT-S-16" in msg
    assert "ViT-B-16 " not in msg.split("The file holds")[1]


# --------------------------------------------------------------------------- colours
def test_palette_black_only_for_a_background_class(tiny_vit, tmp_path) -> None:
    from sfp.seg.benchmarks import class_names
    from sfp.seg.pipeline import PALETTE, class_palette

    user = class_palette(["cup", "table"])
    assert user[0].tolist() != [0, 0, 0] and user[0].tolist() == [128, 0, 0]  # VOC colour 1
    assert not (user[:255] == 0).all(axis=1).any()  # no user class drawn black
    assert class_palette(["background", "cup"])[0].tolist() == [0, 0, 0]
    assert class_palette(class_names("voc21"))[0].tolist() == [0, 0, 0]
    assert class_palette(class_names("voc21")) is PALETTE
    assert class_palette(class_names("voc20"))[0].tolist() == [128, 0, 0]  # no background
    seg = Segmenter(tiny_vit, ["cup", "table"], method="clip", templates=SIMPLE)
    res = seg.predict(np.full((64, 64, 3), 128, np.uint8))
    assert not (res.colorize() == 0).all(axis=-1).any()
    lab, _ = save_segmentation(res, tmp_path, "cup")
    with Image.open(lab) as im:
        assert im.getpalette()[:3] == [128, 0, 0]


# --------------------------------------------------------------------------- notebooks
def test_notebooks_import_no_private_module() -> None:
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "notebooks"
    private = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", re.MULTILINE)
    found = []
    for nb in sorted(root.glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            for mod in private.findall("".join(cell["source"])):
                if any(part.startswith("_") for part in mod.split(".")):
                    found.append(f"{nb.name}: {mod}")
    assert found == []


# --------------------------------------------------------------------------- layout
def test_stage_comparison_with_two_baselines_fits_the_output_area(tiny_vit) -> None:
    from sfp.viz.widgets import StageComparison

    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    comp = StageComparison(tiny_vit, img, "cat; dog", baselines=("sclip", "naclip"),
                           short_side=64, crop=64, stride=32)
    assert len(comp.panels) == 6
    lay = comp.figure.layout
    assert lay.width <= 1068  # JupyterLab's output area (6 x 240 px would need 1460)
    # every panel's image axis lies inside the figure and the panels do not overlap
    domains = sorted(tuple(lay[f"xaxis{'' if k == 1 else k}"].domain) for k in range(1, 7))
    assert all(0 <= a < b <= 1 for a, b in domains)
    # by hand: 1020 usable px / 6 panels = 170 px each, one row
    assert comp.grid_shape(6) == (1, 6, 170)
    assert comp.grid_shape(4) == (1, 4, 240)  # fits at full size
    assert comp.grid_shape(10) == (2, 8, 127)  # 10 x 120 px would not fit: wrap
    narrow = StageComparison(tiny_vit, img, "cat; dog", baselines=("sclip", "naclip"),
                             short_side=64, crop=64, stride=32, max_width=600)
    rows, cols, panel = narrow.grid_shape(6)
    assert (rows, cols) == (2, 4) and narrow.figure.layout.width <= 600
    ys = {tuple(narrow.figure.layout[f"yaxis{'' if k == 1 else k}"].domain) for k in (1, 5)}
    assert len(ys) == 2  # panel 5 starts the second row


# --------------------------------------------------------------------------- command line
def test_help_texts_have_no_raw_double_backticks() -> None:
    import argparse

    from sfp.cli.app import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"segment", "figures", "demo"} <= set(subs.choices)
    for name, sub in subs.choices.items():
        assert "``" not in sub.format_help(), name
    assert "``" not in parser.format_help()


def test_pyproject_license_is_an_spdx_string() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    # a table {text = ...} is deprecated by setuptools (warned at every install)
    assert re.findall(r"^license\s*=\s*(.+)$", project, re.MULTILINE) == ['"MIT"']
    assert "License ::" not in project  # no license classifier next to the SPDX string
