"""The probe: exactness, shapes, by-hand attention, layer errors, save/load."""

from __future__ import annotations

import pytest
import torch

from sfp.core import forward
from sfp.core.probe import Trace, TraceError, record


@pytest.fixture(scope="module")
def imgs_b16():
    torch.manual_seed(3)
    return torch.randn(2, 3, 224, 224)


def test_recording_does_not_change_outputs(vit_b16, imgs_b16):
    with torch.no_grad():
        plain = forward.encode_image(vit_b16.visual, imgs_b16)
        ref = vit_b16.model.encode_image(imgs_b16)
    trace = record(vit_b16, imgs_b16)
    assert (trace.image_embedding - plain).abs().max() < 1e-6
    assert (trace.image_embedding - ref).abs().max() < 1e-5


def test_shapes_contract(vit_b16, imgs_b16):
    t = record(vit_b16, imgs_b16, layers=[3, 11])
    assert t.grid == (14, 14) and t.num_layers == 12 and t.layers == (3, 11)
    assert t.attention(3).shape == (2, 12, 197, 197)
    assert t.cls_attention(3).shape == (2, 12, 196)
    assert t.self_attention(3).shape == (2, 12, 196)
    assert t.token_norms(11).shape == (2, 197)
    assert t.hidden(11).shape == (2, 197, 768)
    assert t.to_grid(t.token_norms(11)).shape == (2, 14, 14)
    assert t.nbytes == sum(
        x.numel() * 4 for x in (t.attention(3), t.attention(11), t.hidden(3), t.hidden(11),
                                t.token_norms(3), t.token_norms(11))
    )
    rows = t.attention(11).sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_recorded_attention_matches_by_hand(tiny_vit):
    x = torch.randn(1, 3, 64, 80)
    t = record(tiny_vit, x, layers=[2])
    with torch.no_grad():
        tokens, _ = forward.embed(tiny_vit.visual, x)
        h1 = tiny_vit.visual.transformer.resblocks[0](tokens)
        block = tiny_vit.visual.transformer.resblocks[1]
        y = block.ln_1(h1)
        c, nh = tiny_vit.width, tiny_vit.heads
        w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
        q = (y @ w[:c].T + b[:c]).view(1, -1, nh, c // nh).transpose(1, 2)
        k = (y @ w[c : 2 * c].T + b[c : 2 * c]).view(1, -1, nh, c // nh).transpose(1, 2)
        expect = torch.softmax(q @ k.transpose(-1, -2) / (c // nh) ** 0.5, dim=-1)
        assert (t.attention(2) - expect).abs().max() < 1e-5
        assert (t.hidden(2) - block(h1)).abs().max() < 1e-5
    # cls row / diagonal pick the right entries
    a = t.attention(2)
    assert torch.equal(t.cls_attention(2)[0, 1, 4], a[0, 1, 0, 5])
    assert torch.equal(t.self_attention(2)[0, 2, 6], a[0, 2, 7, 7])


def test_head_mean_and_store_options(tiny_vit):
    x = torch.randn(2, 3, 64, 64)
    full = record(tiny_vit, x)
    mean = record(tiny_vit, x, heads="mean", store=("attention",))
    assert mean.attention(4).shape == (2, 1, 17, 17)
    assert torch.allclose(mean.attention(4)[:, 0], full.attention(4).mean(1), atol=1e-6)
    with pytest.raises(TraceError, match="hidden was not stored"):
        mean.hidden(4)
    assert (full.has_attention, full.has_hidden) == (True, True)
    assert (mean.has_attention, mean.has_hidden) == (True, False)
    assert mean.image_size == (64, 64)
    assert torch.allclose(mean.token_norms(4), full.hidden(4).norm(dim=-1), atol=1e-5)
    assert mean.nbytes < full.nbytes


def test_batch_equals_single(tiny_vit):
    x = torch.randn(3, 3, 64, 96)
    both = record(tiny_vit, x)
    one = record(tiny_vit, x[1:2])
    assert torch.allclose(both.attention(5)[1], one.attention(5)[0], atol=1e-6)
    assert torch.allclose(both.hidden(6)[1], one.hidden(6)[0], atol=1e-5)


def test_layer_errors(tiny_vit):
    t = record(tiny_vit, torch.randn(1, 3, 64, 64), layers=[1, 2])
    with pytest.raises(TraceError, match="outside 1..6"):
        t.attention(7)
    with pytest.raises(TraceError, match="outside 1..6"):
        t.hidden(0)
    with pytest.raises(TraceError, match="not recorded"):
        t.attention(4)
    with pytest.raises(ValueError, match="1..6"):
        record(tiny_vit, torch.randn(1, 3, 64, 64), layers=[0, 3])
    with pytest.raises(ValueError, match="heads"):
        record(tiny_vit, torch.randn(1, 3, 64, 64), heads="some")
    with pytest.raises(ValueError, match="store"):
        record(tiny_vit, torch.randn(1, 3, 64, 64), store=("attn",))


def test_to_grid_errors(tiny_vit):
    t = record(tiny_vit, torch.randn(1, 3, 48, 64), layers=[1])
    assert t.to_grid(torch.arange(12.0)).tolist()[2] == [8.0, 9.0, 10.0, 11.0]
    with pytest.raises(ValueError, match="N=12"):
        t.to_grid(torch.zeros(5))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_roundtrip(tiny_vit, tmp_path, suffix):
    t = record(tiny_vit, torch.randn(2, 3, 64, 80), layers=[1, 5])
    path = t.save(tmp_path / f"trace{suffix}")
    u = Trace.load(path)
    assert (u.grid, u.num_layers, u.layers, u.heads) == (t.grid, t.num_layers, t.layers, t.heads)
    assert u.meta == t.meta and u.label == "tiny-vit-L6 / random"
    for layer in (1, 5):
        assert torch.equal(u.attention(layer), t.attention(layer))
        assert torch.equal(u.hidden(layer), t.hidden(layer))
        assert torch.equal(u.token_norms(layer), t.token_norms(layer))
    assert torch.equal(u.image_embedding, t.image_embedding)
    # detectors work on a loaded trace
    assert torch.equal(u.outliers("l2", 5, top_k=3).mask, t.outliers("l2", 5, top_k=3).mask)


def test_save_load_errors(tiny_vit, tmp_path):
    t = record(tiny_vit, torch.randn(1, 3, 64, 64), layers=[1])
    with pytest.raises(ValueError, match=".npz or .safetensors"):
        t.save(tmp_path / "trace.pkl")
    with pytest.raises(FileNotFoundError):
        Trace.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    with pytest.raises(ValueError, match="not an sfp Trace"):
        Trace.load(junk)


def test_outliers_via_trace_match_functions(tiny_vit):
    from sfp.core import outliers

    t = record(tiny_vit, torch.randn(2, 3, 64, 64))
    r = t.outliers("som", 5, top_k=3, cls_scale=1.5)
    expect = outliers.som(t.attention(5), top_k=3, cls_scale=1.5)
    assert torch.equal(r.mask, expect.mask)
