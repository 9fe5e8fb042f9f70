"""Where outliers come from: register neurons, massive-activation channels, interventions.

High-norm outlier tokens (Darcet et al., "Vision Transformers Need Registers", ICLR 2024) are
written by a handful of MLP neurons in a middle block, the *register neurons* (Jiang, Dravid
et al., "Vision Transformers Don't Need Trained Registers", NeurIPS 2025), into a few residual
channels that then hold *massive activations* (Sun et al., "Massive Activations in Large
Language Models", 2024)::

    src = outlier_sources(bundle, images)             # one pass of statistics
    src.register_neurons(top=10)                      # [(layer, neuron, score), ...]
    src.massive_channels(top=2)                       # [(layer, channel, score), ...]
    hooks = ablate_neurons(src.neuron_map(top=2))     # zero them at every token
    hooks = ttr_hooks(bundle, src.neuron_map(top=2))       # move them to a register

Quantities (B images, N patch tokens, layers 1..L, block ``l``'s MLP neurons after the
nonlinearity = ``blocks.{l}.mlp.hook_post``):

- **outlier tokens** of an image at layer ``l``: patches whose norm ``||h_l||`` exceeds the
  threshold. With ``norm_threshold=None`` the threshold is per image,
  ``median + max(median, 6 * 1.4826 * MAD)`` of its patch norms (at least twice the median
  and six robust standard deviations above it); a number is an absolute norm, as the release
  uses (30 for OpenCLIP ViT-B/16, ``configs/openclip_base.yaml``).
- **outlier layer** (default): the layer whose patch norms have the largest max / median
  ratio, averaged over the images (the release uses the last layer).
- **onset**: per layer, the share of the outlier tokens (found at the outlier layer) that are
  already outliers at that layer; **max_layer** (default) is the first layer where that share
  reaches 0.5 (the release caps ViT-B/16's search at block 6): the neurons that write the
  outliers are in that block or before it.
- **neuron score** (the release's ``find_register_neurons``): on each image with outliers,
  the mean |activation| of each neuron at the outlier tokens; averaged over those images;
  ranked over layers ``1..max_layer``. Images without outliers are skipped.
- **channel score** (Sun et al.): per layer, the mean |h_l[c]| of each residual channel at the
  outlier tokens, next to its mean at the other patches (``channel_typical``); the ratio per
  layer shows how a massive channel persists.
- **top magnitudes** (Sun et al.'s figure): per layer, the three largest |h_l[t, c]| over all
  tokens and channels, and the median, averaged over images.

Every statistic comes from two forwards per batch through :mod:`sfp.core.forward` (norms,
then reductions inside the hooks); nothing of size (T, d_mlp) is kept, so a ViT-L/14 run
costs two forwards and O(L (d_mlp + C)) memory.

Interventions are hook lists for ``fwd_hooks=`` of ``run_with_hooks``, ``record``,
``Encoder.encode_patches`` and ``Segmenter``, so they compose with every method and view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from sfp.core import forward
from sfp.core.errors import InputError
from sfp.core.hooks import EMBED, HookFn, Hooks, block_hook
from sfp.core.probe import record

__all__ = [
    "NeuronMap",
    "OutlierSources",
    "ablate_neurons",
    "neuron_map",
    "outlier_mask",
    "outlier_sources",
    "register_neurons",
    "massive_channels",
    "sign_max",
    "ttr_hooks",
]

NeuronMap = dict[int, list[int]]
"""``{layer: [neuron, ...]}``: MLP neurons of block ``layer`` (1-indexed)."""

Images = Tensor | Iterable[Tensor]

MAD_SIGMA = 1.4826  # MAD -> standard deviation of a normal distribution
ROBUST_Z = 6.0
ONSET_SHARE = 0.5


def outlier_mask(norms: Tensor, norm_threshold: float | None = None) -> Tensor:
    """Outlier patches from patch norms: (B, N) -> (B, N) bool.

    ``norm_threshold`` None: per image, ``norm > median + max(median, 6 * 1.4826 * MAD)``;
    a number: ``norm > norm_threshold``.
    """
    if norm_threshold is not None:
        return norms > float(norm_threshold)
    med = norms.median(dim=1, keepdim=True).values
    mad = (norms - med).abs().median(dim=1, keepdim=True).values
    return norms > med + torch.maximum(med, ROBUST_Z * MAD_SIGMA * mad)


def _batches(images: Images) -> list[Tensor]:
    if isinstance(images, Tensor):
        if images.ndim == 3:
            raise InputError(
                f"images must be batched (B, 3, H, W), got {tuple(images.shape)}; use images[None]."
            )
        return [images]
    out = [b if b.ndim == 4 else b[None] for b in images]
    if not out:
        raise InputError("images is empty; give a (B, 3, H, W) tensor or an iterable of them.")
    return out


def _patch_norms(bundle: Any, x: Tensor) -> dict[int, Tensor]:
    """Patch-token norms per layer of one batch: {layer: (B, N)} (first forward, a
    :func:`sfp.core.probe.record` that keeps only the norms)."""
    trace = record(bundle, x, store=())
    n = trace.num_patches
    return {layer: trace.token_norms(layer)[:, 1 : 1 + n] for layer in trace.layers}


@dataclass(frozen=True)
class OutlierSources:
    """Statistics of where the outliers of a set of images come from (see the module doc).

    Tensors are float32 on the CPU; layer ``l`` is row ``l - 1``.
    """

    outlier_layer: int
    max_layer: int
    norm_threshold: float | None
    n_images: int
    n_used: int  # images with at least one outlier token at ``outlier_layer``
    norm_ratio: Tensor  # (L,) mean over images of max / median patch norm
    onset: Tensor  # (L,) share of the outlier tokens that are outliers at each layer
    neuron_scores: Tensor  # (max_layer, d_mlp) mean |activation| at outlier tokens
    channel_scores: Tensor  # (L, C) mean |h_l[c]| at outlier tokens
    channel_typical: Tensor  # (L, C) mean |h_l[c]| at the other patch tokens
    top_magnitudes: Tensor  # (L, 3) mean over images of the 3 largest |h_l[t, c]|
    median_magnitude: Tensor  # (L,) mean over images of the median |h_l[t, c]|
    patch_norms: Tensor | None = None  # (n_images, L, N) when every batch has N patches
    hits: Tensor | None = None  # (L,) outlier tokens that are outliers at each layer (counts)

    def register_neurons(self, top: int | None = 10) -> list[tuple[int, int, float]]:
        """The highest-scoring neurons over layers 1..max_layer: [(layer, neuron, score)]."""
        flat = self.neuron_scores.flatten()
        k = flat.numel() if top is None else min(int(top), flat.numel())
        vals, idx = flat.topk(k)
        d = self.neuron_scores.shape[1]
        return [(int(i) // d + 1, int(i) % d, float(v)) for v, i in zip(vals, idx, strict=True)]

    def neuron_map(self, top: int | None = 10) -> NeuronMap:
        """The top neurons as ``{layer: [neuron, ...]}`` (what the interventions take)."""
        return neuron_map(self.register_neurons(top))

    def massive_channels(self, layer: int | None = None,
                         top: int = 2) -> list[tuple[int, int, float]]:
        """Residual channels with the largest mean |value| at the outlier tokens of ``layer``
        (default: the outlier layer): [(layer, channel, score)]."""
        layer = self.outlier_layer if layer is None else int(layer)
        vals, idx = self.channel_scores[layer - 1].topk(min(int(top),
                                                            self.channel_scores.shape[1]))
        return [(layer, int(i), float(v)) for v, i in zip(vals, idx, strict=True)]

    def persistence(self, channels: Sequence[int] | None = None) -> Tensor:
        """Per layer, outlier-token / other-token mean |value| of ``channels`` (default: the
        outlier layer's top 2): (L, k)."""
        if channels is None:
            channels = [c for _, c, _ in self.massive_channels()]
        ch = list(channels)
        return self.channel_scores[:, ch] / self.channel_typical[:, ch].clamp_min(1e-12)


def neuron_map(neurons: Mapping[int, Sequence[int]] | Iterable[Sequence[Any]]) -> NeuronMap:
    """``{layer: [neuron, ...]}`` from a mapping or from ``(layer, neuron[, score])`` tuples."""
    out: NeuronMap = {}
    if isinstance(neurons, Mapping):
        items = [(int(l), int(n)) for l, ns in neurons.items() for n in ns]
    else:
        items = []
        for item in neurons:
            if len(item) < 2:
                raise InputError(f"neurons must be (layer, neuron[, score]) tuples, got {item!r}.")
            items.append((int(item[0]), int(item[1])))
    for layer, n in items:
        if n not in out.setdefault(layer, []):
            out[layer].append(n)
    return out


def _check_layer(layer: int | None, num_layers: int, what: str) -> None:
    if layer is not None and not 1 <= int(layer) <= num_layers:
        raise InputError(f"{what} must be a layer in 1..{num_layers}, got {layer!r}.")


@torch.no_grad()
def outlier_sources(
    bundle: Any,
    images: Images,
    *,
    outlier_layer: int | None = None,
    norm_threshold: float | None = None,
    max_layer: int | None = None,
) -> OutlierSources:
    """Register-neuron scores, massive channels and norm statistics of ``images``.

    images: (B, 3, H, W) normalised, or an iterable of such batches. outlier_layer,
    norm_threshold, max_layer: see the module doc (None: derived from the norm statistics).
    """
    visual = forward.visual_of(bundle)
    blocks = forward.blocks_of(visual)
    num_layers = len(blocks)
    _check_layer(outlier_layer, num_layers, "outlier_layer")
    _check_layer(max_layer, num_layers, "max_layer")
    batches = [forward.check_images(visual, b) for b in _batches(images)]
    first = [_patch_norms(bundle, b) for b in batches]
    ratio = torch.stack([
        torch.cat([(n[l].amax(1) / n[l].median(1).values) for n in first]).mean()
        for l in range(1, num_layers + 1)
    ])
    if outlier_layer is None:
        outlier_layer = int(ratio.argmax()) + 1
    masks = [outlier_mask(n[outlier_layer], norm_threshold) for n in first]
    total = sum(int(m.sum()) for m in masks)
    hits = torch.zeros(num_layers)
    for l in range(1, num_layers + 1):
        hits[l - 1] = sum(int((outlier_mask(n[l], norm_threshold) & m).sum())
                          for n, m in zip(first, masks, strict=True))
    onset = hits / total if total else torch.zeros(num_layers)
    if max_layer is None:
        reached = [l for l in range(1, outlier_layer + 1) if onset[l - 1] >= ONSET_SHARE]
        max_layer = reached[0] if reached else outlier_layer
    d_mlp = int(blocks[0].mlp.c_fc.weight.shape[0])
    width = int(visual.transformer.width)
    acc = {
        "neurons": torch.zeros(max_layer, d_mlp),
        "chan": torch.zeros(num_layers, width),
        "typ": torch.zeros(num_layers, width),
        "top": torch.zeros(num_layers, 3),
        "med": torch.zeros(num_layers),
    }
    n_used = 0
    n_images = 0
    for x, mask in zip(batches, masks, strict=True):
        used = mask.any(dim=1)
        n_used += int(used.sum())
        n_images += x.shape[0]
        forward.run(visual, x, _stat_hooks(acc, mask, used, max_layer, num_layers))
    used_den = max(n_used, 1)
    sizes = {n[1].shape[1] for n in first}
    patch_norms = (torch.cat([torch.stack([n[l] for l in range(1, num_layers + 1)], 1)
                              for n in first]).cpu() if len(sizes) == 1 else None)
    return OutlierSources(
        outlier_layer=int(outlier_layer),
        max_layer=int(max_layer),
        norm_threshold=None if norm_threshold is None else float(norm_threshold),
        n_images=n_images,
        n_used=n_used,
        norm_ratio=ratio,
        onset=onset,
        neuron_scores=acc["neurons"] / used_den,
        channel_scores=acc["chan"] / used_den,
        channel_typical=acc["typ"] / max(n_images, 1),
        top_magnitudes=acc["top"] / max(n_images, 1),
        median_magnitude=acc["med"] / max(n_images, 1),
        patch_norms=patch_norms,
        hits=hits,
    )


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per image, mean of x (B, N, K) over the tokens of mask (B, N): (B, K) (0 if none)."""
    w = mask.to(x.dtype)
    return (w[..., None] * x).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


def _stat_hooks(acc: dict[str, Tensor], mask: Tensor, used: Tensor, max_layer: int,
                num_layers: int) -> list[tuple[str, HookFn]]:
    """Hooks that add one batch's reductions to ``acc`` (second forward)."""
    n = mask.shape[1]
    mask = mask.to(torch.bool)

    def neurons(act: Tensor, name: str) -> None:
        layer = int(name.split(".")[1])
        a = act[:, 1 : 1 + n].float().abs()
        m = mask.to(a.device)
        acc["neurons"][layer - 1] += _masked_mean(a, m)[used.to(a.device)].sum(0).cpu()

    def hidden(h: Tensor, name: str) -> None:
        layer = int(name.split(".")[1])
        a = h[:, 1 : 1 + n].float().abs()
        m = mask.to(a.device)
        acc["chan"][layer - 1] += _masked_mean(a, m)[used.to(a.device)].sum(0).cpu()
        acc["typ"][layer - 1] += _masked_mean(a, ~m).sum(0).cpu()
        full = h.float().abs().flatten(1)
        acc["top"][layer - 1] += full.topk(3, dim=1).values.sum(0).cpu()
        acc["med"][layer - 1] += full.median(dim=1).values.sum().cpu()

    hooks = [(block_hook(l, "mlp.hook_post"), neurons) for l in range(1, max_layer + 1)]
    hooks += [(block_hook(l, "hook_resid_post"), hidden) for l in range(1, num_layers + 1)]
    return hooks


def register_neurons(
    bundle: Any,
    images: Images,
    *,
    outlier_layer: int | None = None,
    norm_threshold: float | None = None,
    max_layer: int | None = None,
    top: int | None = 10,
) -> list[tuple[int, int, float]]:
    """The MLP neurons that write the outliers: ``[(layer, neuron, score)]``, best first.

    score = mean |activation| at the outlier tokens, averaged over the images that have
    outliers (the NeurIPS 2025 method); see :func:`outlier_sources` for the arguments.
    """
    return outlier_sources(bundle, images, outlier_layer=outlier_layer,
                           norm_threshold=norm_threshold,
                           max_layer=max_layer).register_neurons(top)


def massive_channels(
    bundle: Any,
    images: Images,
    *,
    layer: int | None = None,
    norm_threshold: float | None = None,
    top: int = 2,
) -> list[tuple[int, int, float]]:
    """Residual channels with the largest mean |value| at the outlier tokens of ``layer``
    (default: the outlier layer): ``[(layer, channel, score)]`` (Sun et al. 2024)."""
    src = outlier_sources(bundle, images, outlier_layer=layer, norm_threshold=norm_threshold)
    return src.massive_channels(top=top)


# ------------------------------------------------------------------------------------------
# Interventions
# ------------------------------------------------------------------------------------------

Fill = Literal["zero", "mean"]


def _patch_mean(act: Tensor, first: int, stop: int) -> Tensor:
    """Mean over tokens first..stop-1 per image: (B, T, K) -> (B, 1, K)."""
    return act[:, first:stop].mean(dim=1, keepdim=True)


def ablate_neurons(
    neurons: Mapping[int, Sequence[int]] | Iterable[Sequence[Any]],
    *,
    fill: Fill = "zero",
    tokens: Literal["all", "active"] | Tensor = "all",
) -> list[tuple[str, HookFn]]:
    """Hooks that zero (``fill="zero"``) or mean-fill (``"mean"``: the mean over the image's
    patch tokens) chosen neurons at ``blocks.{l}.mlp.hook_post``.

    neurons: ``{layer: [neuron, ...]}`` or ``[(layer, neuron[, score]), ...]``. tokens:
    ``"all"`` (every token, class token included), ``"active"`` (per neuron, the patches whose
    activation is above its mean + one standard deviation over the patches, as the release's
    ``only_outliers``), or a (B, N) bool mask of patch tokens.
    """
    if fill not in ("zero", "mean"):
        raise InputError(f"fill must be 'zero' or 'mean', got {fill!r}.")
    if isinstance(tokens, str) and tokens not in ("all", "active"):
        raise InputError(f"tokens must be 'all', 'active' or a (B, N) bool mask, got {tokens!r}.")
    nmap = neuron_map(neurons)

    def make(idx: list[int]) -> HookFn:
        def hook(act: Tensor, name: str) -> Tensor:
            out = act.clone()
            sel = out[..., idx]
            n = act.shape[1] - 1 if not isinstance(tokens, Tensor) else tokens.shape[1]
            value = (torch.zeros_like(sel) if fill == "zero"
                     else _patch_mean(sel, 1, 1 + n).expand_as(sel))
            if isinstance(tokens, str) and tokens == "all":
                out[..., idx] = value
                return out
            if isinstance(tokens, Tensor):
                if tokens.ndim != 2 or tokens.shape[0] != act.shape[0]:
                    raise InputError(
                        f"tokens mask must be (B, N) = ({act.shape[0]}, N), got "
                        f"{tuple(tokens.shape)}."
                    )
                where = torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
                where[:, 1 : 1 + n] = tokens.to(act.device, torch.bool)
                where = where[..., None].expand_as(sel)
            else:
                patches = sel[:, 1 : 1 + n]
                thr = patches.mean(1, keepdim=True) + patches.std(1, keepdim=True)
                where = torch.zeros_like(sel, dtype=torch.bool)
                where[:, 1 : 1 + n] = patches > thr
            out[..., idx] = torch.where(where, value, sel)
            return out

        return hook

    return [(block_hook(layer, "mlp.hook_post"), make(idx)) for layer, idx in nmap.items()]


def sign_max(x: Tensor, dim: int) -> Tensor:
    """The entry of largest magnitude along ``dim``, sign kept (max if |max| > |min|)."""
    hi, lo = x.amax(dim=dim), x.amin(dim=dim)
    return torch.where(hi.abs() > lo.abs(), hi, lo)


def ttr_hooks(
    bundle: Any,
    neurons: Mapping[int, Sequence[int]] | Iterable[Sequence[Any]],
    *,
    num_registers: int = 1,
    normal: Fill = "zero",
    scale: float = 1.0,
) -> list[tuple[str, HookFn]]:
    """Hooks that add ``num_registers`` tokens after the patches and move the register
    neurons' activity onto them (Jiang, Dravid et al. 2025).

    At ``hook_embed`` the extra tokens are appended with the value a zero token takes after
    ``ln_pre`` (the release appends zero tokens before ``ln_pre``, without positional
    embedding). At each register neuron's ``mlp.hook_post`` the extra tokens get ``scale``
    times the neuron's sign-preserving max activation over the whole sequence (per image and
    neuron; the release takes one value over all of a layer's listed neurons), and the patch
    tokens get 0 (``normal="zero"``, the release's default) or their mean (``"mean"``). The
    class token is left alone. Methods read patches ``1..N``, so the extra tokens never reach
    the patch features; ``hooks`` compose with any others.
    """
    if normal not in ("zero", "mean"):
        raise InputError(f"normal must be 'zero' or 'mean', got {normal!r}.")
    k = int(num_registers)
    if k < 1:
        raise InputError(f"num_registers must be >= 1, got {num_registers!r}.")
    visual = forward.visual_of(bundle)
    nmap = neuron_map(neurons)
    Hooks.of([(block_hook(l, "mlp.hook_post"), lambda t, n: None) for l in nmap],
             len(forward.blocks_of(visual)))  # checks the layers

    def append(x: Tensor, name: str) -> Tensor:
        zero = torch.zeros(1, 1, x.shape[-1], dtype=x.dtype, device=x.device)
        reg = visual.ln_pre(zero).expand(x.shape[0], k, -1)
        return torch.cat([x, reg], dim=1)

    def make(idx: list[int]) -> HookFn:
        def hook(act: Tensor, name: str) -> Tensor:
            out = act.clone()
            t = act.shape[1]
            sel = act[..., idx]
            peak = scale * sign_max(sel, dim=1)  # (B, K)
            out[:, t - k :, idx] = peak[:, None].expand(-1, k, -1).to(act.dtype)
            if normal == "zero":
                out[:, 1 : t - k, idx] = 0
            else:
                out[:, 1 : t - k, idx] = _patch_mean(sel, 1, t - k).expand(-1, t - k - 1, -1)
            return out

        return hook

    return [(EMBED, append)] + [(block_hook(l, "mlp.hook_post"), make(idx))
                                for l, idx in nmap.items()]
