"""benchmarks/gpu.py without a GPU: one clear sentence; its release-style loop on the CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_bundle

from sfp.seg.pipeline import Segmenter

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the script would run")
def test_no_cuda_one_sentence() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.strip() == _module().NO_CUDA
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize("method", ["sfp", "clip"])
def test_release_loop_matches_segmenter(method: str) -> None:
    b = make_tiny_bundle(layers=12, width=64, heads=4, image_size=96)
    img = torch.rand(3, 150, 260, generator=torch.Generator().manual_seed(0))
    seg = Segmenter.for_benchmark(b, "cityscapes", method=method,
                                  config="official" if method == "sfp" else None,
                                  templates="simple", crop=96, stride=48, short_side=None,
                                  batch_size=1, text_cache=False)
    with torch.inference_mode():
        loop = _module()._release_loop(seg, img)
        want = seg.predict_labels(img)
    assert torch.equal(loop.cpu(), want)
