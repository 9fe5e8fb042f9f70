"""The one forward path of an open_clip ViT visual tower that sfp owns.

The probe, the SFP encoder and the baselines all build on these functions, so there is
exactly one place where images become tokens and tokens go through blocks. For a 224 x 224
input it equals open_clip's own ``encode_image`` (to float tolerance); other sizes and
non-square images work too: the positional embedding is interpolated bicubically
(align_corners=False) to the exact patch grid ``(gh, gw)``, rows and columns kept apart.

Tokens are ordered ``[cls, patch_1 .. patch_N]`` with patches row-major on the grid. Layers
are numbered 1..L: layer ``l`` is the output of block ``l``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Grid = tuple[int, int]


class InputError(ValueError):
    """Images given to the visual tower have the wrong type, shape or size."""


def visual_of(model_or_bundle) -> nn.Module:
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


def embed(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, Grid]:
    """Patchify, prepend cls, add positional embedding, ln_pre.

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
    return visual.ln_pre(x), grid


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


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) in float32: (B, H, T, d) x2 -> (B, H, T, T)."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)


@dataclass
class BlockOutput:
    """What one block computed: its output and, when asked, its attention."""

    hidden: torch.Tensor  # (B, T, C)
    attention: torch.Tensor | None = None  # (B, H, T, T) float32


def block_forward(block: nn.Module, x: torch.Tensor, need_attention: bool = False) -> BlockOutput:
    """One standard pre-norm ViT block, equal to open_clip's ``ResidualAttentionBlock``.

    The output always comes from ``scaled_dot_product_attention``; when ``need_attention`` the
    probabilities are computed beside it, so recording never changes the numbers.
    x: (B, T, C) -> BlockOutput(hidden (B, T, C), attention (B, H, T, T) | None).
    """
    q, k, v = qkv(block, block.ln_1(x))
    o = F.scaled_dot_product_attention(q, k, v)
    x = x + block.ls_1(merge_heads(block, o))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return BlockOutput(x, attention_probs(q, k) if need_attention else None)


Tap = Callable[[int, BlockOutput], None]


def run_blocks(
    visual: nn.Module,
    x: torch.Tensor,
    start: int = 1,
    stop: int | None = None,
    *,
    attention_layers: frozenset[int] | set[int] = frozenset(),
    tap: Tap | None = None,
) -> torch.Tensor:
    """Run blocks ``start..stop`` (1-indexed, inclusive) on tokens x: (B, T, C) -> (B, T, C).

    ``tap(l, out)`` is called after each block with its :class:`BlockOutput`; attention is
    computed for layers in ``attention_layers``.
    """
    blocks = blocks_of(visual)
    stop = len(blocks) if stop is None else stop
    for layer in range(start, stop + 1):
        out = block_forward(blocks[layer - 1], x, need_attention=layer in attention_layers)
        if tap is not None:
            tap(layer, out)
        x = out.hidden
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


def encode_image(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Image embeddings through sfp's forward: (B, 3, H, W) -> (B, D), not normalised."""
    x, _ = embed(visual, images)
    return pool(visual, run_blocks(visual, x))
