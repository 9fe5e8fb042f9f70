"""The fp16 convention (low-precision weights, float32 LayerNorms) and its agreement with fp32."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_bundle
from torch import nn

from sfp.methods.encoders import make_encoder
from sfp.models.loading import (
    Fp32LayerNorm,
    ModelLoadError,
    bundle_from_model,
    default_precision,
    precision_of,
    set_precision,
)

# Measured on random 12-block models (CPU, torch 2.14): relative error ~1e-3, min cosine
# ~0.99999 for clip and sfp official; the bounds below leave a 10x margin.
REL_TOL = 1e-2
COS_TOL = 0.999


@pytest.fixture(scope="module")
def pair():
    b32 = make_tiny_bundle(layers=12, width=64, heads=4, image_size=96, seed=3)
    m16 = set_precision(copy.deepcopy(b32.model), "fp16")
    return b32, bundle_from_model(m16, name=b32.name, pretrained="random")


def test_fp16_convention_dtypes(pair) -> None:
    _, b16 = pair
    v = b16.model.visual
    assert v.conv1.weight.dtype == torch.float16
    blk = v.transformer.resblocks[0]
    assert blk.attn.in_proj_weight.dtype == torch.float16
    assert blk.attn.in_proj_bias.dtype == torch.float16
    assert blk.attn.out_proj.weight.dtype == torch.float16
    assert blk.mlp.c_fc.weight.dtype == torch.float16 and blk.mlp.c_proj.bias.dtype == torch.float16
    assert v.proj.dtype == torch.float16 and b16.model.text_projection.dtype == torch.float16
    lns = [m for m in b16.model.modules() if isinstance(m, nn.LayerNorm)]
    assert lns and all(isinstance(m, Fp32LayerNorm) for m in lns)
    assert all(m.weight.dtype == torch.float32 for m in lns)
    assert v.class_embedding.dtype == torch.float32
    assert v.positional_embedding.dtype == torch.float32
    assert precision_of(b16.model) == "fp16" and b16.dtype == torch.float16


def test_layernorm_in_fp32_cast_back(pair) -> None:
    _, b16 = pair
    ln = b16.model.visual.transformer.resblocks[2].ln_1
    x = (torch.randn(2, 5, 64) * 30).half()
    # by hand: mean / biased variance in float32, affine, then cast
    xf = x.float()
    mu = xf.mean(-1, keepdim=True)
    var = ((xf - mu) ** 2).mean(-1, keepdim=True)
    want = ((xf - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias).half()
    got = ln(x)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


@pytest.mark.parametrize("method", ["clip", "sfp"])
def test_fp16_agrees_with_fp32(pair, method: str) -> None:
    b32, b16 = pair
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    cfg = "official" if method == "sfp" else None
    with torch.inference_mode():
        f32 = make_encoder(b32, method, cfg).encode_patches(x)
        f16 = make_encoder(b16, method, cfg).encode_patches(x)
    assert f32.dtype == torch.float32 and f16.dtype == torch.float16
    rel = ((f16.float() - f32).norm() / f32.norm()).item()
    cos = F.cosine_similarity(f16.float(), f32, dim=-1).min().item()
    assert rel < REL_TOL and cos > COS_TOL, (rel, cos)


def test_fp32_restores_and_bad_name(pair) -> None:
    _, b16 = pair
    m = set_precision(copy.deepcopy(b16.model), "fp32")
    assert all(p.dtype == torch.float32 for p in m.parameters())
    with pytest.raises(ModelLoadError, match="precision must be one of"):
        set_precision(m, "fp8")


def test_defaults_and_cli_line(pair) -> None:
    from sfp.cli.common import resolve_precision
    from sfp.cli.seg import _precision_line

    assert default_precision("cpu") == "fp32" and default_precision("cuda:0") == "fp16"
    auto = argparse.Namespace(precision="auto")
    assert resolve_precision(auto, "cuda") == "fp16" and resolve_precision(auto, "cpu") == "fp32"
    assert resolve_precision(argparse.Namespace(precision="fp32"), "cuda") == "fp32"
    b32, b16 = pair
    line = _precision_line(auto, b16)
    assert "fp16" in line and "release" in line and "--precision fp32" in line
    assert "fp32" in _precision_line(auto, b32) and "CPU default" in _precision_line(auto, b32)


def test_precision_of_other_dtype(pair) -> None:
    b32, _ = pair
    m = copy.deepcopy(b32.model).double()
    assert precision_of(m) == "float64"
    assert precision_of(b32.model) == "fp32"
