"""Tests of sfp.methods.encoders (contract, registry) and sfp.methods.baselines (CLIP,
MaskCLIP, SCLIP, ClearCLIP, NACLIP).

The modified last blocks are checked against computations written here from the block's raw
weights (``in_proj_weight``/``in_proj_bias``, ``out_proj``) with explicit loops over heads, on a
small real-architecture CLIP (random weights, last block's projections scaled up so attention is
peaked and the variants differ). Non-square shapes are also checked on a random ViT-B/16.
"""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from sfp.core import forward
from sfp.methods.attention import correlative_probs, gaussian_neighbourhood_bias
from sfp.methods.base import ENCODERS
from sfp.methods.baselines import (
    ClearCLIPConfig,
    MaskCLIPConfig,
    NACLIPConfig,
    SCLIPConfig,
)
from sfp.methods.encoders import Encoder, available_methods, make_encoder, register_encoder
from sfp.models.loading import ModelBundle, bundle_from_model, load_model

METHODS = ("sfp", "clip", "maskclip", "sclip", "clearclip", "naclip")
BASELINES = METHODS[1:]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread here: these small ops gain little from two, and on a shared 2-core
    machine OpenMP's spinning threads made this file 4x slower (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> ModelBundle:
    """A 12-block, 64-wide, 4-head CLIP ViT with 16 px patches and a 14 x 14 base grid."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=12, width=64, head_width=16, patch_size=16, image_size=224),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
        quick_gelu=True,
    )
    with torch.no_grad():
        model.visual.transformer.resblocks[-1].attn.in_proj_weight.mul_(3.0)
    return bundle_from_model(model.eval(), name="ViT-B-16", pretrained="random", quick_gelu=True)


@pytest.fixture(scope="module")
def vitb() -> ModelBundle:
    torch.manual_seed(0)
    return load_model("ViT-B-16", pretrained=None, device="cpu")


def _images(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# by-hand last blocks from raw weights, loops over heads
# ---------------------------------------------------------------------------------------------


def _h_before_last(bundle: ModelBundle, images: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """h_{L-1} through open_clip's own (batch-first) blocks, after sfp's embedding."""
    visual = bundle.visual
    x, grid = forward.embed(visual, images)
    with torch.no_grad():
        for blk in visual.transformer.resblocks[:-1]:
            x = blk(x)
    return x, grid


def _hand_last_block(block, x, attention, *, residual: bool, ffn: bool) -> torch.Tensor:
    """Block L with ``attention(q_h, k_h, v_h, scale) -> (B, T, T)`` per head, by hand."""
    attn = block.attn
    c = x.shape[-1]
    heads = attn.num_heads
    d = c // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    with torch.no_grad():
        y = block.ln_1(x)
        q = y @ w[:c].T + b[:c]
        k = y @ w[c : 2 * c].T + b[c : 2 * c]
        v = y @ w[2 * c :].T + b[2 * c :]
        outs = []
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            a = attention(q[..., cols], k[..., cols], v[..., cols], d**-0.5)
            outs.append(a @ v[..., cols])
        out = torch.cat(outs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
        if residual:
            out = x + out
        if ffn:
            out = out + block.mlp(block.ln_2(out))
    return out


def _hand_gaussian(gh: int, gw: int, std: float) -> torch.Tensor:
    """(1 + N, 1 + N): zero cls row/column, exp(-(dr^2 + dc^2) / (2 std^2)) between patches."""
    n = gh * gw
    rows = [[0.0] * (1 + n)]
    for i in range(n):
        ri, ci = divmod(i, gw)
        row = [0.0]
        for j in range(n):
            rj, cj = divmod(j, gw)
            row.append(math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * std**2)))
        rows.append(row)
    return torch.tensor(rows)


def _ss(x: torch.Tensor, s: float) -> torch.Tensor:
    return torch.softmax(x @ x.transpose(-1, -2) * s, dim=-1)


def _hand_attention(method: str, grid: tuple[int, int]):
    if method == "maskclip":
        return lambda q, k, v, s: torch.eye(q.shape[1]).expand(q.shape[0], -1, -1)
    if method == "sclip":
        return lambda q, k, v, s: _ss(q, s) + _ss(k, s)
    if method == "clearclip":
        return lambda q, k, v, s: _ss(q, s)
    if method == "naclip":
        g = _hand_gaussian(*grid, std=5.0)
        return lambda q, k, v, s: torch.softmax(k @ k.transpose(-1, -2) * s + g, dim=-1)
    raise AssertionError(method)


HAND = {  # method -> (residual, ffn) of the released last block
    "maskclip": (True, True),
    "sclip": (True, True),
    "clearclip": (False, False),
    "naclip": (False, False),
}


@pytest.mark.parametrize("size", [(224, 224), (160, 224)], ids=["square", "nonsquare"])
@pytest.mark.parametrize("method", sorted(HAND))
def test_last_block_matches_hand_computation(tiny, method, size):
    images = _images(2, *size)
    x, grid = _h_before_last(tiny, images)
    residual, ffn = HAND[method]
    block = tiny.visual.transformer.resblocks[-1]
    out = _hand_last_block(block, x, _hand_attention(method, grid), residual=residual, ffn=ffn)
    with torch.no_grad():
        expected = tiny.visual.ln_post(out[:, 1:]) @ tiny.visual.proj
    enc = make_encoder(tiny, method)
    got = enc.encode_patches(images)
    assert got.shape == (2, grid[0] * grid[1], 32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    tokens = enc.encode_tokens(images)
    torch.testing.assert_close(tokens, out, rtol=1e-4, atol=1e-5)


def test_variants_differ(tiny):
    images = _images(1, 224, 224)
    feats = {m: make_encoder(tiny, m)(images) for m in BASELINES}
    for i, a in enumerate(BASELINES):
        for b in BASELINES[i + 1 :]:
            assert (feats[a] - feats[b]).abs().max() > 1e-2, (a, b)


def test_options_change_the_block(tiny):
    images = _images(1, 224, 224)
    x, grid = _h_before_last(tiny, images)
    block = tiny.visual.transformer.resblocks[-1]
    # SCLIP without residual/FFN, half temperature: by hand with scale 0.5 * d^-0.5
    enc = make_encoder(tiny, "sclip", SCLIPConfig(residual=False, ffn=False, scale=0.125))
    out = _hand_last_block(
        block, x, lambda q, k, v, s: _ss(q, 0.125) + _ss(k, 0.125), residual=False, ffn=False
    )
    torch.testing.assert_close(enc.encode_tokens(images), out, rtol=1e-4, atol=1e-5)
    # ClearCLIP with k-k attention; NACLIP with std 2 and the residual kept
    enc = make_encoder(tiny, "clearclip", ClearCLIPConfig(attention="kk"))
    out = _hand_last_block(block, x, lambda q, k, v, s: _ss(k, s), residual=False, ffn=False)
    torch.testing.assert_close(enc.encode_tokens(images), out, rtol=1e-4, atol=1e-5)
    g = _hand_gaussian(*grid, std=2.0)
    enc = make_encoder(tiny, "naclip", NACLIPConfig(gaussian_std=2.0, residual=True))
    out = _hand_last_block(
        block,
        x,
        lambda q, k, v, s: torch.softmax(k @ k.transpose(-1, -2) * s + g, dim=-1),
        residual=True,
        ffn=False,
    )
    torch.testing.assert_close(enc.encode_tokens(images), out, rtol=1e-4, atol=1e-5)
    # MaskCLIP's value path without residual/FFN is out_proj(v) alone
    enc = make_encoder(tiny, "maskclip", MaskCLIPConfig(residual=False, ffn=False))
    with torch.no_grad():
        v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)[..., 128:]
        torch.testing.assert_close(enc.encode_tokens(images), block.attn.out_proj(v))


def test_correlative_probs_are_summed_not_averaged():
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    p = correlative_probs(q, k)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.full((2, 3, 5), 2.0))


# ---------------------------------------------------------------------------------------------
# NACLIP's Gaussian neighbourhood
# ---------------------------------------------------------------------------------------------


def test_gaussian_bias_hand_values_on_2x3_grid():
    e = {n: math.exp(-n / 50.0) for n in (1, 2, 4, 5)}  # exp(-d^2 / (2 * 5^2))
    # patches (0,0) (0,1) (0,2) (1,0) (1,1) (1,2), row-major
    patches = torch.tensor(
        [
            [1, e[1], e[4], e[1], e[2], e[5]],
            [e[1], 1, e[1], e[2], e[1], e[2]],
            [e[4], e[1], 1, e[5], e[2], e[1]],
            [e[1], e[2], e[5], 1, e[1], e[4]],
            [e[2], e[1], e[2], e[1], 1, e[1]],
            [e[5], e[2], e[1], e[4], e[1], 1],
        ]
    )
    g = gaussian_neighbourhood_bias((2, 3), 5.0)
    assert g.shape == (7, 7) and g.dtype == torch.float32
    torch.testing.assert_close(g[1:, 1:], patches)
    assert torch.all(g[0] == 0) and torch.all(g[:, 0] == 0)
    torch.testing.assert_close(g, g.T)
    # rows and columns are kept apart: on a 3 x 2 grid patches 0 and 2 are vertical neighbours
    g32 = gaussian_neighbourhood_bias((3, 2), 5.0, cls_token=False)
    assert g32.shape == (6, 6)
    assert g32[0, 2] == pytest.approx(e[1]) and g[1 + 0, 1 + 2] == pytest.approx(e[4])


def _release_addition(gh: int, gw: int, std: float) -> torch.Tensor:
    """NACLIP's construction: a (2gh-1, 2gw-1) Gaussian window conv'd with one-hot maps."""
    c = 1 / (std * math.sqrt(2))
    ks = []
    for dim in (2 * gh - 1, 2 * gw - 1):
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start * c, (start + dim - 1) * c, dim))
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    onehot = torch.eye(gh * gw).view(gh * gw, 1, gh, gw)
    out = F.conv2d(onehot, window[None, None], padding="same").view(gh * gw, gh * gw)
    return F.pad(out, (1, 0, 1, 0))


@pytest.mark.parametrize("grid,std", [((3, 5), 2.0), ((14, 14), 5.0), ((4, 2), 0.7)])
def test_gaussian_bias_equals_release_construction(grid, std):
    torch.testing.assert_close(
        gaussian_neighbourhood_bias(grid, std), _release_addition(*grid, std), atol=1e-6, rtol=0
    )


# ---------------------------------------------------------------------------------------------
# the encoder contract on a real ViT-B/16 (random weights)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_shapes_dtype_every_method(tiny, vitb, method):
    # square on the small model, non-square (224 x 320 -> 14 x 20 = 280 patches) on ViT-B/16
    for bundle, (b, h, w), n, grid, dim in [
        (tiny, (2, 224, 224), 196, (14, 14), 32),
        (vitb, (1, 224, 320), 280, (14, 20), 512),
    ]:
        enc = make_encoder(bundle, method)
        assert isinstance(enc, Encoder) and enc.name == method and enc.bundle is bundle
        images = _images(b, h, w)
        with torch.enable_grad():
            out = enc(images)
        assert out.shape == (b, n, dim)
        assert out.dtype == torch.float32 and not out.requires_grad
        assert torch.isfinite(out).all()
        assert enc.grid(images) == grid and enc.grid((h, w)) == grid


def test_clip_matches_hand_forward_and_open_clip(tiny):
    images = _images(2, 224, 224)
    enc = make_encoder(tiny, "clip")
    x, _ = forward.embed(tiny.visual, images)
    with torch.no_grad():
        for blk in tiny.visual.transformer.resblocks:
            x = blk(x)
        expected = forward.project_patches(tiny.visual, x[:, 1:])
        reference = tiny.model.encode_image(images)
    torch.testing.assert_close(enc.encode_patches(images), expected, rtol=1e-4, atol=1e-5)
    pooled = forward.pool(tiny.visual, enc.encode_tokens(images))
    torch.testing.assert_close(pooled, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_single(tiny, method):
    enc = make_encoder(tiny, method)
    images = _images(3, 160, 224, seed=3)
    batch = enc(images)
    singles = torch.cat([enc(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, singles, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def low_precision(tiny) -> dict[torch.dtype, ModelBundle]:
    return {
        dtype: bundle_from_model(
            copy.deepcopy(tiny.model).to(dtype), name="ViT-B-16", pretrained="random"
        )
        for dtype in (torch.bfloat16, torch.float16)
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", BASELINES)
def test_low_precision_bundles(tiny, low_precision, method, dtype):
    images = _images(2, 96, 128)
    ref = make_encoder(tiny, method)(images)
    out = make_encoder(low_precision[dtype], method)(images)
    assert out.shape == ref.shape and out.dtype == dtype and torch.isfinite(out).all()
    cos = F.cosine_similarity(out.float(), ref, dim=-1)
    assert cos.mean() > 0.98


# ---------------------------------------------------------------------------------------------
# registry and errors
# ---------------------------------------------------------------------------------------------


def test_available_methods():
    assert set(METHODS) <= set(available_methods())
    assert available_methods()[:5] == ("clip", "maskclip", "sclip", "clearclip", "naclip")
    assert ENCODERS.get("sclip").display == "SCLIP"
    assert ENCODERS.get("naclip")["config_type"] is NACLIPConfig


def test_unknown_method_lists_close_matches(tiny):
    with pytest.raises(ValueError, match=r"'sclp'.*'sclip'.*Registered: clip, maskclip"):
        make_encoder(tiny, "sclp")
    with pytest.raises(ValueError, match="unknown encoder method 'nope'"):
        make_encoder(tiny, "nope")
    with pytest.raises(TypeError):
        make_encoder(tiny, 3)  # type: ignore[arg-type]


def test_method_names_are_case_insensitive(tiny):
    assert make_encoder(tiny, " SCLIP ").name == "sclip"


def test_wrong_config_type_is_rejected(tiny):
    with pytest.raises(TypeError, match="NACLIPConfig"):
        make_encoder(tiny, "naclip", SCLIPConfig())
    with pytest.raises(TypeError, match="no configuration"):
        make_encoder(tiny, "clip", SCLIPConfig())
    assert make_encoder(tiny, "naclip").config == NACLIPConfig(gaussian_std=5.0)


def test_config_validation():
    with pytest.raises(ValueError, match="gaussian_std"):
        NACLIPConfig(gaussian_std=0.0)
    with pytest.raises(ValueError, match="attention"):
        ClearCLIPConfig(attention="qk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        SCLIPConfig(scale=-1.0)
    with pytest.raises(ValueError, match="std"):
        gaussian_neighbourhood_bias((2, 2), -1.0)
    with pytest.raises(AttributeError):
        NACLIPConfig().gaussian_std = 3.0  # type: ignore[misc]


def test_sfp_presets_by_name(tiny):
    from sfp.methods.config import SFPConfig

    assert make_encoder(tiny, "sfp").config == SFPConfig.official()
    assert make_encoder(tiny, "sfp", "paper").config == SFPConfig.paper()
    assert make_encoder(tiny, "sfp", SFPConfig.paper()).config == SFPConfig.paper()
    with pytest.raises(ValueError, match="preset"):
        make_encoder(tiny, "sfp", "fancy")


def test_register_custom_encoder(tiny):
    class Half(Encoder):
        name = "half"

        def encode_patches(self, images, fwd_hooks=None):
            return make_encoder(self.bundle, "clip")(images) * 0.5

    register_encoder("half", lambda bundle, config: Half(bundle))
    assert "half" in available_methods()
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("HALF", lambda bundle, config: Half(bundle))
    images = _images(1, 224, 224).requires_grad_(True)
    enc = make_encoder(tiny, "half")
    out = enc(images)
    assert not out.requires_grad  # encode_patches is wrapped in no_grad for every subclass
    torch.testing.assert_close(out, make_encoder(tiny, "clip")(images) * 0.5)

    class Plain:  # not an Encoder: adapted
        def encode_patches(self, images):
            return torch.zeros(images.shape[0], 1, 1)

    register_encoder("plain", lambda bundle, config: Plain())
    plain = make_encoder(tiny, "plain")
    assert isinstance(plain, Encoder) and plain.name == "plain"
    assert plain(images).shape == (1, 1, 1)
    register_encoder("broken", lambda bundle, config: object())
    with pytest.raises(TypeError, match="encode_patches"):
        make_encoder(tiny, "broken")


def test_grid_argument_errors(tiny):
    enc = make_encoder(tiny, "clip")
    assert enc.grid(torch.zeros(3, 48, 80)) == (3, 5)
    with pytest.raises(ValueError):
        enc.grid((224,))
