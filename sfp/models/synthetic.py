"""A real-architecture CLIP whose weights are edited so that attention outliers appear at known
positions: label everything it shows "synthetic (planted outliers)".

What it is for
    The machines this project is developed on have no pretrained weights, and a randomly
    initialised CLIP has no outliers at all (every patch-token norm is within a few percent of
    the median). Detectors, mitigation, probes and widgets still need something to find. This
    module builds an ordinary ``open_clip`` model of the requested architecture (no hooks, no
    extra modules: its state dict loads into a fresh ``open_clip.create_model(name)``) whose
    weights are edited so that outliers arise *inside the forward pass* the way the literature
    reports them, together with a :class:`PlantedTruth` that says, from the image alone, where
    they are. It is **not** a substitute for pretrained weights: apart from the planted circuit
    the weights are random, the embeddings mean nothing, and no number measured on it says
    anything about CLIP (segmentation quality, zero-shot accuracy, how real outliers behave in
    detail). Use it for tests and teaching, with the label on every figure.

How it is built (``planted_model``)
    Start from ``open_clip.create_model(name)`` after ``torch.manual_seed(seed)``. A seeded
    draw reserves a few dozen residual channels ("planted channels"); every random weight that
    writes into them or reads from them is zeroed, so they hold only what the planted circuit
    puts there. The random positional embedding is scaled up (``position_scale``, to the size
    of the patch features, as in trained CLIPs): at its initial size, large uniform regions
    give near-identical tokens, and norm statistics flag ordinary object patches. Then:

    1. Patch embedding (``conv1``, positional and class embeddings). ``conv1`` filters compute
       the ``2 s (s - 1)`` differences between horizontally and vertically adjacent sub-blocks
       of the patch (an ``s x s`` grid of sub-blocks, ``s = 4`` for 16 px patches, on the mean
       of the three normalised colour channels). The positional embedding adds a constant
       channel and an *eligibility* channel: +1 at ``n_outliers`` fixed interior grid positions
       drawn by the seed (at least ``min_spacing`` apart), -1 elsewhere and at the class token
       ("redundant background positions": Darcet et al., *Vision Transformers Need Registers*,
       ICLR 2024). The class embedding marks the class token in its own channel.
    2. Block ``onset - 1``, MLP ("contrast neurons"): per difference and sign, a pair of GELU
       neurons forms a clipped ramp that fires when ``|difference| > flat_threshold``; their
       sum goes to a *busy* channel (bounded, small).
    3. Block ``onset``, MLP ("register neurons", Jiang et al., *Vision Transformers Don't Need
       Trained Registers*, 2025): one clipped-ramp pair fires when the token is eligible and
       not busy, and writes a vector of norm ``massive_norm`` along two fixed channels with
       opposite signs (Sun et al., *Massive Activations in Large Language Models*, 2024). From
       this layer on the planted tokens' norms are ``~strength`` x the median patch norm.
    4. Blocks ``onset + 1 .. L``, every head: the key projection reads the massive channels
       along a head direction ``u``, the query bias points along ``u`` for every token (more
       for the class token), and the query of a massive token points against ``u``. The value
       projection ignores the massive channels. So from the layer after the outliers, the class
       token and the other patches attend to the planted tokens (attention sinks that carry
       nothing), while the planted tokens avoid themselves: ``A[cls, i] > A[i, i]`` at exactly
       those tokens (SFP's criterion).
    5. Optionally (``sink_value`` > 0, as the toy CLIP plants it), in the last
       ``sink_value_layers`` blocks the value projection reads the massive channels too, so
       the sinks carry one fixed vector per block (a random direction of the residual stream,
       norm ``sink_value`` x the reference median patch norm) into every token that attends
       to them: what a patch says is overwritten by something that is not about that patch,
       which is how high-norm tokens spoil dense prediction (their content is global, not
       local: Darcet et al.).

    ``massive_norm`` is calibrated on a generated reference scene so that the planted norm is
    ``strength`` times the largest median patch norm of layers ``onset .. L`` (the reference
    median patch norm).

The planting rule (``PlantedTruth.mask``)
    A patch token is planted iff its grid position is *eligible* and its patch is *flat*:

    - flat: every difference between adjacent sub-block means of the patch (colour-averaged,
      normalised pixel units) is at most ``flat_threshold`` in absolute value; only the full
      ``gh x gw`` patches that ``conv1`` sees count (right/bottom remainders are dropped);
    - eligible: on the model's base grid, one of the ``n_outliers`` seeded positions. For any
      other grid the +-1 eligibility map is resized exactly as
      :func:`sfp.core.forward.positional_embedding` resizes the positional embedding
      (bicubic, align_corners=False) and a position is eligible where the resized value is > 0.

    At most ``n_outliers`` tokens per base-grid image (default 5% of the base grid: 10 of 196
    for ViT-B-16), fewer where eligible patches hold an edge or texture. Both tests are sharp
    thresholds computed by continuous neurons: within a thin band around each threshold
    (differences within ~1e-4 of ``flat_threshold``, resized eligibility within ~0.01 of 0;
    :meth:`PlantedTruth.margins` reports both) the model may plant a partial outlier.

The planted circuit is built for float32; in float16 / bfloat16 its high-gain neurons lose
precision or overflow. On CUDA, cuDNN's TF32 convolutions (PyTorch's default) perturb the
sub-block differences by ~1e-3, so patches that close to ``flat_threshold`` may flip; set
``torch.backends.cudnn.allow_tf32 = False`` for exact agreement with the mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from sfp.core import forward
from sfp.core.hooks import block_hook, parse_hook_name
from sfp.models.bundle import PROVENANCES, ModelBundle, bundle_from_model

__all__ = [
    "SYNTHETIC_LABEL",
    "PlantConfig",
    "PlantedTruth",
    "default_onset",
    "plant_outliers",
    "planted_model",
    "synthetic_scene",
]

#: The ``pretrained`` field (and the caveat) of every synthetic bundle.
SYNTHETIC_LABEL: str = PROVENANCES["synthetic"]  # type: ignore[assignment]


@dataclass(frozen=True)
class PlantConfig:
    """Constants of the planted circuit (defaults are the tuned values; rarely changed).

    Signal magnitudes are in the residual stream *before* ``ln_pre``; gains are c_fc weights.
    """

    flat_threshold: float = 1.0  # max |adjacent sub-block difference| of a flat patch
    subgrid: int = 4  # sub-blocks per patch side (largest of 4, 2 dividing the patch size)
    outlier_fraction: float = 0.05  # default n_outliers = round(fraction * base-grid patches)
    min_spacing: int = 3  # Chebyshev distance between eligible positions (2 if they don't fit)
    signal: float = 0.1  # size of the planted embedding channels (constant, eligibility, ...)
    ramp: float = 10.0  # height of a clipped GELU ramp: GELU(z) - GELU(z - ramp)
    contrast_gain: float = 1e6  # contrast neurons: c_fc weight per unit of signal
    busy_weight: float = 0.05  # busy channel written per violated difference
    register_gain: float = 1e5  # register neurons: c_fc weight per unit of signal
    busy_veto: float = 100.0  # a busy token's veto, relative to the eligibility signal
    patch_sink_logit: float = 4.0  # logit bonus of a patch query on a planted key
    cls_sink_logit: float = 8.0  # same for the class-token query
    self_sink_logit: float = -4.0  # same for a planted query (planted tokens avoid each other)
    #: what a planted token's value carries in the last ``sink_value_layers`` blocks: one fixed
    #: vector of norm ``sink_value`` x the reference median patch norm (0: nothing)
    sink_value: float = 0.0
    sink_value_layers: int = 1
    strength: float = 20.0  # default planted norm / median patch norm
    position_scale: float = 12.0  # random positional embedding x this (diverse patch tokens)
    #: the dedicated residual channels (zero, one, eligible, cls, busy, the contrast channels,
    #: the two massive ones: 7 + 2 s (s - 1)); None: a seeded draw
    channels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _Channels:
    zero: int
    one: int
    eligible: int
    cls: int
    busy: int
    contrast: tuple[int, ...]
    massive: tuple[int, int]

    @property
    def all(self) -> tuple[int, ...]:
        return (
            self.zero,
            self.one,
            self.eligible,
            self.cls,
            self.busy,
            *self.contrast,
            *self.massive,
        )


@dataclass(frozen=True, eq=False)
class PlantedTruth:
    """Where a :func:`planted_model` puts its outliers, computed from the images alone.

    ``mask(images)`` takes images normalised as the model takes them, ``(B, 3, H, W)``
    (``sfp.core.io.normalize``), and returns ``(B, gh, gw)`` bool, ``gh, gw = H // p, W // p``.
    """

    name: str
    seed: int
    onset_layer: int
    num_layers: int
    channels: tuple[int, ...]  # the massive-activation channels
    eligible: torch.Tensor = field(repr=False)  # (g0h, g0w) bool, base grid
    patch_size: int
    subgrid: int
    flat_threshold: float
    massive_norm: float
    strength: float
    register_neurons: tuple[int, ...]  # c_fc rows of block ``onset`` that write the outliers
    contrast_neurons: tuple[int, ...]  # c_fc rows of block ``onset - 1`` (flatness test)
    description: str
    label: str = SYNTHETIC_LABEL

    @property
    def n_outliers(self) -> int:
        """Eligible positions on the base grid (= most outliers one base-grid image can get)."""
        return int(self.eligible.sum())

    @property
    def neurons(self) -> dict[int, list[int]]:
        """The MLP neurons that write the outliers, ``{layer: [neuron, ...]}``: the register
        neurons of block ``onset_layer`` (what :func:`sfp.core.neurons.register_neurons`
        should find; zeroing them removes every planted outlier)."""
        return {self.onset_layer: list(self.register_neurons)}

    @property
    def base_grid(self) -> tuple[int, int]:
        return int(self.eligible.shape[0]), int(self.eligible.shape[1])

    @property
    def sink_layers(self) -> tuple[int, ...]:
        """Layers whose attention has the planted sinks: ``onset + 1 .. L``."""
        return tuple(range(self.onset_layer + 1, self.num_layers + 1))

    def eligibility(self, grid: Sequence[int]) -> torch.Tensor:
        """Resized +-1 eligibility map for ``grid`` (gh, gw): (gh, gw) float32 (> 0: eligible)."""
        e = self.eligible.float() * 2.0 - 1.0
        if tuple(grid) == self.base_grid:
            return e
        e = F.interpolate(e[None, None], size=tuple(grid), mode="bicubic", align_corners=False)
        return e[0, 0]

    def flatness(self, images: torch.Tensor) -> torch.Tensor:
        """Largest |difference| of adjacent sub-block means per patch: (B, gh, gw) float32.

        images: (B, 3, H, W) normalised. A patch is flat when this is <= ``flat_threshold``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}.")
        p, s = self.patch_size, self.subgrid
        b, _, h, w = images.shape
        gh, gw = h // p, w // p
        gray = images[:, :, : gh * p, : gw * p].float().mean(dim=1)
        sub = gray.reshape(b, gh * s, p // s, gw * s, p // s).mean(dim=(2, 4))
        sub = sub.reshape(b, gh, s, gw, s).permute(0, 1, 3, 2, 4)  # (B, gh, gw, s, s)
        dh = (sub[..., :, 1:] - sub[..., :, :-1]).abs().flatten(-2).amax(-1)
        dv = (sub[..., 1:, :] - sub[..., :-1, :]).abs().flatten(-2).amax(-1)
        return torch.maximum(dh, dv)

    def mask(self, images: torch.Tensor) -> torch.Tensor:
        """Planted outliers: (B, 3, H, W) normalised -> (B, gh, gw) bool (eligible and flat)."""
        flat = self.flatness(images) <= self.flat_threshold
        elig = self.eligibility(flat.shape[1:]).to(flat.device) > 0
        return flat & elig

    def margins(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances to the two thresholds, (B, gh, gw) each: |flatness - threshold| and
        |resized eligibility|; values near 0 mark patches the model may plant partially."""
        flat = (self.flatness(images) - self.flat_threshold).abs()
        elig = self.eligibility(flat.shape[1:]).to(flat.device).abs().expand_as(flat)
        return flat, elig

    def __repr__(self) -> str:
        return (
            f"PlantedTruth({self.label!r}, model={self.name!r}, seed={self.seed}, "
            f"onset_layer={self.onset_layer}, channels={self.channels}, "
            f"n_outliers={self.n_outliers}, base_grid={self.base_grid}, "
            f"flat_threshold={self.flat_threshold}, massive_norm={self.massive_norm:.1f})"
        )


def default_onset(num_layers: int) -> int:
    """Onset layer for a depth: round-half-up of L/2 (6 for 12 blocks), clamped to 2..L-1."""
    return min(max(math.floor(num_layers / 2 + 0.5), 2), num_layers - 1)


# ------------------------------------------------------------------------------------------
# Generated scenes
# ------------------------------------------------------------------------------------------


def synthetic_scene(
    seed: int, height: int = 224, width: int = 224, n_objects: int | None = None
) -> torch.Tensor:
    """A generated scene: a smoothly shaded, lightly textured background and textured objects.

    Returns (3, height, width) float32 in [0, 1], deterministic for a seed. Objects (3-6 by
    default) are rectangles and ellipses filled with sine gratings, checkerboards, blotchy
    noise or a flat colour, at random contrast.
    """
    g = torch.Generator().manual_seed(int(seed))

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    def field(step: int) -> torch.Tensor:
        coarse = rand(1, 3, max(2, height // step), max(2, width // step)) - 0.5
        return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]

    yy, xx = torch.meshgrid(
        torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij"
    )
    slope = (rand(3, 2, 1, 1) - 0.5) * 0.3
    img = 0.2 + 0.6 * rand(3, 1, 1) + slope[:, 0] * yy + slope[:, 1] * xx
    img = img + 0.25 * field(max(height, width) // 4) + 0.2 * field(8)
    img = img + 0.03 * torch.randn(3, height, width, generator=g)
    py = torch.arange(height, dtype=torch.float32)[:, None]
    px = torch.arange(width, dtype=torch.float32)[None, :]
    n = int(rand(1).item() * 4) + 3 if n_objects is None else n_objects
    for _ in range(n):
        cy, cx = rand(1).item(), rand(1).item()
        ry, rx = 0.05 + 0.15 * rand(1).item(), 0.05 + 0.15 * rand(1).item()
        if rand(1).item() < 0.5:
            inside = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
        else:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        kind = int(rand(1).item() * 4)
        period = 3.0 + 10.0 * rand(1).item()
        angle = math.pi * rand(1).item()
        if kind == 0:
            phase = (px * math.cos(angle) + py * math.sin(angle)) * (2 * math.pi / period)
            pattern = 0.5 + 0.5 * torch.sin(phase)
        elif kind == 1:
            pattern = (
                (
                    torch.div(py, period, rounding_mode="floor")
                    + torch.div(px, period, rounding_mode="floor")
                )
                % 2
            ).float()
        elif kind == 2:
            pattern = field(4)[0] + 0.5
        else:
            pattern = torch.zeros(height, width)
        c0 = rand(3, 1, 1)
        amp = 0.3 + 0.6 * rand(1).item()
        c1 = (c0 + amp * torch.sign(0.5 - c0)).clamp(0, 1)
        img = torch.where(inside[None], c0 + (c1 - c0) * pattern[None], img)
    return img.clamp(0, 1).float()


# ------------------------------------------------------------------------------------------
# Planting
# ------------------------------------------------------------------------------------------


def _subgrid(patch_size: int, preferred: int) -> int:
    for s in (preferred, 4, 2):
        if s > 1 and patch_size % s == 0:
            return s
    raise ValueError(f"planted_model needs an even patch size, got {patch_size}.")


def _contrast_pairs(s: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Adjacent sub-block pairs of an s x s grid: horizontal then vertical, row-major."""
    pairs = [((r, c), (r, c + 1)) for r in range(s) for c in range(s - 1)]
    pairs += [((r, c), (r + 1, c)) for r in range(s - 1) for c in range(s)]
    return pairs


def _eligible_positions(
    grid: tuple[int, int], n: int, spacing: int, gen: torch.Generator
) -> torch.Tensor:
    """n interior positions of grid, pairwise Chebyshev distance >= spacing: (gh, gw) bool."""
    gh, gw = grid
    cand = [(r, c) for r in range(1, gh - 1) for c in range(1, gw - 1)]
    order = torch.randperm(len(cand), generator=gen).tolist()
    for sp in range(spacing, 1, -1):
        chosen: list[tuple[int, int]] = []
        for i in order:
            r, c = cand[i]
            if all(max(abs(r - a), abs(c - b)) >= sp for a, b in chosen):
                chosen.append((r, c))
                if len(chosen) == n:
                    break
        if len(chosen) == n:
            out = torch.zeros(gh, gw, dtype=torch.bool)
            for r, c in chosen:
                out[r, c] = True
            return out
    raise ValueError(
        f"cannot place {n} non-adjacent eligible positions inside a {gh} x {gw} grid; "
        "use fewer n_outliers."
    )


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@torch.no_grad()
def _isolate(visual: nn.Module, channels: Sequence[int]) -> None:
    """Zero every random weight that writes into or reads from the planted channels."""
    ch = torch.tensor(list(channels))
    visual.conv1.weight[ch] = 0
    visual.positional_embedding[:, ch] = 0
    visual.class_embedding[ch] = 0
    lns = [visual.ln_pre]
    for block in forward.blocks_of(visual):
        lns += [block.ln_1, block.ln_2]
        attn, mlp = block.attn, block.mlp
        attn.in_proj_weight[:, ch] = 0
        attn.out_proj.weight[ch] = 0
        attn.out_proj.bias[ch] = 0
        mlp.c_fc.weight[:, ch] = 0
        mlp.c_proj.weight[ch] = 0
        mlp.c_proj.bias[ch] = 0
    for ln in lns:
        ln.weight[ch] = 1
        ln.bias[ch] = 0


def _pick_neurons(block: nn.Module, n: int, gen: torch.Generator) -> list[int]:
    hidden = block.mlp.c_fc.weight.shape[0]
    return torch.randperm(hidden, generator=gen)[:n].tolist()


@torch.no_grad()
def _set_ramp(
    block: nn.Module,
    neurons: tuple[int, int],
    read: torch.Tensor,
    write: torch.Tensor,
    ramp: float,
) -> None:
    """Neuron pair -> clipped ramp: writes ``write * (GELU(z) - GELU(z - ramp)) / ramp``.

    read: (C,) c_fc row (z = read . ln_2(x)); write: (C,) direction and size at saturation.
    """
    fc, proj = block.mlp.c_fc, block.mlp.c_proj
    a, b = neurons
    fc.weight[a] = read
    fc.weight[b] = read
    fc.bias[a] = 0.0
    fc.bias[b] = -ramp
    proj.weight[:, a] = write / ramp
    proj.weight[:, b] = -write / ramp


def _diff(c: int, zero: int, width: int, scale: float = 1.0) -> torch.Tensor:
    """Readout of channel c relative to the always-zero channel (cancels LayerNorm's mean)."""
    v = torch.zeros(width)
    v[c] += scale
    v[zero] -= scale
    return v


@dataclass
class _Plan:
    ch: _Channels
    eligible: torch.Tensor
    onset: int
    contrast_neurons: list[int]
    register_neurons: list[int]
    u: dict[int, torch.Tensor]  # layer -> (H, d) unit head directions


@torch.no_grad()
def _plant(model: nn.Module, seed: int, onset: int, n_outliers: int, cfg: PlantConfig) -> _Plan:
    visual = model.visual
    blocks = forward.blocks_of(visual)
    width = int(visual.transformer.width)
    p = int(visual.conv1.kernel_size[0])
    pairs = _contrast_pairs(_subgrid(p, cfg.subgrid))
    gen = torch.Generator().manual_seed(10_007 * int(seed) + 1)

    n_ded = 5 + len(pairs) + 2
    if n_ded > width // 4:
        raise ValueError(f"width {width} is too small to plant outliers ({n_ded} channels).")
    perm = torch.randperm(width, generator=gen)[:n_ded].tolist()
    if cfg.channels is not None:
        if len(cfg.channels) != n_ded or len(set(cfg.channels)) != n_ded or not all(
                0 <= c < width for c in cfg.channels):
            raise ValueError(f"PlantConfig.channels must be {n_ded} distinct channels of "
                             f"0..{width - 1} for {p} px patches, got {cfg.channels}.")
        perm = list(cfg.channels)
    ch = _Channels(
        zero=perm[0],
        one=perm[1],
        eligible=perm[2],
        cls=perm[3],
        busy=perm[4],
        contrast=tuple(perm[5 : 5 + len(pairs)]),
        massive=(perm[-2], perm[-1]),
    )
    eligible = _eligible_positions(forward.base_grid(visual), n_outliers, cfg.min_spacing, gen)
    # A random positional embedding is tiny next to the patch features, so large uniform
    # regions give near-identical tokens and norm statistics with a tiny spread; scaling it
    # to the size of the patch features (as in trained CLIPs) keeps the tokens diverse.
    visual.positional_embedding.mul_(cfg.position_scale)
    _isolate(visual, ch.all)
    _plant_embedding(visual, ch, eligible, pairs, cfg)
    contrast_neurons = _plant_contrast(blocks[onset - 2], ch, width, cfg, gen)
    register_neurons = _plant_registers(blocks[onset - 1], ch, width, cfg, gen)
    u_by_layer = _plant_sinks(blocks, onset, ch, width, cfg, gen)
    return _Plan(ch, eligible, onset, contrast_neurons, register_neurons, u_by_layer)


def _plant_embedding(visual: nn.Module, ch: _Channels, eligible: torch.Tensor,
                     pairs: list[tuple[tuple[int, int], tuple[int, int]]],
                     cfg: PlantConfig) -> None:
    """Step 1: constant, eligibility and class-marker channels; sub-block contrast filters."""
    sig = cfg.signal
    pos = visual.positional_embedding
    pos[:, ch.one] = sig
    pos[1:, ch.eligible] = sig * (eligible.flatten().float() * 2 - 1)
    pos[0, ch.eligible] = -sig
    visual.class_embedding[ch.cls] = sig
    p = int(visual.conv1.kernel_size[0])
    b = p // _subgrid(p, cfg.subgrid)
    for j, ((r0, c0), (r1, c1)) in enumerate(pairs):
        f = torch.zeros(p, p)
        f[r0 * b : (r0 + 1) * b, c0 * b : (c0 + 1) * b] = 1.0
        f[r1 * b : (r1 + 1) * b, c1 * b : (c1 + 1) * b] = -1.0
        visual.conv1.weight[ch.contrast[j]] = sig * f / (3 * b * b)


def _plant_contrast(block: nn.Module, ch: _Channels, width: int, cfg: PlantConfig,
                    gen: torch.Generator) -> list[int]:
    """Step 2 (block onset-1): busy += busy_weight per |difference| > flat_threshold."""
    neurons = _pick_neurons(block, 4 * len(ch.contrast), gen)
    busy_write = torch.zeros(width)
    busy_write[ch.busy] = cfg.busy_weight
    k1 = cfg.contrast_gain
    for j, c in enumerate(ch.contrast):
        for t, sign in enumerate((1.0, -1.0)):
            read = _diff(c, ch.zero, width, sign * k1)
            read += _diff(ch.one, ch.zero, width, -k1 * cfg.flat_threshold)
            n0, n1 = neurons[4 * j + 2 * t], neurons[4 * j + 2 * t + 1]
            _set_ramp(block, (n0, n1), read, busy_write, cfg.ramp)
    return neurons


def _plant_registers(block: nn.Module, ch: _Channels, width: int, cfg: PlantConfig,
                     gen: torch.Generator) -> list[int]:
    """Step 3 (block onset): eligible and not busy -> massive vector (norm set later)."""
    neurons = _pick_neurons(block, 2, gen)
    read = _diff(ch.eligible, ch.zero, width, cfg.register_gain)
    read += _diff(
        ch.busy, ch.zero, width, -cfg.register_gain * cfg.busy_veto * cfg.signal / cfg.busy_weight
    )
    _set_ramp(block, (neurons[0], neurons[1]), read, torch.zeros(width), cfg.ramp)
    return neurons


def _plant_sinks(blocks: nn.ModuleList, onset: int, ch: _Channels, width: int,
                 cfg: PlantConfig, gen: torch.Generator) -> dict[int, torch.Tensor]:
    """Step 4 (blocks onset+1..L): keys read the massive channels along u, queries point to
    u; returns the head directions u per layer."""
    heads = int(blocks[0].attn.num_heads)
    d = width // heads
    massive_read = _diff(ch.massive[0], ch.massive[1], width, 1.0) / math.sqrt(2.0)
    u_by_layer: dict[int, torch.Tensor] = {}
    for layer in range(onset + 1, len(blocks) + 1):
        attn = blocks[layer - 1].attn
        w, bias = attn.in_proj_weight, attn.in_proj_bias
        u = torch.stack([_unit(torch.randn(d, generator=gen)) for _ in range(heads)])
        u_by_layer[layer] = u
        for h in range(heads):
            proj = torch.eye(d) - torch.outer(u[h], u[h])
            q_rows = slice(h * d, (h + 1) * d)
            k_rows = slice(width + h * d, width + (h + 1) * d)
            for rows in (q_rows, k_rows):
                w[rows] = proj @ w[rows]
                bias[rows] = proj @ bias[rows]
            w[k_rows] += math.sqrt(d) / math.sqrt(width) * torch.outer(u[h], massive_read)
            bias[q_rows] += cfg.patch_sink_logit * u[h]
            self_delta = cfg.self_sink_logit - cfg.patch_sink_logit
            w[q_rows] += self_delta / math.sqrt(width) * torch.outer(u[h], massive_read)
    return u_by_layer


@torch.no_grad()
def _calibrate(
    model: nn.Module, plan: _Plan, cfg: PlantConfig, strength: float, seed: int
) -> float:
    """Set the massive norm and the class-token query boost from a reference scene."""
    visual = model.visual
    blocks = forward.blocks_of(visual)
    width = int(visual.transformer.width)
    ch = plan.ch
    img_size = forward.base_grid(visual)
    p = int(visual.conv1.kernel_size[0])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    scene = synthetic_scene(seed, img_size[0] * p, img_size[1] * p)
    medians: dict[int, float] = {}
    cls_marker: dict[int, float] = {}

    def look(h: torch.Tensor, name: str) -> None:
        layer = parse_hook_name(name)[0]
        medians[layer] = float(h[0, 1:].norm(dim=-1).median())
        if layer + 1 in plan.u:
            y = blocks[layer].ln_1(h[0, 0])
            cls_marker[layer + 1] = float(y[ch.cls] - y[ch.zero])

    hooks = [(block_hook(layer, "hook_resid_post"), look) for layer in range(1, len(blocks) + 1)]
    forward.run(visual, ((scene - mean) / std)[None].to(visual.conv1.weight), hooks)
    ref = max(medians[layer] for layer in range(plan.onset, len(blocks) + 1))
    massive_norm = float(strength * ref)
    reg_block = blocks[plan.onset - 1]
    write = torch.zeros(width)
    write[ch.massive[0]] = massive_norm / math.sqrt(2.0)
    write[ch.massive[1]] = -massive_norm / math.sqrt(2.0)
    a, b = plan.register_neurons
    reg_block.mlp.c_proj.weight[:, a] = write / cfg.ramp
    reg_block.mlp.c_proj.weight[:, b] = -write / cfg.ramp

    heads = int(blocks[0].attn.num_heads)
    d = width // heads
    boost = cfg.cls_sink_logit - cfg.patch_sink_logit
    for layer, u in plan.u.items():
        w = blocks[layer - 1].attn.in_proj_weight
        read = _diff(ch.cls, ch.zero, width, boost / cls_marker[layer])
        for h in range(heads):
            w[h * d : (h + 1) * d] += torch.outer(u[h], read)
    _plant_sink_values(blocks, plan, cfg, width, cfg.sink_value * ref, seed)
    return massive_norm


def _plant_sink_values(blocks: nn.ModuleList, plan: _Plan, cfg: PlantConfig, width: int,
                       norm: float, seed: int) -> None:
    """Step 5: in the last ``cfg.sink_value_layers`` sink layers, a planted token's value
    (after ``out_proj``) is ``norm`` along a random residual direction (planted channels 0).

    A planted token's ``ln_1`` output is about ``+-sqrt(C / 2)`` on the two massive channels,
    so the massive readout (their difference / sqrt 2) is about ``sqrt(C)``."""
    if norm <= 0:
        return
    ch = plan.ch
    massive_read = _diff(ch.massive[0], ch.massive[1], width, 1.0) / math.sqrt(2.0)
    gen = torch.Generator().manual_seed(10_007 * int(seed) + 2)
    layers = sorted(plan.u)[-max(1, cfg.sink_value_layers):]
    for layer in layers:
        attn = blocks[layer - 1].attn
        r = torch.randn(width, generator=gen)
        r[list(ch.all)] = 0
        z = torch.linalg.pinv(attn.out_proj.weight) @ _unit(r)  # out_proj(z) ~ r
        attn.in_proj_weight[2 * width:] += torch.outer(z, massive_read) * norm / math.sqrt(width)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Hide open_clip's "initialized randomly" warning: the weights are planted next."""
    root = logging.getLogger()
    flt = _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _vit_config(name: str) -> dict:
    """open_clip's config of ``name``; ValueError unless it is a ViT CLIP."""
    cfg_dict = open_clip.get_model_config(name)
    if cfg_dict is None:
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models().")
    if not isinstance(cfg_dict.get("vision_cfg", {}).get("layers"), int):
        raise ValueError(f"{name} has no open_clip ViT visual tower; planted_model needs one.")
    return cfg_dict


def _check_plant_args(layers: int, name: str, onset_layer: int | None, n_outliers: int | None,
                      strength: float) -> int:
    """The onset layer, after checking the planting arguments for a ``layers``-block ViT."""
    if not strength > 0:
        raise ValueError(f"strength must be > 0, got {strength!r}.")
    onset = default_onset(layers) if onset_layer is None else int(onset_layer)
    if not 2 <= onset <= layers - 1:
        raise ValueError(f"onset_layer must be in 2..{layers - 1} for {name}, got {onset}.")
    if n_outliers is not None and int(n_outliers) < 1:
        raise ValueError(f"n_outliers must be >= 1, got {n_outliers!r}.")
    return onset


def planted_model(
    name: str = "ViT-B-16",
    seed: int = 0,
    onset_layer: int | None = None,
    n_outliers: int | None = None,
    strength: float | None = None,
    device: str | torch.device = "cpu",
    config: PlantConfig | None = None,
) -> tuple[ModelBundle, PlantedTruth]:
    """Build a CLIP of architecture ``name`` with outliers planted at known positions.

    Args:
        name: an open_clip ViT model name (``"ViT-B-16"``, ``"ViT-S-16"``, ...).
        seed: seeds the random backbone (``torch.manual_seed``) and the planted choices
            (channels, neurons, eligible positions, head directions).
        onset_layer: first layer whose output holds the outliers; default round(L / 2)
            (6 for 12 blocks); must be in 2..L-1.
        n_outliers: eligible positions on the base grid, i.e. the most outliers one
            base-grid image gets; default ``outlier_fraction`` (5%) of the base grid.
        strength: planted norm / median patch norm; default ``config.strength`` (20).
        device: where the model goes (the planting runs on the CPU).
        config: the circuit's constants (:class:`PlantConfig`).

    Returns ``(bundle, truth)``: ``bundle.pretrained == "synthetic (planted outliers)"``,
    ``truth.mask(images)`` (B, gh, gw) bool says where the outliers are.
    """
    name = name.replace("/", "-")
    cfg_dict = _vit_config(name)
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(int(seed))
        model = open_clip.create_model(name, pretrained=None).eval()
    return plant_outliers(model, name=name, seed=seed, onset_layer=onset_layer,
                          n_outliers=n_outliers, strength=strength, device=device, config=config,
                          quick_gelu=bool(cfg_dict.get("quick_gelu", False)))


def plant_outliers(
    model: nn.Module,
    *,
    name: str,
    seed: int = 0,
    onset_layer: int | None = None,
    n_outliers: int | None = None,
    strength: float | None = None,
    device: str | torch.device = "cpu",
    config: PlantConfig | None = None,
    quick_gelu: bool = False,
    pretrained: str = SYNTHETIC_LABEL,
    provenance: str = "synthetic",
    tokenizer: Callable[..., torch.Tensor] | None = None,
) -> tuple[ModelBundle, PlantedTruth]:
    """Plant the outlier circuit into an open_clip CLIP ``model`` (edited in place, on the CPU).

    Works on any open_clip CLIP with a ViT visual tower, random (as :func:`planted_model`
    builds) or trained. name: the label of the result; pretrained / provenance: the bundle's
    (see :data:`sfp.models.loading.PROVENANCES`); tokenizer: the bundle's (None: open_clip's
    for ``name``). Other arguments as :func:`planted_model`.
    Returns ``(bundle, truth)``.
    """
    cfg = config or PlantConfig()
    strength = cfg.strength if strength is None else float(strength)
    bundle_from_model(model, name=name, pretrained=pretrained, provenance=provenance,
                      tokenizer=tokenizer or (lambda texts: texts))  # checks the architecture
    num_layers = len(forward.blocks_of(model.visual))
    onset = _check_plant_args(num_layers, name, onset_layer, n_outliers, strength)
    g0 = forward.base_grid(model.visual)
    n = max(1, round(cfg.outlier_fraction * g0[0] * g0[1])) if n_outliers is None else n_outliers
    n = int(n)
    plan = _plant(model, seed, onset, n, cfg)
    massive_norm = _calibrate(model, plan, cfg, strength, seed)
    model = model.to(device)
    bundle = bundle_from_model(model, name=name, pretrained=pretrained, quick_gelu=quick_gelu,
                               provenance=provenance, tokenizer=tokenizer)
    p = bundle.patch_size
    s = _subgrid(p, cfg.subgrid)
    description = (
        f"Synthetic {name} (planted outliers, seed {seed}): from layer {onset} on, patches at "
        f"{n} fixed interior grid positions whose {s}x{s} sub-block differences are all <= "
        f"{cfg.flat_threshold} carry a massive activation (norm {massive_norm:.0f}, about "
        f"{strength:g}x the median patch norm) on channels {plan.ch.massive}; from layer "
        f"{onset + 1} the class token and the other patches attend to them."
    )
    if cfg.sink_value > 0:
        description += (f" In the last {cfg.sink_value_layers} block(s) they carry a fixed "
                         f"vector ({cfg.sink_value:g}x the median patch norm) into every token "
                         "that attends to them.")
    truth = PlantedTruth(
        name=name,
        seed=int(seed),
        onset_layer=onset,
        num_layers=num_layers,
        channels=plan.ch.massive,
        eligible=plan.eligible,
        patch_size=p,
        subgrid=s,
        flat_threshold=cfg.flat_threshold,
        massive_norm=massive_norm,
        strength=strength,
        register_neurons=tuple(plan.register_neurons),
        contrast_neurons=tuple(plan.contrast_neurons),
        description=description,
    )
    return bundle, truth
