"""The one forward path of an open_clip ViT visual tower, with named hook points.

Everything in sfp that runs the visual tower — the probe, the SFP encoder, the baselines, the
planted-outlier calibration, interventions — goes through these functions, so there is
exactly one place where images become tokens and tokens go through blocks. For a 224 x 224
input it equals open_clip's own ``encode_image`` (to float tolerance); other sizes and
non-square images work too: the positional embedding is interpolated bicubically
(align_corners=False) to the exact patch grid ``(gh, gw)``, rows and columns kept apart.

Tokens are ordered ``[cls, patch_1 .. patch_N]`` with patches row-major on the grid (a hook
at ``hook_embed`` may append extra tokens, e.g. registers, after the patches). Layers are
numbered 1..L: layer ``l`` is the output of block ``l``. The hook points and the rules for
hooks are described in :mod:`sfp.core.hooks`::

    names = hook_names(bundle)          # ["hook_embed", "blocks.1.hook_resid_pre", ...]
    def ablate(act, name):              # act: (B, T, d_mlp)
        act = act.clone(); act[..., 42] = 0; return act
    emb = run_with_hooks(bundle, images, fwd_hooks=[("blocks.6.mlp.hook_post", ablate)])

A block is assembled from three pieces that fire its hook points — :func:`attention_inputs`
(ln_1, in_proj: q, k, v), :func:`attention_output` (per-head output -> out_proj, LayerScale)
and :func:`mlp_output` (ln_2, c_fc, activation, c_proj, LayerScale); :func:`block_forward`
is the standard pre-norm block, and methods that change block L (:mod:`sfp.methods`) compose
the same pieces with their own attention.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sfp.core.errors import InputError
from sfp.core.hooks import EMBED, NO_HOOKS, HookFn, Hooks, block_hook
from sfp.core.hooks import hook_names as _hook_names

__all__ = [
    "Grid",
    "InputError",
    "attend",
    "work",
    "attention_inputs",
    "attention_output",
    "attention_probs",
    "base_grid",
    "block_forward",
    "blocks_of",
    "check_images",
    "embed",
    "encode_image",
    "hook_names",
    "merge_heads",
    "mlp_output",
    "pattern_hook",
    "patch_grid",
    "pool",
    "positional_embedding",
    "project_patches",
    "qkv",
    "run",
    "run_blocks",
    "run_with_hooks",
    "standard_heads",
    "visual_of",
]

Grid = tuple[int, int]


def visual_of(model_or_bundle: Any) -> nn.Module:
    """The open_clip ``VisionTransformer`` of a bundle, a CLIP model or the tower itself."""
    obj = getattr(model_or_bundle, "model", model_or_bundle)
    return getattr(obj, "visual", obj)


def blocks_of(visual: nn.Module) -> nn.ModuleList:
    return visual.transformer.resblocks


def patch_grid(visual: nn.Module, height: int, width: int) -> Grid:
    """Patch grid ``(gh, gw)`` of an input of ``height x width`` pixels."""
    p = visual.patch_size
    ph, pw = (p, p) if isinstance(p, int) else p
    return height // ph, width // pw


def check_images(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Validate a normalised image batch ``(B, 3, H, W)``; returns it on the tower's device."""
    if not isinstance(images, torch.Tensor):
        raise InputError(
            f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}; "
            "use sfp.core.io.load_image and sfp.core.io.normalize to make one."
        )
    if images.ndim == 3:
        raise InputError(
            f"images must be batched (B, 3, H, W), got {tuple(images.shape)}; use images[None]."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images must be (B, 3, H, W), got {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise InputError(f"images must be a float tensor (normalised), got {images.dtype}.")
    gh, gw = patch_grid(visual, images.shape[2], images.shape[3])
    if gh < 1 or gw < 1:
        raise InputError(
            f"images of {images.shape[2]} x {images.shape[3]} px are smaller than one "
            f"{visual.patch_size} patch."
        )
    w = visual.conv1.weight
    return images.to(device=w.device, dtype=w.dtype)


def base_grid(visual: nn.Module) -> Grid:
    """The pretraining patch grid ``(g0h, g0w)`` of the positional embedding."""
    n = visual.positional_embedding.shape[0] - 1
    gh, gw = visual.grid_size
    if gh * gw != n:  # pragma: no cover - open_clip keeps these consistent
        side = int(round(n**0.5))
        gh, gw = side, n // side
    return int(gh), int(gw)


def positional_embedding(visual: nn.Module, grid: Grid) -> torch.Tensor:
    """Positional embedding for ``grid``: ``(1 + gh*gw, C)``.

    The pretraining grid's embedding is returned unchanged; any other grid gets a bicubic
    interpolation (align_corners=False, computed in float32) to exactly ``(gh, gw)``.
    """
    pos = visual.positional_embedding
    g0 = base_grid(visual)
    if tuple(grid) == g0:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    c = patch_pos.shape[-1]
    patch_pos = patch_pos.float().reshape(1, g0[0], g0[1], c).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], c).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def embed(
    visual: nn.Module, images: torch.Tensor, hooks: Hooks = NO_HOOKS
) -> tuple[torch.Tensor, Grid]:
    """Patchify, prepend cls, add positional embedding, ln_pre; fires ``hook_embed``.

    images: (B, 3, H, W) normalised -> tokens (B, 1 + N, C), grid (gh, gw).
    """
    images = check_images(visual, images)
    x = visual.conv1(images)  # (B, C, gh, gw)
    grid = (int(x.shape[2]), int(x.shape[3]))
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + positional_embedding(visual, grid).to(x.dtype)
    x = visual.patch_dropout(x)
    return hooks(EMBED, visual.ln_pre(x)), grid


