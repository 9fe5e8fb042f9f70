"""The forward path sfp owns: equality with open_clip, interpolation, input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sfp.core import forward


@torch.no_grad()
def test_equals_open_clip_encode_image(vit_b16):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    ref = vit_b16.model.encode_image(x)
    ours = forward.encode_image(vit_b16.visual, x)
    assert (ref - ours).abs().max() < 1e-5


@torch.no_grad()
def test_block_equals_open_clip_block(tiny_vit):
    block = tiny_vit.visual.transformer.resblocks[2]
    x = torch.randn(3, 17, tiny_vit.width)
    out = forward.block_forward(block, x)
    assert (out - block(x)).abs().max() < 1e-5


@torch.no_grad()
def test_attention_probs_by_hand(tiny_vit):
    block = tiny_vit.visual.transformer.resblocks[0]
    x = torch.randn(1, 5, tiny_vit.width)
    y = block.ln_1(x)
    c, h = tiny_vit.width, tiny_vit.heads
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q = (y @ w[:c].T + b[:c]).view(1, 5, h, c // h)
    k = (y @ w[c : 2 * c].T + b[c : 2 * c]).view(1, 5, h, c // h)
    for head in range(h):
        logits = q[0, :, head] @ k[0, :, head].T / (c // h) ** 0.5
        expect = torch.softmax(logits, dim=-1)
        qq, kk, _ = forward.qkv(block, y)
        got = forward.attention_probs(qq, kk)[0, head]
        assert (got - expect).abs().max() < 1e-6


def test_grid_keeps_rows_and_columns_apart(tiny_vit):
    x, grid = forward.embed(tiny_vit.visual, torch.randn(1, 3, 64, 112))
    assert grid == (4, 7) and x.shape == (1, 1 + 28, tiny_vit.width)
    assert forward.patch_grid(tiny_vit.visual, 224, 320) == (14, 20)


def test_positional_embedding_identity_and_bicubic(tiny_vit):
    v = tiny_vit.visual
    assert forward.positional_embedding(v, (4, 4)) is v.positional_embedding
    pos = forward.positional_embedding(v, (3, 6))
    assert pos.shape == (1 + 18, tiny_vit.width)
    assert torch.equal(pos[0], v.positional_embedding[0])
    grid0 = v.positional_embedding[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expect = F.interpolate(grid0, size=(3, 6), mode="bicubic", align_corners=False)
    assert (pos[1:] - expect.permute(0, 2, 3, 1).reshape(18, -1)).abs().max() < 1e-6


def test_non_square_and_odd_sizes_run(tiny_vit):
    with torch.no_grad():
        out = forward.encode_image(tiny_vit.visual, torch.randn(2, 3, 50, 130))  # grid 3 x 8
    assert out.shape == (2, tiny_vit.embed_dim) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "bad, match",
    [
        ([1, 2, 3], "torch.Tensor"),
        (torch.randn(3, 64, 64), "batched"),
        (torch.randn(1, 4, 64, 64), r"\(B, 3, H, W\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float"),
        (torch.randn(1, 3, 8, 64), "smaller than one"),
    ],
)
def test_bad_images(tiny_vit, bad, match):
    with pytest.raises(forward.InputError, match=match):
        forward.embed(tiny_vit.visual, bad)
