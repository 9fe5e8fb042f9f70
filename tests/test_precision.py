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


def test_sfp_steps_compute_in_fp16_for_fp16_models() -> None:
    """As released, every SFP step of an fp16 model is computed in fp16; float32 inputs stay
    float32 and float64 inputs are computed in float32, as before."""
    from sfp.core.forward import attend, attention_probs, work
    from sfp.methods.attention import self_self_probs
    from sfp.methods.purify import cosine_matrix, rownorm_apply, similarity_logits

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 16, generator=g)
    q = torch.randn(2, 4, 10, 8, generator=g)
    for dtype, want in ((torch.float16, torch.float16), (torch.float32, torch.float32),
                        (torch.float64, torch.float32)):
        c = cosine_matrix(h.to(dtype))
        assert c.dtype == want
        assert similarity_logits(c).dtype == want
        assert rownorm_apply(c, h.to(dtype)).dtype == dtype
        p = self_self_probs(q.to(dtype))
        assert p.dtype == want and attention_probs(q.to(dtype), q.to(dtype)).dtype == want
        assert attend(p, q.to(dtype)).dtype == dtype
        assert work(h.to(dtype)).dtype == want
    # the fp16 results are the float32 ones to fp16 accuracy
    c16, c32 = cosine_matrix(h.half()).float(), cosine_matrix(h)
    assert (c16 - c32).abs().max() < 5e-3


def test_synthetic_model_refuses_fp16(monkeypatch) -> None:
    """The planted model's activations overflow fp16: --precision fp16 is refused in one
    sentence and auto falls back to fp32 (even where auto would pick fp16)."""
    from sfp.cli.common import add_model_arguments, load_bundle_from_args
    from sfp.core.errors import InputError

    p = argparse.ArgumentParser()
    add_model_arguments(p, precision="auto")
    args = p.parse_args(["--synthetic", "--model", "ViT-S-16", "--precision", "fp16"])
    with pytest.raises(InputError, match="exceed fp16's range"):
        load_bundle_from_args(args)
    from sfp.cli import common

    monkeypatch.setattr(common, "resolve_precision", lambda a, d: "fp16")  # as on CUDA
    args = p.parse_args(["--synthetic", "--model", "ViT-S-16"])
    assert args.precision == "auto"
    assert precision_of(load_bundle_from_args(args).model) == "fp32"