# ---------------------------------------------------------------------------------------------
# Attention primitives (pure functions)
# ---------------------------------------------------------------------------------------------


def qkv(block: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head q, k, v of a block for already layer-normed tokens.

    y: (B, T, C) -> q, k, v each (B, H, T, d_head).
    """
    attn: nn.MultiheadAttention = block.attn
    b, t, c = y.shape
    h = attn.num_heads
    out = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
    out = out.view(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
    return out[0], out[1], out[2]


def merge_heads(block: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """Concatenate heads and apply the block's out_proj: (B, H, T, d) -> (B, T, C)."""
    b, h, t, d = o.shape
    o = o.transpose(1, 2).reshape(b, t, h * d)
    return block.attn.out_proj(o)


#: Dtypes that attention, similarities and SFP's steps are computed in as they come (the
#: release runs every step in fp16 on CUDA); every other dtype is computed in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype sfp computes in: fp16 / bf16 as they are (the release's convention
    for fp16 models), anything else float32 (a no-op for float32 models)."""
    return t if t.dtype in LOW_PRECISION else t.float()


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) in :func:`work` precision: (B, H, T, d) x2 -> (B, H, T, T)."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((work(q) @ work(k).transpose(-1, -2)) * scale, dim=-1)


def attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs @ v in :func:`work` precision, cast to v's dtype: (B, H, T, T), (B, H, T, d) ->
    (B, H, T, d)."""
    return (work(probs).to(work(v).dtype) @ work(v)).to(v.dtype)


# ---------------------------------------------------------------------------------------------
# Block pieces (each fires its hook points)
# ---------------------------------------------------------------------------------------------


