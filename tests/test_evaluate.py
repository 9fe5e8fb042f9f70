"""Tests of sfp.seg.evaluate: ``sfp segment``, ``sfp eval`` (fake datasets in every layout family,
resume after interruption, stale-state refusal, error messages), ``sfp prepare``, and a
2-process gloo run under torchrun that must equal the single-process result.

In-process runs use the tiny random CLIP of conftest (``sfp.cli.common.load_bundle_from_args`` is
patched); the torchrun test uses a random ViT-B-16 (seeded by ``--seed``) in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import make_fake_dataset
from PIL import Image

import sfp.cli.app as cli
from sfp.cli import common
from sfp.models.loading import WeightsUnavailableError
from sfp.seg.datasets import load_dataset
from sfp.seg.evaluate import INTERRUPT_ENV, EvalState, evaluate
from sfp.seg.metrics import SegMetrics, confusion_matrix
from sfp.seg.pipeline import Segmenter

FAST = [
    "--method", "clip", "--pretrained", "random", "--templates", "simple",
    "--short-side", "32", "--crop", "32", "--stride", "16",
]
VARIED = ["--prob-thd", "0", "--area-thd", "-1", "--logit-scale", "100"]


@pytest.fixture()
def tiny_cli(monkeypatch, tiny_vit):
    """``sfp`` in process, with the tiny random CLIP instead of loading a model."""
    monkeypatch.setattr(common, "load_bundle_from_args", lambda args: tiny_vit)
    monkeypatch.delenv(INTERRUPT_ENV, raising=False)
    return tiny_vit


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def eval_args(name: str, root: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--benchmark", name, "--data-root", str(root), "--out", str(out), *FAST,
            "--no-progress", *extra]


# --------------------------------------------------------------------------- sfp segment
def test_segment_cli_writes_label_and_overlay_pngs(tiny_cli, tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for sub in ("a", "b"):  # same file name twice: outputs must not overwrite each other
        p = tmp_path / sub / "photo.png"
        p.parent.mkdir()
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, ["segment", *paths, "--classes", "cat; dog, puppy; grass",
                                   "--out", str(out), *FAST])
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["photo_2_labels.png", "photo_2_overlay.png", "photo_labels.png",
                     "photo_overlay.png"]
    with Image.open(out / "photo_labels.png") as im:
        assert im.mode == "P"
        lab = np.asarray(im)
        assert lab.shape == (40, 60) and lab.max() < 3
    with Image.open(out / "photo_overlay.png") as im:
        assert im.mode == "RGB" and im.size[1] >= 40 and im.size[0] > 60
    assert str(out / "photo_labels.png") in stdout and "photo_2_overlay.png" in stdout

    rc, stdout, _ = run(capsys, ["segment", paths[0], "--benchmark", "voc21", "--out",
                                 str(tmp_path / "voc"), *FAST])
    assert rc == 0
    assert np.asarray(Image.open(tmp_path / "voc" / "photo_labels.png")).max() < 21


def test_segment_cli_errors_exit_2_without_traceback(tiny_cli, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    rc, _, err = run(capsys, ["segment", str(bad), "--classes", "a; b", "--out",
                              str(tmp_path / "o"), *FAST])
    assert rc == 2 and "bad.jpg" in err and "Traceback" not in err
    rc, _, err = run(capsys, ["segment", str(bad), "--class-file", str(tmp_path / "none.txt"),
                              "--out", str(tmp_path / "o"), *FAST])
    assert rc == 2 and "none.txt" in err


# --------------------------------------------------------------------------- sfp eval
@pytest.mark.parametrize(
    "name", ["voc21", "voc20", "context59", "coco_object", "cityscapes", "ade20k"]
)
def test_eval_on_fake_layouts_with_limit(tiny_cli, tmp_path, capsys, name) -> None:
    root = make_fake_dataset(name, tmp_path / "data", n=3, size=(24, 32))
    out = tmp_path / "res.json"
    rc, stdout, err = run(capsys, eval_args(name, root, out, "--limit", "2", *VARIED))
    assert rc == 0, err
    res = json.loads(out.read_text())
    ds = load_dataset(name, root)
    assert res["benchmark"] == name and res["method"] == "clip" and res["preset"] is None
    assert res["num_images"] == 2 and res["pretrained"] == "random"
    assert list(res["per_class"]) == ds.class_names
    assert res["config"]["segmenter"]["crop"] == 32 and res["config"]["limit"] == 2
    assert f"wrote {out}" in stdout

    # Independent check: the same segmenter, image by image, through confusion_matrix.
    seg = Segmenter.for_benchmark(tiny_cli, name, method="clip", templates="simple",
                                  short_side=32, crop=32, stride=16, prob_thd=0.0,
                                  area_thd=None, logit_scale=100.0)
    total = sum(
        confusion_matrix(seg.predict_labels(ds[i].image), ds[i].label, ds.num_classes)
        for i in range(2)
    )
    expected = SegMetrics.from_confusion(total, ds.class_names).to_dict()
    assert res["mIoU"] == expected["mIoU"] and res["aAcc"] == expected["aAcc"]
    valid = sum(int((ds[i].label != 255).sum()) for i in range(2))
    assert res["num_pixels"] == expected["num_pixels"] == valid
    api = evaluate(seg, ds, limit=2, progress=False)
    assert api.num_images == 2 and np.array_equal(api.metrics.matrix, total)


def test_eval_resume_after_interrupt_equals_uninterrupted(tiny_cli, tmp_path, capsys,
                                                          monkeypatch) -> None:
    root = make_fake_dataset("voc21", tmp_path / "data", n=5, size=(24, 32))
    full = tmp_path / "full.json"
    assert run(capsys, eval_args("voc21", root, full, *VARIED))[0] == 0

    out = tmp_path / "part.json"
    monkeypatch.setenv(INTERRUPT_ENV, "2")
    rc, _, err = run(capsys, eval_args("voc21", root, out, *VARIED))
    assert rc == 130 and "resume" in err
    assert not out.exists()
    lines = (tmp_path / "part.json.state" / "rank0.jsonl").read_text().splitlines()
    assert [json.loads(x)["i"] for x in lines] == [0, 1]

    # A second interruption, then a torn line as if killed mid-write.
    rc, _, _ = run(capsys, eval_args("voc21", root, out, *VARIED))
    assert rc == 130
    with open(tmp_path / "part.json.state" / "rank0.jsonl", "a") as fh:
        fh.write('{"i": 4, "id": "2007_0000')
    monkeypatch.delenv(INTERRUPT_ENV)
    rc, stdout, err = run(capsys, eval_args("voc21", root, out, *VARIED))
    assert rc == 0, err
    assert "4 resumed" in stdout
    assert json.loads(out.read_text()) == json.loads(full.read_text())
    lines = (tmp_path / "part.json.state" / "rank0.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["i"] for x in lines) == [0, 1, 2, 3, 4]

    # Re-running a finished evaluation only re-reads the state.
    rc, stdout, _ = run(capsys, eval_args("voc21", root, out, *VARIED))
    assert rc == 0 and "5 resumed" in stdout
    assert json.loads(out.read_text()) == json.loads(full.read_text())


def test_eval_refuses_state_of_another_configuration(tiny_cli, tmp_path, capsys) -> None:
    root = make_fake_dataset("voc20", tmp_path / "data", n=2, size=(24, 32))
    out = tmp_path / "r.json"
    assert run(capsys, eval_args("voc20", root, out, "--limit", "1"))[0] == 0
    rc, _, err = run(capsys, eval_args("voc20", root, out, "--limit", "1", "--logit-scale", "30"))
    assert rc == 2 and "--restart" in err and "logit_scale" in err and "Traceback" not in err
    rc, _, err = run(capsys, eval_args("voc20", root, out, "--limit", "2"))
    assert rc == 2 and "limit" in err
    rc, _, err = run(capsys, eval_args("voc20", root, out, "--limit", "1", "--logit-scale", "30",
                                       "--restart"))
    assert rc == 0, err
    assert json.loads(out.read_text())["config"]["segmenter"]["logit_scale"] == 30.0


def test_eval_state_rejects_renamed_dataset(tmp_path) -> None:
    state = EvalState(tmp_path / "s", {"a": 1})
    state.prepare()
    state.open(0)
    state.record(0, "img0", np.eye(2, dtype=np.int64))
    state.close()
    assert state.load(["img0"])[0].tolist() == [[0, 0, 1], [1, 1, 1]]
    with pytest.raises(Exception, match="--restart"):
        state.load(["other"])


def test_eval_errors_exit_2_with_one_message(tiny_cli, tmp_path, capsys, monkeypatch) -> None:
    rc, _, err = run(capsys, eval_args("voc21", tmp_path / "nowhere", tmp_path / "r.json"))
    assert rc == 2 and "Expected layout" in err and "JPEGImages" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        cli.main(eval_args("voc22", tmp_path, tmp_path / "r.json"))
    assert exc.value.code == 2
    capsys.readouterr()

    root = make_fake_dataset("ade20k", tmp_path / "data", n=2, size=(24, 32))
    next((root / "images" / "validation").glob("*.jpg")).write_bytes(b"garbage")
    rc, _, err = run(capsys, eval_args("ade20k", root, tmp_path / "r.json"))
    assert rc == 2 and "ADE_val_00000001" in err and "Traceback" not in err

    def no_weights(args):
        raise WeightsUnavailableError("No weights for ViT-B-16 / openai; pass --pretrained PATH.")

    monkeypatch.setattr(common, "load_bundle_from_args", no_weights)
    root = make_fake_dataset("voc21", tmp_path / "d2", n=1, size=(24, 32))
    rc, _, err = run(capsys, eval_args("voc21", root, tmp_path / "r2.json"))
    assert rc == 3 and "--pretrained PATH" in err and "Traceback" not in err  # no weights: 3


def test_prepare_coco_object(tmp_path, capsys) -> None:
    stuff = make_fake_dataset("coco_stuff164k", tmp_path / "data", n=2, size=(8, 8))
    out = tmp_path / "obj"
    rc, stdout, err = run(capsys, ["prepare", "coco-object", "--stuff-root", str(stuff),
                                   "--out", str(out)])
    assert rc == 0, err
    assert "wrote 2 label files" in stdout
    ds = load_dataset("coco_object", out)
    src = load_dataset("coco_stuff164k", stuff)[0].label
    lab = ds[0].label
    assert len(ds) == 2
    assert np.array_equal(lab[src < 80], src[src < 80] + 1)  # things 0..79 -> 1..80
    # stuff and unlabeled (255) -> background 0, as the releases' converter does
    assert (src == 255).any()
    assert (lab[(src >= 80) & (src <= 170)] == 0).all() and (lab[src == 255] == 0).all()
    # the same command again skips the labels it marked as current
    rc, stdout, err = run(capsys, ["prepare", "coco-object", "--stuff-root", str(stuff),
                                   "--out", str(out)])
    assert rc == 0 and "wrote 0 label files" in stdout, err
    rc, _, err = run(capsys, ["prepare", "coco-object", "--stuff-root", str(tmp_path / "no")])
    assert rc == 2 and "Expected layout" in err


# --------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one_process(tmp_path, capsys, monkeypatch) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the Python interpreter")
    monkeypatch.delenv(INTERRUPT_ENV, raising=False)
    root = make_fake_dataset("voc21", tmp_path / "data", n=5, size=(24, 32))
    args = ["--model", "ViT-B-16", "--device", "cpu", "--no-progress", *FAST, *VARIED]
    multi = tmp_path / "multi.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "sfp", "eval",
         "--benchmark", "voc21", "--data-root", str(root), "--out", str(multi), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert "2 process(es)" in stdout
    state = tmp_path / "multi.json.state"
    idx = {
        r: [json.loads(x)["i"] for x in (state / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    }
    assert idx == {0: [0, 2, 4], 1: [1, 3]}

    single = tmp_path / "single.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = cli.main(["eval", "--benchmark", "voc21", "--data-root", str(root), "--out",
                       str(single), *args])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, capsys.readouterr().err
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert a == b
    assert a["num_images"] == 5
    shutil.rmtree(state)


def test_eval_runs_on_the_planted_model(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(INTERRUPT_ENV, raising=False)
    root = make_fake_dataset("voc20", tmp_path / "data", n=2, size=(24, 32))
    out = tmp_path / "syn.json"
    args = [a for a in FAST if a not in ("--pretrained", "random")]
    rc, stdout, err = run(capsys, ["eval", "--benchmark", "voc20", "--data-root", str(root),
                                   "--out", str(out), "--synthetic", "--model", "ViT-S-16",
                                   "--no-progress", *args])
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["provenance"] == "synthetic" and res["pretrained"].startswith("synthetic")
    assert res["num_images"] == 2 and res["config"]["seed"] == 0
