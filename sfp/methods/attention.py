"""Attention variants of the training-free dense CLIP methods: pure functions on tensors.

Every function returns per-head probabilities ``(B, H, T, T)`` (float32; fp16 / bf16 for such
inputs, :func:`sfp.core.forward.work`) from per-head
queries / keys ``(B, H, T, d)``; the methods apply them to v with
:func:`sfp.core.forward.attend`. ``scale`` None means ``d ** -0.5`` everywhere.

- :func:`self_self_probs`: softmax(x x^T s) (ClearCLIP's q-q; SCLIP and SFP use q-q and k-k);
- :func:`correlative_probs`: SCLIP's softmax(q q^T s) + softmax(k k^T s) (rows sum to 2);
- :func:`neighbourhood_probs` with :func:`gaussian_neighbourhood_bias`: NACLIP's k-k
  attention plus a Gaussian bias over the patch grid.
"""

from __future__ import annotations

import torch

from sfp.core.forward import Grid, work

__all__ = [
    "correlative_probs",
    "gaussian_neighbourhood_bias",
    "neighbourhood_probs",
    "self_self_probs",
]


def _scale_of(x: torch.Tensor, scale: float | None) -> float:
    return x.shape[-1] ** -0.5 if scale is None else float(scale)


def self_self_probs(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(x x^T * scale) per head (float32, fp16 for fp16 models): x (B, H, T, d) ->
    (B, H, T, T)."""
    xf = work(x)
    return torch.softmax((xf @ xf.transpose(-1, -2)) * _scale_of(x, scale), dim=-1)


def correlative_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """SCLIP's correlative self-attention: softmax(q q^T s) + softmax(k k^T s), summed.

    q, k: (B, H, T, d) -> (B, H, T, T) float32; each row sums to 2 (not averaged, as in the
    release).
    """
    return self_self_probs(q, scale) + self_self_probs(k, scale)


def gaussian_neighbourhood_bias(
    grid: Grid, std: float, *, cls_token: bool = True, device: torch.device | None = None
) -> torch.Tensor:
    """NACLIP's neighbourhood bias over a ``(gh, gw)`` patch grid, float32.

    ``G[i, j] = exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 std^2))`` for patches ``i, j`` at rows
    ``r`` and columns ``c`` (row-major, distances in patches, rows and columns kept apart). With
    ``cls_token`` a zero row and column are prepended for the class token.
    Returns (1 + N, 1 + N) (or (N, N)), N = gh * gw; symmetric, ones on the patch diagonal.
    """
    gh, gw = int(grid[0]), int(grid[1])
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be positive, got {grid!r}.")
    if not std > 0:
        raise ValueError(f"std must be positive, got {std!r}.")
    rows = torch.arange(gh, device=device, dtype=torch.float32).repeat_interleave(gw)
    cols = torch.arange(gw, device=device, dtype=torch.float32).repeat(gh)
    d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    bias = torch.exp(-d2 / (2.0 * float(std) ** 2))
    if cls_token:
        bias = torch.nn.functional.pad(bias, (1, 0, 1, 0))
    return bias


def neighbourhood_probs(
    k: torch.Tensor, bias: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """NACLIP's attention: softmax(k k^T * scale + bias) in work precision (float32; fp16
    for fp16 keys).

    k: (B, H, T, d), bias: (T, T) added to the logits of every head -> (B, H, T, T).
    """
    kf = work(k)
    logits = (kf @ kf.transpose(-1, -2)) * _scale_of(k, scale)
    return torch.softmax(logits + bias.to(device=logits.device, dtype=logits.dtype), dim=-1)
