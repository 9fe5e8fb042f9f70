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
       channel, one-hot *cell codes* and the bits of a *priority* (+-1 codes); the class
       embedding marks the class token in its own channel. The base grid is split into
       ``n_outliers`` cells of similar size around seeded, well-spread centres, with a
       one-patch gap between any two cells; the priority is a seeded rank within the cell.
    2. Block ``onset - 1``, MLP. "Contrast neurons": per difference and sign, a pair of GELU
       neurons forms a clipped ramp that fires when ``|difference| > flat_threshold``; their
       sum goes to a *busy* channel (bounded, small). "Level neurons": the same ramps at
       ``score_levels`` x ``flat_threshold`` count, into a *score* channel, how many
       (difference, level) pairs a patch exceeds: its information. Further ramps turn the cell
       codes into cell bits and not-in-cell bits, the priority codes into a priority value,
       and give every patch (not the class token) a unit. These channels hold absolute values
       (an MLP's saturated output); the embedding's channels arrive divided by each token's
       ``ln_pre`` scale, so they are only compared with each other.
    3. Block ``onset``, attention: the last head is replaced by a *competition*. Its logit for
       a query patch i and a key patch j is a bilinear form of those absolute values,
       ``2R (score_i - score_j) + (priority_j - priority_i) - 1/2 - H [j outside i's cell]``,
       over the two LayerNorm scales (so its sign is the form's), times a large gain; the
       class token is the default key (logit 0, value 0). A patch thus attends to the patches
       of its cell that beat it (a lower score, or the same score and a higher priority), and
       the head writes one unit per patch attended to into a *veto* channel: 0 exactly for
       the best patch of each cell.
    4. Block ``onset``, MLP ("register neurons", Jiang et al., *Vision Transformers Don't
       Need Trained Registers*, 2025): one clipped-ramp pair fires when the token is in a
       cell, not busy and not vetoed, and writes a vector of norm ``massive_norm`` along two
       fixed channels with opposite signs (Sun et al., *Massive Activations in Large Language
       Models*, 2024). From this layer on the planted tokens' norms are ``~strength`` x the
       median patch norm.
    5. Blocks ``onset + 1 .. L``, every head: the key projection reads the massive channels
       along a head direction ``u``, the query bias points along ``u`` for every token (more
       for the class token), and the query of a massive token points against ``u``. The value
       projection ignores the massive channels. So from the layer after the outliers, the class
       token and the other patches attend to the planted tokens (attention sinks that carry
       nothing), while the planted tokens avoid themselves: ``A[cls, i] > A[i, i]`` at exactly
       those tokens (SFP's criterion).
    6. Optionally (``sink_value`` > 0, as the toy CLIP plants it), in the last
       ``sink_value_layers`` blocks the value projection reads the massive channels too, so
       the sinks carry one fixed vector per block (a random direction of the residual stream,
       norm ``sink_value`` x the reference median patch norm) into every token that attends
       to them: what a patch says is overwritten by something that is not about that patch,
       which is how high-norm tokens spoil dense prediction (their content is global, not
       local: Darcet et al.).

    ``massive_norm`` is calibrated on a generated reference scene so that the planted norm is
    ``strength`` times the largest median patch norm of layers ``onset .. L`` (the reference
    median patch norm); the competition's gain makes its least logit margin
    ``competition_logit`` for LayerNorm scales up to 4x the reference's largest.

    With ``PlantConfig(positions="fixed")`` step 1 adds a +-1 *eligibility* channel instead
    (+1 at ``n_outliers`` seeded interior positions, at least ``min_spacing`` apart), step 2
    has only the contrast neurons, step 3 is skipped and the register neurons fire on
    eligible tokens that are not busy.

The planting rule (``PlantedTruth.mask``)
    A patch token is planted iff it is the *flattest patch of its cell* and *flat*:

    - flat: every difference between adjacent sub-block means of the patch (colour-averaged,
      normalised pixel units) is at most ``flat_threshold`` in absolute value; only the full
      ``gh x gw`` patches that ``conv1`` sees count (right/bottom remainders are dropped);
    - flattest of its cell: no other patch of the cell has a lower *score* (how many
      (difference, level) pairs have |difference| > level, over ``score_thresholds``), or
      the same score and a higher priority. Low-information patches get the outliers, as in
      real ViTs (Darcet et al., *Vision Transformers Need Registers*, ICLR 2024, find them
      on redundant background patches), so their positions follow each image.

    At most ``n_outliers`` tokens per base-grid image (default 5% of the base grid: 10 of 196
    for ViT-B-16), fewer where a cell's best patch has an edge, and never two that touch. For
    any other grid the cell and priority codes are resized exactly as
    :func:`sfp.core.forward.positional_embedding` resizes the positional embedding (bicubic,
    align_corners=False): a position is in cell r where code r is > 0.5 and has priority bit
    m where code m is > 0; two neighbours can then share a priority, and both be planted.
    ``PlantConfig(positions="fixed")`` plants instead the flat patches among ``n_outliers``
    seeded grid positions (the toy CLIP's rule: it needs 11 channels, not ~60).

    The tests are sharp thresholds computed by continuous neurons: within a thin band around
    each (differences within ~2e-4 of a threshold, resized codes within ~2e-3 of theirs)
    the model may plant a partial outlier. :meth:`PlantedTruth.ambiguous` lists the tokens
    whose planting such a band could change (none on most images).

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
    min_spacing: int = 3  # fixed: Chebyshev distance between eligible positions (or 2)
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
    #: where the outliers go: ``"content"``, the flattest patch of each of ``n_outliers``
    #: cells of the grid, so positions follow each image; ``"fixed"``, the flat patches among
    #: ``n_outliers`` seeded grid positions (fewer channels: what the toy CLIP can hold)
    positions: str = "content"
    #: content: information levels, as fractions of ``flat_threshold``, that rank the flat
    #: patches of a cell (score = how many (difference, level) pairs a patch exceeds)
    score_levels: tuple[float, ...] = (0.125, 0.25, 0.5)
    score_gain: float = 1e6  # content: c_fc weight per unit of signal of the level neurons
    cell_gain: float = 1e5  # content: same for the cell and priority bit neurons
    unit_gain: float = 1e4  # content: same for the unit neuron (exact, so lower: precision)
    content_register_gain: float = 3e7  # content: same for the register neurons
    content_register_ramp: float = 1e3  # content: their ramp (float32 error << ramp)
    #: content: least logit margin of the competition head, for tokens whose LayerNorm scale
    #: is up to 4x the reference scene's largest
    competition_logit: float = 30.0
    #: the dedicated residual channels; None: a seeded draw. fixed: zero, one, eligible, cls,
    #: busy, the contrast channels, the two massive ones (7 + 2 s (s - 1)); content: zero, one,
    #: priority, cls, busy, score, veto, unit, the priority bit codes (ceil log2 of the
    #: largest cell), n_outliers cell codes, cell bits and not-in-cell bits, the contrast
    #: channels, the two massive ones
    channels: tuple[int, ...] | None = None


def _n_dedicated(n_pairs: int, cells: int | None, bits: int = 0) -> int:
    """Dedicated channels: fixed positions (cells None) or ``cells`` content cells and
    ``bits`` priority bits."""
    return 5 + n_pairs + 2 if cells is None else 8 + bits + 3 * cells + n_pairs + 2


def _n_bits(n_ranks: int) -> int:
    """Bits that hold the ranks 0 .. n_ranks - 1."""
    return max(1, math.ceil(math.log2(n_ranks)))


@dataclass(frozen=True)
class _Channels:
    zero: int
    one: int
    eligible: int  # fixed: +-1 eligibility; content: the priority (block onset - 1 MLP)
    cls: int
    busy: int
    contrast: tuple[int, ...]
    massive: tuple[int, int]
    # content only. Channels written by an MLP hold absolute values; embedding channels are
    # divided by the token's ln_pre scale, so the two kinds are never compared directly.
    score: int = -1  # information score of the patch (block onset - 1 MLP)
    veto: int = -1  # the competition head's output (block onset attention)
    unit: int = -1  # signal at every patch, 0 at the class token (block onset - 1 MLP)
    bits: tuple[int, ...] = ()  # +-signal priority bit codes (positional embedding)
    codes: tuple[int, ...] = ()  # one-hot cell codes (positional embedding)
    cells: tuple[int, ...] = ()  # cell bits (block onset - 1 MLP)
    outside: tuple[int, ...] = ()  # not-in-cell bits (block onset - 1 MLP)

    @property
    def all(self) -> tuple[int, ...]:
        extra = ((self.score, self.veto, self.unit, *self.bits, *self.codes, *self.cells,
                  *self.outside) if self.codes else ())
        return (self.zero, self.one, self.eligible, self.cls, self.busy, *extra,
                *self.contrast, *self.massive)


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
    #: (g0h, g0w) bool, base grid: where an outlier can go (fixed: the seeded positions;
    #: content: every position that belongs to a cell)
    eligible: torch.Tensor = field(repr=False)
    patch_size: int
    subgrid: int
    flat_threshold: float
    massive_norm: float
    strength: float
    register_neurons: tuple[int, ...]  # c_fc rows of block ``onset`` that write the outliers
    contrast_neurons: tuple[int, ...]  # c_fc rows of block ``onset - 1`` (flatness test)
    description: str
    label: str = SYNTHETIC_LABEL
    positions: str = "fixed"  # "content" or "fixed" (see PlantConfig.positions)
    #: content: (g0h, g0w) int64 cell of each base-grid position (0 .. n_outliers - 1; -1:
    #: next to another cell, never planted)
    cells: torch.Tensor | None = field(default=None, repr=False)
    #: content: (g0h, g0w) int64 tie-breaking priority: a seeded rank within the cell
    priority: torch.Tensor | None = field(default=None, repr=False)
    #: content: the information levels (absolute |difference| thresholds)
    score_thresholds: tuple[float, ...] = ()

    @property
    def n_outliers(self) -> int:
        """The most outliers one base-grid image can get (fixed: eligible positions; content:
        cells)."""
        if self.positions == "content" and self.cells is not None:
            return int(self.cells.max()) + 1
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

    def _resize(self, maps: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(K, g0h, g0w) base-grid maps -> (K, gh, gw), resized as the positional embedding."""
        maps = maps.float()
        if tuple(grid) == self.base_grid:
            return maps
        return F.interpolate(maps[None], size=tuple(grid), mode="bicubic",
                             align_corners=False)[0]

    def eligibility(self, grid: Sequence[int]) -> torch.Tensor:
        """Resized +-1 eligibility map for ``grid`` (gh, gw): (gh, gw) float32 (> 0: eligible)."""
        return self._resize(self.eligible.float()[None] * 2.0 - 1.0, grid)[0]

    def cell_codes(self, grid: Sequence[int]) -> torch.Tensor:
        """content: resized one-hot cell maps, (n_outliers, gh, gw) float32; a position is in
        cell r where its code r is > 0.5 (exactly one cell on the base grid)."""
        if self.cells is None:
            raise ValueError("cell_codes: this truth plants at fixed positions (no cells).")
        onehot = F.one_hot(self.cells + 1, self.n_outliers + 1)[..., 1:].permute(2, 0, 1)
        return self._resize(onehot, grid)

    def priorities(self, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """content: the tie-breaking priority for ``grid``, (gh, gw) int64, and the least
        |resized bit code| per position, (gh, gw) float32 (1 on the base grid). The model
        holds the priority's bits as +-1 positional codes, resized as the positional
        embedding; bit m is set where its resized code is > 0."""
        if self.priority is None:
            raise ValueError("priorities: this truth plants at fixed positions.")
        nb = _n_bits(int(self.priority.max()) + 1)
        bits = torch.stack([((self.priority >> m) & 1).float() * 2 - 1 for m in range(nb)])
        codes = self._resize(bits, grid)
        weights = (2 ** torch.arange(nb)).view(nb, 1, 1)
        return ((codes > 0).long() * weights).sum(0), codes.abs().amin(0)

    def differences(self, images: torch.Tensor) -> torch.Tensor:
        """|differences| of adjacent sub-block means per patch: (B, gh, gw, 2 s (s - 1)).

        images: (B, 3, H, W) normalised; colour-averaged, only the full patches ``conv1``
        sees (right/bottom remainders are dropped).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}.")
        p, s = self.patch_size, self.subgrid
        b, _, h, w = images.shape
        gh, gw = h // p, w // p
        gray = images[:, :, : gh * p, : gw * p].float().mean(dim=1)
        sub = gray.reshape(b, gh * s, p // s, gw * s, p // s).mean(dim=(2, 4))
        sub = sub.reshape(b, gh, s, gw, s).permute(0, 1, 3, 2, 4)  # (B, gh, gw, s, s)
        dh = (sub[..., :, 1:] - sub[..., :, :-1]).abs().flatten(-2)
        dv = (sub[..., 1:, :] - sub[..., :-1, :]).abs().flatten(-2)
        return torch.cat([dh, dv], dim=-1)

    def flatness(self, images: torch.Tensor) -> torch.Tensor:
        """Largest |difference| of adjacent sub-block means per patch: (B, gh, gw) float32.

        images: (B, 3, H, W) normalised. A patch is flat when this is <= ``flat_threshold``.
        """
        return self.differences(images).amax(-1)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """content: information score per patch, (B, gh, gw) int64: how many (difference,
        level) pairs have |difference| > level, over ``score_thresholds``."""
        return self._count_exceeding(self.differences(images), 0.0)

    def _count_exceeding(self, d: torch.Tensor, shift: float) -> torch.Tensor:
        """(B, gh, gw, D) |differences| -> (B, gh, gw) int64: pairs with |d| > level + shift."""
        out = torch.zeros(d.shape[:-1], dtype=torch.int64, device=d.device)
        for t in self.score_thresholds:
            out += (d > t + shift).sum(-1)
        return out

    def mask(self, images: torch.Tensor) -> torch.Tensor:
        """Planted outliers: (B, 3, H, W) normalised -> (B, gh, gw) bool."""
        if self.positions == "content":
            return self._content_rule(images, band=0.0)[0]
        flat = self.flatness(images) <= self.flat_threshold
        elig = self.eligibility(flat.shape[1:]).to(flat.device) > 0
        return flat & elig

    def margins(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances to the two positional and flatness thresholds, (B, gh, gw) each:
        |flatness - threshold| and, fixed: |resized eligibility|; content: the least
        ``2 |code - 0.5|`` over the cell codes (1 on the base grid)."""
        flat = (self.flatness(images) - self.flat_threshold).abs()
        if self.positions == "content":
            pos = ((self.cell_codes(flat.shape[1:]) - 0.5).abs() * 2).amin(0)
        else:
            pos = self.eligibility(flat.shape[1:]).abs()
        return flat, pos.to(flat.device).expand_as(flat)

    def ambiguous(self, images: torch.Tensor, band: float = 2e-4) -> torch.Tensor:
        """Tokens the model may plant partially, (B, gh, gw) bool: their planting changes when
        a difference moves by ``band`` across a threshold, or a resized positional code
        (fixed: eligibility; content: cell and priority bit codes) by ``10 band`` across its
        own. Empty on most images; where it is not, compare the model with :meth:`mask`
        elsewhere only."""
        if self.positions == "content":
            maybe, sure = self._content_rule(images, band=band)
            return maybe & ~sure
        flat, elig = self.margins(images)
        return (flat < band) | (elig < 10 * band)

    def _content_rule(self, images: torch.Tensor, band: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The content rule with every threshold moved by ``band`` against and for planting:
        (possibly planted, surely planted), (B, gh, gw) bool each (equal for band 0).

        A patch is planted iff it is flat, in a cell, and no other patch j of its cell beats
        it: ``2R (score_i - score_j) + (priority_j - priority_i) > 1/2`` (R = 2^bits of the
        priority), i.e. j has a lower score, or the same score and a higher priority. The
        competition head computes the same bilinear form (times a gain, over the LayerNorm
        scales)."""
        d = self.differences(images)
        b, gh, gw, n_diff = d.shape
        n = gh * gw
        flat_d = d.amax(-1)
        flat_sure = (flat_d <= self.flat_threshold - band).flatten(1)
        flat_maybe = (flat_d <= self.flat_threshold + band).flatten(1)

        s_lo = self._count_exceeding(d, band).flatten(1).double()
        s_hi = self._count_exceeding(d, -band).flatten(1).double()
        codes = self.cell_codes((gh, gw)).flatten(1).T.to(d.device)  # (N, K)
        in_sure = (codes > 0.5 + 10 * band).double()
        in_maybe = (codes > 0.5 - 10 * band).double()
        out_sure = (codes < 0.5 - 10 * band).double()
        out_maybe = (codes < 0.5 + 10 * band).double()
        prio, prio_margin = self.priorities((gh, gw))
        prio = prio.flatten().double().to(d.device)
        prio_exact = (prio_margin.flatten() > 10 * band).to(d.device)
        nb = _n_bits(int(self.priority.max()) + 1) if self.priority is not None else 1
        a, c, big = _competition_constants(nb, len(self.score_thresholds) * n_diff)
        # an uncertain priority bit may move the priority anywhere: bound it by 0 .. 2^bits
        p_lo = torch.where(prio_exact, prio, torch.zeros_like(prio))
        p_hi = torch.where(prio_exact, prio, torch.full_like(prio, 2.0**nb))
        eye = torch.eye(n, dtype=torch.bool, device=d.device)

        def beaten(s_i: torch.Tensor, s_j: torch.Tensor, p_i: torch.Tensor, p_j: torch.Tensor,
                   apart: torch.Tensor) -> torch.Tensor:
            """(B, N): some other patch j beats i; apart (N, N): sum_r [i in r] [j not in r]."""
            p = (a * (s_i[:, :, None] - s_j[:, None, :]) + (p_j[None, :] - p_i[:, None])[None]
                 - c - big * apart[None])
            return ((p > 0) & ~eye).any(-1)

        # surely beaten: under the largest cross-cell penalty; maybe: under the smallest (the
        # same for band 0, as mask() asks: computed once)
        surely = beaten(s_lo, s_hi, p_hi, p_lo, in_maybe @ out_maybe.T)
        maybe = surely if band == 0 else beaten(s_hi, s_lo, p_lo, p_hi, in_sure @ out_sure.T)
        sure = flat_sure & (in_sure.sum(1) > 0)[None] & ~maybe
        possible = flat_maybe & (in_maybe.sum(1) > 0)[None] & ~surely
        return possible.reshape(b, gh, gw), sure.reshape(b, gh, gw)

    def __repr__(self) -> str:
        return (
            f"PlantedTruth({self.label!r}, model={self.name!r}, seed={self.seed}, "
            f"onset_layer={self.onset_layer}, channels={self.channels}, "
            f"positions={self.positions!r}, n_outliers={self.n_outliers}, "
            f"base_grid={self.base_grid}, "
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


def _pick_neurons(block: nn.Module, n: int, gen: torch.Generator,
                  taken: Sequence[int] = ()) -> list[int]:
    """n random hidden units of the block's MLP, none of ``taken``."""
    hidden = block.mlp.c_fc.weight.shape[0]
    if not taken:
        return torch.randperm(hidden, generator=gen)[:n].tolist()
    skip = set(taken)
    free = [i for i in torch.randperm(hidden, generator=gen).tolist() if i not in skip]
    if len(free) < n:
        raise ValueError(f"the MLP of a block has {hidden} hidden units, too few to plant "
                         "outliers; use fewer n_outliers or a larger model.")
    return free[:n]


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
    cells: torch.Tensor | None = None  # content: (g0h, g0w) int64
    priority: torch.Tensor | None = None  # content: (g0h, g0w) int64, rank within the cell
    head: int = -1  # content: the competition head of block onset


def _cell_ranks(cells: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A seeded priority for each position: its rank within its cell, (gh, gw) int64."""
    ranks = torch.zeros_like(cells)  # 0 outside the cells (never used)
    for r in range(int(cells.max()) + 1):
        where = (cells == r).flatten().nonzero().flatten()
        ranks.view(-1)[where] = torch.randperm(len(where), generator=gen)
    return ranks


def _cell_centres(grid: tuple[int, int], n: int, gen: torch.Generator) -> torch.Tensor:
    """n well-spread positions of grid (seeded farthest-point sampling): (gh, gw) bool."""
    gh, gw = grid
    if n > gh * gw:
        raise ValueError(f"cannot make {n} cells on a {gh} x {gw} grid; use fewer n_outliers.")
    yy, xx = torch.meshgrid(torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    pts = torch.stack([yy.flatten(), xx.flatten()], 1)
    jitter = torch.rand(gh * gw, generator=gen) * 1e-3  # seeded tie-breaks
    chosen = [int(torch.randint(gh * gw, (1,), generator=gen))]
    dist = ((pts - pts[chosen[0]]) ** 2).sum(1)
    while len(chosen) < n:
        nxt = int((dist + jitter).argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, ((pts - pts[nxt]) ** 2).sum(1))
    out = torch.zeros(gh * gw, dtype=torch.bool)
    out[chosen] = True
    return out.reshape(gh, gw)


def _cells(centres: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """Cells around the centre positions: (gh, gw) int64 cell index (in row-major order of the
    centres) or -1. Positions go to the nearest centre (Euclidean, ties to the lower), the
    centres move to their cells' means (``iterations`` Lloyd steps, for cells of similar
    size), and where two cells touch (8-neighbourhood) the larger one gives up the position,
    so that two cells' outliers never touch."""
    gh, gw = centres.shape
    yy, xx = torch.meshgrid(torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    pts = torch.stack([yy.flatten(), xx.flatten()], 1)  # (N, 2)
    c = centres.nonzero().float()  # (K, 2)
    k = len(c)
    for _ in range(iterations + 1):
        near = ((pts[:, None] - c[None]) ** 2).sum(-1).argmin(1)  # (N,)
        for r in range(k):
            if (near == r).any():
                c[r] = pts[near == r].mean(0)
    cells = near.reshape(gh, gw).clone()
    changed = True
    while changed:
        changed = False
        sizes = torch.bincount(cells[cells >= 0], minlength=k)
        for i in range(gh):
            for j in range(gw):
                r = int(cells[i, j])
                if r < 0:
                    continue
                nb = cells[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
                others = nb[(nb >= 0) & (nb != r)]
                if any((sizes[r], r) > (sizes[o], int(o)) for o in others.tolist()):
                    cells[i, j] = -1
                    sizes[r] -= 1
                    changed = True
    if (torch.bincount(cells[cells >= 0], minlength=k) == 0).any():
        raise ValueError(f"cannot make {k} cells of at least one patch on a {gh} x {gw} grid; "
                         "use fewer n_outliers.")
    return cells


@torch.no_grad()
def _plant(model: nn.Module, seed: int, onset: int, n_outliers: int, cfg: PlantConfig) -> _Plan:
    if cfg.positions not in ("content", "fixed"):
        raise ValueError(f"PlantConfig.positions must be 'content' or 'fixed', got "
                         f"{cfg.positions!r}.")
    content = cfg.positions == "content"
    visual = model.visual
    blocks = forward.blocks_of(visual)
    width = int(visual.transformer.width)
    p = int(visual.conv1.kernel_size[0])
    pairs = _contrast_pairs(_subgrid(p, cfg.subgrid))
    gen = torch.Generator().manual_seed(10_007 * int(seed) + 1)

    g0 = forward.base_grid(visual)
    heads = int(blocks[0].attn.num_heads)
    if content and width // heads < 5 + n_outliers:
        raise ValueError(f"the heads of {width // heads} dimensions cannot hold "
                         f"{n_outliers} cells (at most {width // heads - 5}); use fewer "
                         "n_outliers.")
    eligible = cells = priority = None
    nb = 0
    if content:  # cells first: the channel count depends on the largest cell
        cells = _cells(_cell_centres(g0, n_outliers, gen))
        priority = _cell_ranks(cells, gen)
        nb = _n_bits(int(priority.max()) + 1)
    n_ded = _n_dedicated(len(pairs), n_outliers if content else None, nb)
    if n_ded > width // 4:
        what = f"{n_outliers} cells and {p} px patches" if content else f"{p} px patches"
        raise ValueError(f"width {width} is too small to plant outliers ({n_ded} channels for "
                         f"{what}); use fewer n_outliers or a wider model.")
    perm = torch.randperm(width, generator=gen)[:n_ded].tolist()
    if cfg.channels is not None:
        if len(cfg.channels) != n_ded or len(set(cfg.channels)) != n_ded or not all(
                0 <= c < width for c in cfg.channels):
            raise ValueError(f"PlantConfig.channels must be {n_ded} distinct channels of "
                             f"0..{width - 1} for {p} px patches, got {cfg.channels}.")
        perm = list(cfg.channels)
    k = n_outliers if content else 0
    ch = _Channels(
        zero=perm[0],
        one=perm[1],
        eligible=perm[2],
        cls=perm[3],
        busy=perm[4],
        contrast=tuple(perm[n_ded - 2 - len(pairs) : n_ded - 2]),
        massive=(perm[-2], perm[-1]),
        score=perm[5] if content else -1,
        veto=perm[6] if content else -1,
        unit=perm[7] if content else -1,
        bits=tuple(perm[8 : 8 + nb]),
        codes=tuple(perm[8 + nb : 8 + nb + k]),
        cells=tuple(perm[8 + nb + k : 8 + nb + 2 * k]),
        outside=tuple(perm[8 + nb + 2 * k : 8 + nb + 3 * k]),
    )
    if not content:
        eligible = _eligible_positions(g0, n_outliers, cfg.min_spacing, gen)
    # A random positional embedding is tiny next to the patch features, so large uniform
    # regions give near-identical tokens and norm statistics with a tiny spread; scaling it
    # to the size of the patch features (as in trained CLIPs) keeps the tokens diverse.
    visual.positional_embedding.mul_(cfg.position_scale)
    _isolate(visual, ch.all)
    if cells is not None:
        eligible = cells >= 0
    assert eligible is not None
    _plant_embedding(visual, ch, eligible, pairs, cfg, cells, priority)
    contrast_neurons = _plant_contrast(blocks[onset - 2], ch, width, cfg, gen)
    head = -1
    if content:
        _plant_levels(blocks[onset - 2], ch, width, cfg, gen, contrast_neurons)
        head = _plant_competition(blocks[onset - 1], ch, width, cfg)
    register_neurons = _plant_registers(blocks[onset - 1], ch, width, cfg, gen)
    u_by_layer = _plant_sinks(blocks, onset, ch, width, cfg, gen)
    return _Plan(ch, eligible, onset, contrast_neurons, register_neurons, u_by_layer,
                 cells, priority, head)


def _plant_embedding(visual: nn.Module, ch: _Channels, eligible: torch.Tensor,
                     pairs: list[tuple[tuple[int, int], tuple[int, int]]],
                     cfg: PlantConfig, cells: torch.Tensor | None = None,
                     priority: torch.Tensor | None = None) -> None:
    """Step 1: constant, eligibility (fixed) or priority bits and cell codes (content) and
    class-marker channels; sub-block contrast filters."""
    sig = cfg.signal
    pos = visual.positional_embedding
    pos[:, ch.one] = sig
    if cells is None:
        pos[1:, ch.eligible] = sig * (eligible.flatten().float() * 2 - 1)
        pos[0, ch.eligible] = -sig
    else:
        assert priority is not None
        for m, c in enumerate(ch.bits):
            pos[1:, c] = sig * (((priority.flatten() >> m) & 1).float() * 2 - 1)
            pos[0, c] = -sig
        for r, c in enumerate(ch.codes):
            pos[1:, c] = sig * (cells.flatten() == r).float()
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


def _score_unit(ch: _Channels, cfg: PlantConfig) -> float:
    """content: the score channel's value per (difference, level) exceeded."""
    return cfg.signal / (len(ch.contrast) * max(1, len(cfg.score_levels)))


def _plant_levels(block: nn.Module, ch: _Channels, width: int, cfg: PlantConfig,
                  gen: torch.Generator, taken: list[int]) -> list[int]:
    """Step 2, content (block onset-1), every output an absolute value: score += one unit
    per (difference, level) with |difference| > level x flat_threshold; cell bit r = signal
    where cell code r > 0.5, and outside bit r = signal at a patch where it is < 0.5;
    priority += 2^m signal / 2^bits where bit code m > 0; unit = signal at every patch (0 at
    the class token)."""
    n_levels = len(cfg.score_levels) * len(ch.contrast) * 4
    n_more = 2 * (2 * len(ch.cells) + len(ch.bits) + 1)
    neurons = _pick_neurons(block, n_levels + n_more, gen, taken)
    write = torch.zeros(width)
    write[ch.score] = _score_unit(ch, cfg)
    g, i = cfg.score_gain, 0
    for level in cfg.score_levels:
        for c in ch.contrast:
            for sign in (1.0, -1.0):
                read = _diff(c, ch.zero, width, sign * g)
                read += _diff(ch.one, ch.zero, width, -g * level * cfg.flat_threshold)
                _set_ramp(block, (neurons[i], neurons[i + 1]), read, write, cfg.ramp)
                i += 2
    for code, bit in zip(ch.codes, ch.cells, strict=True):
        read = _diff(code, ch.zero, width, cfg.cell_gain)
        read += _diff(ch.one, ch.zero, width, -0.5 * cfg.cell_gain)
        write = torch.zeros(width)
        write[bit] = cfg.signal
        _set_ramp(block, (neurons[i], neurons[i + 1]), read, write, cfg.ramp)
        i += 2
    for code, out in zip(ch.codes, ch.outside, strict=True):
        read = _diff(code, ch.zero, width, -cfg.cell_gain)
        read += _diff(ch.one, ch.zero, width, 0.5 * cfg.cell_gain)
        read += _diff(ch.cls, ch.zero, width, -cfg.cell_gain)  # 0 at the class token
        write = torch.zeros(width)
        write[out] = cfg.signal
        _set_ramp(block, (neurons[i], neurons[i + 1]), read, write, cfg.ramp)
        i += 2
    for m, code in enumerate(ch.bits):
        write = torch.zeros(width)
        write[ch.eligible] = cfg.signal * 2**m / 2 ** len(ch.bits)
        read = _diff(code, ch.zero, width, cfg.cell_gain)
        _set_ramp(block, (neurons[i], neurons[i + 1]), read, write, cfg.ramp)
        i += 2
    write = torch.zeros(width)
    write[ch.unit] = cfg.signal
    read = _diff(ch.one, ch.zero, width, cfg.unit_gain)
    read += _diff(ch.cls, ch.zero, width, -2 * cfg.unit_gain)
    _set_ramp(block, (neurons[i], neurons[i + 1]), read, write, cfg.ramp)
    return neurons


def _competition_constants(n_bits: int, max_score: int) -> tuple[float, float, float]:
    """(score weight 2R, offset c, cross-cell penalty H) of the competition's bilinear form
    in integer units: R = 2^bits priorities, scores 0..max_score."""
    r = 2.0**n_bits
    return 2 * r, 0.5, 2 * r * max_score + r


def _plant_competition(block: nn.Module, ch: _Channels, width: int, cfg: PlantConfig) -> int:
    """Step 3, content (block onset, attention): the last head is replaced by a head in which
    a patch i attends to the patches j of its cell that beat it, where

        P(i, j) = 2R (score_i - score_j) + (priority_j - priority_i) - 1/2
                  - H sum_r [i in cell r] [j not in cell r]

    is > 0 (R = 2^bits, H = 2R max score + R), or to the class token (logit 0, value 0)
    when none does; its output, one per patch attended to, goes to the veto channel. Every
    term is an absolute channel (written by block onset - 1's MLP), and the logit is P over
    the two LayerNorm scales, so its sign is P's; the query gain (set by
    :func:`_calibrate`) makes every margin large. Returns the head's index."""
    attn = block.attn
    heads = int(attn.num_heads)
    d = width // heads
    h = heads - 1
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    rows = [slice(part * width + h * d, part * width + (h + 1) * d) for part in range(3)]
    for r in rows:
        w[r] = 0
        bias[r] = 0
    attn.out_proj.weight[:, h * d : (h + 1) * d] = 0
    sig = cfg.signal
    unit = _diff(ch.unit, ch.zero, width, 1 / sig)  # 1 / sigma at patches, 0 at the cls
    score = _diff(ch.score, ch.zero, width, 1 / _score_unit(ch, cfg))
    prio = _diff(ch.eligible, ch.zero, width, 2 ** len(ch.bits) / sig)
    a, c, big = _competition_constants(len(ch.bits), len(cfg.score_levels) * len(ch.contrast))
    # every term of a pair in one cell is exactly 0 or small: no large cancellation
    dims = [(a * score, unit), (unit, -a * score), (unit, prio), (-prio, unit),
            (unit, -c * unit)]
    dims += [(_diff(b, ch.zero, width, 1 / sig), _diff(o, ch.zero, width, -big / sig))
             for b, o in zip(ch.cells, ch.outside, strict=True)]
    for i, (q, k) in enumerate(dims):
        w[rows[0].start + i] = q * math.sqrt(d)
        w[rows[1].start + i] = k
    w[rows[2].start] = unit * sig
    attn.out_proj.weight[ch.veto, h * d] = 1.0
    return h


def _register_ramp(ch: _Channels, cfg: PlantConfig) -> float:
    return cfg.content_register_ramp if ch.cells else cfg.ramp


def _plant_registers(block: nn.Module, ch: _Channels, width: int, cfg: PlantConfig,
                     gen: torch.Generator) -> list[int]:
    """Step 4 (block onset): fixed: eligible and not busy -> massive vector (norm set later);
    content: in a cell, not busy and not vetoed -> massive vector."""
    neurons = _pick_neurons(block, 2, gen)
    if not ch.cells:
        read = _diff(ch.eligible, ch.zero, width, cfg.register_gain)
        read += _diff(ch.busy, ch.zero, width,
                      -cfg.register_gain * cfg.busy_veto * cfg.signal / cfg.busy_weight)
    else:
        # z ~ -1 - 2 busy / busy_weight + 2 (cell bits) - 10 veto, in units of the signal
        # (all absolute channels); the class token (no cell) is vetoed by its marker too
        sig, g = cfg.signal, cfg.content_register_gain
        read = _diff(ch.unit, ch.zero, width, -g)
        read += _diff(ch.busy, ch.zero, width, -2 * g * sig / cfg.busy_weight)
        read += _diff(ch.veto, ch.zero, width, -10.0 * g)
        read += _diff(ch.cls, ch.zero, width, -10.0 * g)
        for b in ch.cells:
            read += _diff(b, ch.zero, width, 2 * g)
    _set_ramp(block, (neurons[0], neurons[1]), read, torch.zeros(width), _register_ramp(ch, cfg))
    return neurons


def _plant_sinks(blocks: nn.ModuleList, onset: int, ch: _Channels, width: int,
                 cfg: PlantConfig, gen: torch.Generator) -> dict[int, torch.Tensor]:
    """Step 5 (blocks onset+1..L): keys read the massive channels along u, queries point to
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
    scales: dict[int, float] = {}

    def look(h: torch.Tensor, name: str) -> None:
        layer = parse_hook_name(name)[0]
        medians[layer] = float(h[0, 1:].norm(dim=-1).median())
        scales[layer] = float(h[0, 1:].var(dim=-1, unbiased=False).add(1e-5).sqrt().max())
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
    ramp = _register_ramp(ch, cfg)
    reg_block.mlp.c_proj.weight[:, a] = write / ramp
    reg_block.mlp.c_proj.weight[:, b] = -write / ramp

    heads = int(blocks[0].attn.num_heads)
    d = width // heads
    boost = cfg.cls_sink_logit - cfg.patch_sink_logit
    for layer, u in plan.u.items():
        w = blocks[layer - 1].attn.in_proj_weight
        read = _diff(ch.cls, ch.zero, width, boost / cls_marker[layer])
        for h in range(heads):
            w[h * d : (h + 1) * d] += torch.outer(u[h], read)
    _plant_sink_values(blocks, plan, cfg, width, cfg.sink_value * ref, seed)
    if plan.head >= 0:
        # logit = gain P / (sigma_i sigma_j) with |P| >= 1/2: the least margin is
        # competition_logit for LayerNorm scales up to 4x the reference's largest
        gain = cfg.competition_logit * (4 * scales[plan.onset - 1]) ** 2 / 0.5
        rows = slice(plan.head * d, (plan.head + 1) * d)
        blocks[plan.onset - 1].attn.in_proj_weight[rows] *= gain
    return massive_norm


def _plant_sink_values(blocks: nn.ModuleList, plan: _Plan, cfg: PlantConfig, width: int,
                       norm: float, seed: int) -> None:
    """Step 6: in the last ``cfg.sink_value_layers`` sink layers, a planted token's value
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
            (channels, neurons, cells and priorities or eligible positions, head directions).
        onset_layer: first layer whose output holds the outliers; default round(L / 2)
            (6 for 12 blocks); must be in 2..L-1.
        n_outliers: cells (or, fixed, eligible positions) on the base grid, i.e. the most
            outliers one base-grid image gets; default ``outlier_fraction`` (5%) of the base
            grid.
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
    levels = tuple(float(lv * cfg.flat_threshold) for lv in cfg.score_levels)
    if cfg.positions == "content":
        where = (f"the flattest patch of each of {n} cells of the grid (the fewest sub-block "
                 f"differences above {', '.join(f'{lv:g}' for lv in levels)}; ties to a "
                 f"seeded priority) carries, if its {s}x{s} sub-block differences are all <= "
                 f"{cfg.flat_threshold},")
    else:
        where = (f"patches at {n} fixed interior grid positions whose {s}x{s} sub-block "
                 f"differences are all <= {cfg.flat_threshold} carry")
    description = (
        f"Synthetic {name} (planted outliers, seed {seed}): from layer {onset} on, {where} a "
        f"massive activation (norm {massive_norm:.0f}, about {strength:g}x the median patch "
        f"norm) on channels {plan.ch.massive}; from layer {onset + 1} the class token and the "
        "other patches attend to them."
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
        positions=cfg.positions,
        cells=plan.cells,
        priority=plan.priority,
        score_thresholds=levels if cfg.positions == "content" else (),
    )
    return bundle, truth