def attention_inputs(
    block: nn.Module, x: torch.Tensor, layer: int = 0, hooks: Hooks = NO_HOOKS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``in_proj(ln_1(x))``, through ``attn.hook_q|k|v``: each (B, H, T, d)."""
    q, k, v = qkv(block, block.ln_1(x))
    if not hooks.touches(layer):
        return q, k, v
    return (hooks(block_hook(layer, "attn.hook_q"), q), hooks(block_hook(layer, "attn.hook_k"), k),
            hooks(block_hook(layer, "attn.hook_v"), v))


def pattern_hook(
    probs: torch.Tensor, layer: int, hooks: Hooks
) -> tuple[torch.Tensor, bool]:
    """Run ``attn.hook_pattern`` on ``probs`` (B, H, T, T); returns (pattern, replaced).

    ``replaced`` is False when every hook returned None or its input unmodified (checked with
    the tensor's version counter, so an in-place edit counts as a replacement).
    """
    version = _version(probs)
    out = hooks(block_hook(layer, "attn.hook_pattern"), probs)
    return out, out is not probs or _version(probs) != version


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None for inference tensors, which have none:
    under ``torch.inference_mode`` an in-place edit of the pattern goes unnoticed)."""
    try:
        return t._version
    except RuntimeError:
        return None


def standard_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int = 0, hooks: Hooks = NO_HOOKS
) -> torch.Tensor:
    """Per-head output of softmax(q k^T / sqrt(d)) attention: (B, H, T, d).

    Comes from ``scaled_dot_product_attention`` unless a hook at ``attn.hook_pattern``
    replaces the probabilities (then ``pattern @ v`` in float32); the probabilities are only
    formed when a hook asks for them.
    """
    name = block_hook(layer, "attn.hook_pattern")
    if hooks.has(name):
        pattern, replaced = pattern_hook(attention_probs(q, k), layer, hooks)
        if replaced:
            return attend(pattern, v)
    return F.scaled_dot_product_attention(q, k, v)


def attention_output(
    block: nn.Module,
    o: torch.Tensor,
    layer: int = 0,
    hooks: Hooks = NO_HOOKS,
    layer_scale: bool = True,
) -> torch.Tensor:
    """Per-head output o (B, H, T, d) through ``attn.hook_z``, out_proj and (``layer_scale``)
    ls_1, then ``hook_attn_out``: the attention branch (B, T, C)."""
    o = hooks(block_hook(layer, "attn.hook_z"), o)
    a = merge_heads(block, o)
    a = block.ls_1(a) if layer_scale else a
    return hooks(block_hook(layer, "hook_attn_out"), a)


def mlp_output(
    block: nn.Module, x: torch.Tensor, layer: int = 0, hooks: Hooks = NO_HOOKS
) -> torch.Tensor:
    """The MLP branch ``ls_2(mlp(ln_2(x)))`` (B, T, C), through ``mlp.hook_pre`` (c_fc
    output), ``mlp.hook_post`` (after the activation) and ``hook_mlp_out``."""
    y = block.ln_2(x)
    if not hooks.touches(layer):
        return block.ls_2(block.mlp(y))
    fc, act, *rest, proj = block.mlp.children()  # open_clip: c_fc, gelu, [ln], c_proj
    pre = hooks(block_hook(layer, "mlp.hook_pre"), fc(y))
    post = hooks(block_hook(layer, "mlp.hook_post"), act(pre))
    for m in rest:
        post = m(post)
    out = block.ls_2(proj(post))
    return hooks(block_hook(layer, "hook_mlp_out"), out)


def block_forward(
    block: nn.Module, x: torch.Tensor, layer: int = 0, hooks: Hooks = NO_HOOKS
) -> torch.Tensor:
    """One standard pre-norm ViT block, equal to open_clip's ``ResidualAttentionBlock``.

    x: (B, T, C) -> (B, T, C). ``layer`` names the block's hook points (1-indexed).
    """
    if not hooks.touches(layer):
        q, k, v = qkv(block, block.ln_1(x))
        x = x + block.ls_1(merge_heads(block, F.scaled_dot_product_attention(q, k, v)))
        return x + block.ls_2(block.mlp(block.ln_2(x)))
    x = hooks(block_hook(layer, "hook_resid_pre"), x)
    q, k, v = attention_inputs(block, x, layer, hooks)
    a = attention_output(block, standard_heads(q, k, v, layer, hooks), layer, hooks)
    x = hooks(block_hook(layer, "hook_resid_mid"), x + a)
    x = x + mlp_output(block, x, layer, hooks)
    return hooks(block_hook(layer, "hook_resid_post"), x)


def run_blocks(
    visual: nn.Module,
    x: torch.Tensor,
    start: int = 1,
    stop: int | None = None,
    hooks: Hooks = NO_HOOKS,
) -> torch.Tensor:
    """Run blocks ``start..stop`` (1-indexed, inclusive) on tokens x: (B, T, C) -> (B, T, C)."""
    blocks = blocks_of(visual)
    stop = len(blocks) if stop is None else stop
    for layer in range(start, stop + 1):
        x = block_forward(blocks[layer - 1], x, layer, hooks)
    return x


def pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image embedding from final tokens, as open_clip does: (B, T, C) -> (B, D)."""
    if getattr(visual, "final_ln_after_pool", False):
        pooled = x[:, 1:].mean(1) if visual.pool_type == "avg" else x[:, 0]
        pooled = visual.ln_post(pooled)
    else:
        x = visual.ln_post(x)
        pooled = x[:, 1:].mean(1) if visual.pool_type == "avg" else x[:, 0]
    return pooled @ visual.proj if visual.proj is not None else pooled


def project_patches(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """ln_post then proj on patch tokens: (B, N, C) -> (B, N, D)."""
    y = visual.ln_post(tokens)
    return y @ visual.proj if visual.proj is not None else y


# ---------------------------------------------------------------------------------------------
# Whole forward
# ---------------------------------------------------------------------------------------------


def hook_names(model_or_bundle: Any) -> list[str]:
    """Every hook point of the model's visual forward, in the order they are reached."""
    return _hook_names(len(blocks_of(visual_of(model_or_bundle))))


def run(
    model_or_bundle: Any,
    images: torch.Tensor,
    fwd_hooks: Hooks | Iterable[tuple[str, HookFn]] | None = None,
) -> tuple[torch.Tensor, Grid]:
    """Embed and run every block: images (B, 3, H, W) -> (final tokens (B, T, C), grid)."""
    visual = visual_of(model_or_bundle)
    hooks = Hooks.of(fwd_hooks, len(blocks_of(visual)))
    x, grid = embed(visual, images, hooks)
    return run_blocks(visual, x, hooks=hooks), grid


def run_with_hooks(
    model_or_bundle: Any,
    images: torch.Tensor,
    fwd_hooks: Hooks | Iterable[tuple[str, HookFn]] | None = None,
) -> torch.Tensor:
    """Image embeddings (B, D), not normalised, with ``fwd_hooks`` at their hook points.

    fwd_hooks: ``[(name, fn), ...]`` with ``fn(tensor, name) -> replacement | None`` (see
    :mod:`sfp.core.hooks`). Runs under ``torch.no_grad``. Without hooks (or with hooks that
    return None) the result is bit-identical to the plain forward.
    """
    visual = visual_of(model_or_bundle)
    with torch.no_grad():
        x, _ = run(visual, images, fwd_hooks)
        return pool(visual, x)


def encode_image(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Image embeddings through sfp's forward: (B, 3, H, W) -> (B, D), not normalised."""
    return pool(visual, run(visual, images)[0])
