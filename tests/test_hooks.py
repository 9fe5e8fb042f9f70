"""Hook points of the forward: names, identity, interventions, and every method firing them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sfp
from sfp.core import forward
from sfp.core.errors import HookError
from sfp.core.hooks import BLOCK_POINTS, Hooks, hook_names, parse_hook_name
from sfp.core.probe import head_contributions, record
from sfp.methods.attention import correlative_probs
from sfp.methods.encoders import make_encoder


@pytest.fixture(scope="module")
def x_tiny():
    return torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))


def _all_hooks(num_layers, fn):
    return [(n, fn) for n in hook_names(num_layers)]


def test_names_are_one_indexed_and_complete(tiny_vit):
    names = sfp.hook_names(tiny_vit)
    assert len(names) == 1 + 6 * len(BLOCK_POINTS)
    assert names[0] == "hook_embed" and names[1] == "blocks.1.hook_resid_pre"
    assert names[-1] == "blocks.6.hook_resid_post"
    assert "blocks.6.mlp.hook_post" in names and "blocks.0.hook_resid_pre" not in names
    assert parse_hook_name("blocks.3.attn.hook_pattern") == (3, "attn.hook_pattern")


def test_identity_hooks_leave_outputs_bit_identical(tiny_vit, x_tiny):
    plain = sfp.run_with_hooks(tiny_vit, x_tiny)
    look = sfp.run_with_hooks(tiny_vit, x_tiny, _all_hooks(6, lambda t, n: None))
    same = sfp.run_with_hooks(tiny_vit, x_tiny, _all_hooks(6, lambda t, n: t))
    assert torch.equal(plain, look) and torch.equal(plain, same)
    with torch.no_grad():
        assert torch.equal(plain, forward.encode_image(tiny_vit.visual, x_tiny))


def test_identity_hooks_bit_identical_on_vit_b16(vit_b16):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    plain = sfp.run_with_hooks(vit_b16, x)
    hooked = sfp.run_with_hooks(vit_b16, x, _all_hooks(12, lambda t, n: t))
    assert torch.equal(plain, hooked)
    with torch.no_grad():
        assert (plain - vit_b16.model.encode_image(x)).abs().max() < 1e-5


def _block_by_hand(block, x, neuron=None):
    """A pre-norm block written out from its weights, optionally with one MLP neuron zeroed."""
    c, h = x.shape[-1], block.attn.num_heads
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    y = F.layer_norm(x, (c,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    q, k, v = (y @ w[i * c:(i + 1) * c].T + b[i * c:(i + 1) * c] for i in range(3))
    split = [t.view(*t.shape[:2], h, c // h).transpose(1, 2) for t in (q, k, v)]
    att = torch.softmax(split[0] @ split[1].transpose(-1, -2) / (c // h) ** 0.5, dim=-1)
    o = (att @ split[2]).transpose(1, 2).reshape(x.shape)
    x = x + o @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    y = F.layer_norm(x, (c,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    act = F.gelu(y @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias)
    if neuron is not None:
        act[..., neuron] = 0
    return x + act @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias, act


def test_zeroing_a_neuron_matches_by_hand(tiny_vit, x_tiny):
    def zero(t, name):
        t = t.clone()
        t[..., 7] = 0
        return t

    plain = sfp.run_with_hooks(tiny_vit, x_tiny)
    ablated = sfp.run_with_hooks(tiny_vit, x_tiny, [("blocks.6.mlp.hook_post", zero)])
    assert (plain - ablated).abs().max() > 1e-4
    with torch.no_grad():
        tokens, _ = forward.embed(tiny_vit.visual, x_tiny)
        h5 = forward.run_blocks(tiny_vit.visual, tokens, 1, 5)
        h6, _ = _block_by_hand(tiny_vit.visual.transformer.resblocks[5], h5, neuron=7)
        expect = forward.pool(tiny_vit.visual, h6)
    assert (ablated - expect).abs().max() < 1e-5


def test_zeroing_a_neuron_changes_vit_b16(vit_b16):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))

    def zero(t, name):
        return t.index_fill(-1, torch.tensor([100]), 0.0)

    plain = sfp.run_with_hooks(vit_b16, x)
    ablated = sfp.run_with_hooks(vit_b16, x, [("blocks.6.mlp.hook_post", zero)])
    assert not torch.equal(plain, ablated)


def test_recorded_pattern_equals_trace_attention(tiny_vit, x_tiny):
    seen = {}

    def keep(t, name):
        seen[name] = t.clone()

    trace = record(tiny_vit, x_tiny, layers=[2, 5],
                   fwd_hooks=[("blocks.5.attn.hook_pattern", keep)])
    assert torch.equal(seen["blocks.5.attn.hook_pattern"], trace.attention(5))


def test_pattern_replacement_and_in_place_edit(tiny_vit, x_tiny):
    def uniform(t, name):
        return torch.full_like(t, 1.0 / t.shape[-1])

    def in_place(t, name):
        t.fill_(1.0 / t.shape[-1])

    a = sfp.run_with_hooks(tiny_vit, x_tiny, [("blocks.3.attn.hook_pattern", uniform)])
    b = sfp.run_with_hooks(tiny_vit, x_tiny, [("blocks.3.attn.hook_pattern", in_place)])
    plain = sfp.run_with_hooks(tiny_vit, x_tiny)
    assert torch.allclose(a, b, atol=1e-6) and (a - plain).abs().max() > 1e-4
    with torch.no_grad():  # uniform attention: every token gets the mean value vector
        tokens, _ = forward.embed(tiny_vit.visual, x_tiny)
        h2 = forward.run_blocks(tiny_vit.visual, tokens, 1, 2)
        block = tiny_vit.visual.transformer.resblocks[2]
        _, _, v = forward.qkv(block, block.ln_1(h2))
        o = v.mean(dim=2, keepdim=True).expand_as(v)
        h3 = h2 + forward.merge_heads(block, o)
        h3 = h3 + block.mlp(block.ln_2(h3))
        expect = forward.pool(tiny_vit.visual, forward.run_blocks(tiny_vit.visual, h3, 4, 6))
    assert (a - expect).abs().max() < 1e-5


def test_hook_errors(tiny_vit, x_tiny):
    with pytest.raises(HookError, match="Did you mean blocks.2.mlp.hook_post"):
        sfp.run_with_hooks(tiny_vit, x_tiny, [("blocks.2.mlp.hook_pots", lambda t, n: None)])
    with pytest.raises(HookError, match="outside 1..6"):
        sfp.run_with_hooks(tiny_vit, x_tiny, [("blocks.7.hook_resid_post", lambda t, n: None)])
    with pytest.raises(HookError, match="returned int"):
        sfp.run_with_hooks(tiny_vit, x_tiny, [("blocks.2.hook_resid_mid", lambda t, n: 3)])
    with pytest.raises(HookError, match="keep the shape"):
        sfp.run_with_hooks(tiny_vit, x_tiny, [("blocks.2.hook_mlp_out", lambda t, n: t[:, :3])])
    with pytest.raises(HookError, match=r"\(name, fn\) pairs"):
        Hooks(["blocks.1.hook_resid_pre"])


def test_embed_hook_may_append_tokens(tiny_vit, x_tiny):
    def registers(t, name):
        return torch.cat([t, t[:, :1].expand(-1, 2, -1)], dim=1)

    trace = record(tiny_vit, x_tiny, layers=[6], fwd_hooks=[("hook_embed", registers)])
    assert trace.hidden(6).shape[1] == 1 + 20 + 2
    assert trace.cls_attention(6).shape[-1] == 20


def test_baselines_fire_block_l_hooks_with_their_attention(tiny_vit, x_tiny):
    seen = {}

    def keep(t, name):
        seen[name] = t

    enc = make_encoder(tiny_vit, "sclip")
    enc.encode_patches(x_tiny, fwd_hooks=[("blocks.6.attn.hook_pattern", keep),
                                          ("blocks.6.attn.hook_q", keep),
                                          ("blocks.6.attn.hook_k", keep)])
    q, k = seen["blocks.6.attn.hook_q"], seen["blocks.6.attn.hook_k"]
    assert torch.equal(seen["blocks.6.attn.hook_pattern"], correlative_probs(q, k))
    for method in ("clip", "maskclip", "clearclip", "naclip", "sfp"):
        e = make_encoder(tiny_vit, method)
        base = e.encode_patches(x_tiny)
        same = e.encode_patches(x_tiny, fwd_hooks=_all_hooks(6, lambda t, n: t))
        assert torch.equal(base, same), method


def test_sfp_takes_interventions(tiny_vit, x_tiny):
    enc = make_encoder(tiny_vit, "sfp")
    base = enc.encode_patches(x_tiny)

    def zero(t, name):
        return torch.zeros_like(t)

    changed = enc.encode_patches(x_tiny, fwd_hooks=[("blocks.3.mlp.hook_post", zero)])
    assert (base - changed).abs().max() > 1e-4


def test_trace_records_neurons_and_contributions(tiny_vit, x_tiny):
    t = record(tiny_vit, x_tiny, layers=[3, 4],
               store=("hidden", "mlp", "attn_out", "mlp_out", "head_out"))
    block = tiny_vit.visual.transformer.resblocks[3]
    with torch.no_grad():
        h4, act = _block_by_hand(block, t.hidden(3))
    assert (t.mlp(4) - act).abs().max() < 1e-4
    assert (t.hidden(4) - h4).abs().max() < 1e-4
    assert (t.hidden(3) + t.attn_out(4) + t.mlp_out(4) - t.hidden(4)).abs().max() < 1e-5
    heads = t.head_out(4)
    assert heads.shape == (2, tiny_vit.heads, 21, tiny_vit.width)
    bias = block.attn.out_proj.bias
    assert (heads.sum(1) + bias - t.attn_out(4)).abs().max() < 1e-5
    z = torch.randn(1, tiny_vit.heads, 3, tiny_vit.width // tiny_vit.heads)
    by_hand = forward.merge_heads(block, z) - bias
    assert (head_contributions(block, z).sum(1) - by_hand).abs().max() < 1e-5


def test_trace_tensors_are_ordinary(tiny_vit, x_tiny):
    t = record(tiny_vit, x_tiny, layers=[5])
    h = t.hidden(5)
    assert not h.is_inference() and not h.requires_grad
    block = tiny_vit.visual.transformer.resblocks[4]
    out = block.ln_1(h)  # outside no_grad: would raise for inference-mode tensors
    assert out.requires_grad


def test_record_under_intervention_sees_it(tiny_vit, x_tiny):
    def zero(t, name):
        return t.index_fill(-1, torch.tensor([5]), 0.0)

    t = record(tiny_vit, x_tiny, layers=[2], store=("mlp",),
               fwd_hooks=[("blocks.2.mlp.hook_post", zero)])
    assert torch.equal(t.mlp(2)[..., 5], torch.zeros_like(t.mlp(2)[..., 5]))


def test_hooks_work_under_inference_mode(tiny_vit, x_tiny):
    with torch.inference_mode():
        t = record(tiny_vit, x_tiny, layers=[3])
        out = sfp.run_with_hooks(tiny_vit, x_tiny,
                                 [("blocks.3.attn.hook_pattern", lambda p, n: p * 0 + 0.05)])
    assert t.attention(3).shape[-1] == 21 and torch.isfinite(out).all()
