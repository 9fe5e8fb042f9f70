"""Training-free dense CLIP encoders from the literature, in sfp's harness.

Every baseline runs the forward of :mod:`sfp.core.forward` unchanged for blocks 1..L-1 and
replaces only block L, assembled from the same block pieces (so block L's hook points fire with
the method's own attention); the patch tokens of its output go through ``ln_post`` and
``proj``.
Each follows its authors' released code for ViT-B/16 at the default settings (the papers and the
files read are cited in each class). What block L becomes, with ``s = d_head ** -0.5``:

=========== ===================================== ======== ===== ==========================
method      attention applied to v in block L     residual FFN   source
=========== ===================================== ======== ===== ==========================
clip        softmax(q k^T s)                      yes      yes   open_clip (unchanged)
maskclip    none: out_proj(v) (value path)        yes      yes   MaskCLIP, ECCV 2022
sclip       softmax(q q^T s) + softmax(k k^T s)   yes      yes   SCLIP, ECCV 2024
clearclip   softmax(q q^T s)                      no       no    ClearCLIP, ECCV 2024
naclip      softmax(k k^T s + G), G Gaussian      no       no    NACLIP, WACV 2025
=========== ===================================== ======== ===== ==========================

"residual" is the block input added to the attention branch; "FFN" is ``x + mlp(ln_2(x))`` on
the result. All tokens (cls included) take part in the modified attention, as in every release;
only the patch tokens are returned. Softmaxes and ``attention @ v`` are computed in float32 for
float32 models and in the model's dtype for fp16 / bf16 ones, as the releases run them (fp16 on
CUDA; :func:`sfp.core.forward.work`). LayerScale (``ls_1``/``ls_2``, identity for CLIP) is
applied as in :func:`sfp.core.forward.block_forward`. The attention variants themselves are pure
functions in :mod:`sfp.methods.attention`.

Differences from the releases, all deliberate: positional embeddings are interpolated to the exact
patch grid by :func:`sfp.core.forward.positional_embedding` (the releases use a ``scale_factor``
and skip non-square grids with the pretraining token count); any batch size and non-square
grids work; the segmentation-time extras of the releases (sliding windows, PAMR, logit scales,
thresholds) belong to :mod:`sfp.seg.pipeline`, not to these encoders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sfp.core import forward
from sfp.core.hooks import NO_HOOKS, Hooks, block_hook
from sfp.methods.attention import (
    correlative_probs,
    gaussian_neighbourhood_bias,
    neighbourhood_probs,
    self_self_probs,
)
from sfp.methods.base import Encoder, FwdHooks, register_encoder

__all__ = [
    "CLIPEncoder",
    "ClearCLIPConfig",
    "ClearCLIPEncoder",
    "MaskCLIPConfig",
    "MaskCLIPEncoder",
    "NACLIPConfig",
    "NACLIPEncoder",
    "SCLIPConfig",
    "SCLIPEncoder",
    "clearclip_block",
    "maskclip_block",
    "PatternFn",
    "modified_block",
    "naclip_block",
    "sclip_block",
]

SelfSelf = Literal["qq", "kk", "vv"]

# ---------------------------------------------------------------------------------------------
# Configurations (frozen; defaults are the authors' defaults for ViT-B/16)
# ---------------------------------------------------------------------------------------------


def _check_scale(scale: float | None) -> None:
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive (or None for d_head ** -0.5), got {scale!r}.")


@dataclass(frozen=True)
class MaskCLIPConfig:
    """MaskCLIP's last block. Defaults: the release keeps the residual and the FFN.

    Attributes:
        residual: add the block input to ``out_proj(v)``.
        ffn: then apply the block's FFN with its residual, ``y + mlp(ln_2(y))``.
    """

    residual: bool = True
    ffn: bool = True


@dataclass(frozen=True)
class SCLIPConfig:
    """SCLIP's last block. Defaults: correlative self-attention, residual and FFN kept.

    Attributes:
        residual: add the block input to the attention branch.
        ffn: then apply the block's FFN with its residual.
        scale: logit scale of both softmaxes; None means ``d_head ** -0.5`` (the release).
    """

    residual: bool = True
    ffn: bool = True
    scale: float | None = None

    def __post_init__(self) -> None:
        _check_scale(self.scale)


@dataclass(frozen=True)
class ClearCLIPConfig:
    """ClearCLIP's last block. Defaults: q-q attention, no residual, no FFN.

    Attributes:
        attention: which self-self attention, ``"qq"`` (the release's ``model_type='ClearCLIP'``),
            ``"kk"`` or ``"vv"``.
        residual: add the block input to the attention branch.
        ffn: then apply the block's FFN with its residual.
        scale: logit scale of the softmax; None means ``d_head ** -0.5`` (the release).
    """

    attention: SelfSelf = "qq"
    residual: bool = False
    ffn: bool = False
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.attention not in ("qq", "kk", "vv"):
            raise ValueError(f"attention must be 'qq', 'kk' or 'vv', got {self.attention!r}.")
        _check_scale(self.scale)


@dataclass(frozen=True)
class NACLIPConfig:
    """NACLIP's last block. Defaults: ``arch='reduced'``, ``attn_strategy='naclip'``, std 5.

    Attributes:
        gaussian_std: standard deviation, in patches, of the Gaussian neighbourhood bias.
        residual: add the block input to the attention branch (``arch='vanilla'`` keeps it).
        ffn: then apply the block's FFN with its residual (``arch='vanilla'`` keeps it).
        scale: scale of the ``k k^T`` logits (the bias is added unscaled); None means
            ``d_head ** -0.5`` (the release).
    """

    gaussian_std: float = 5.0
    residual: bool = False
    ffn: bool = False
    scale: float | None = None

    def __post_init__(self) -> None:
        if not self.gaussian_std > 0:
            raise ValueError(f"gaussian_std must be positive, got {self.gaussian_std!r}.")
        _check_scale(self.scale)


# ---------------------------------------------------------------------------------------------
# Pure functions: attention variants and the modified last block
# ---------------------------------------------------------------------------------------------


PatternFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``pattern(q, k, v) -> probs``: (B, H, T, d) x3 -> (B, H, T, T) float32, a block's attention."""


def modified_block(
    block: nn.Module,
    x: torch.Tensor,
    pattern: PatternFn | None,
    *,
    residual: bool,
    ffn: bool,
    layer: int = 0,
    hooks: Hooks = NO_HOOKS,
) -> torch.Tensor:
    """A pre-norm ViT block whose attention is ``pattern`` and whose residual/FFN are switches.

    ``y = ls_1(out_proj(pattern(q, k, v) @ v))`` with q, k, v from ``in_proj(ln_1(x))`` (``pattern``
    None: the value path, ``y = ls_1(out_proj(v))``); then ``y = x + y`` if ``residual``; then
    ``y = y + ls_2(mlp(ln_2(y)))`` if ``ffn``. x: (B, T, C) -> (B, T, C). The hook points of
    block ``layer`` fire along the way (``attn.hook_pattern`` with ``pattern``'s output;
    ``hook_resid_mid`` with the attention result, residual or not).
    """
    x = hooks(block_hook(layer, "hook_resid_pre"), x)
    q, k, v = forward.attention_inputs(block, x, layer, hooks)
    if pattern is None:
        o = v
    else:
        o = forward.attend(forward.pattern_hook(pattern(q, k, v), layer, hooks)[0], v)
    y = forward.attention_output(block, o, layer, hooks)
    y = hooks(block_hook(layer, "hook_resid_mid"), x + y if residual else y)
    if ffn:
        y = y + forward.mlp_output(block, y, layer, hooks)
    return hooks(block_hook(layer, "hook_resid_post"), y)


def maskclip_block(block: nn.Module, x: torch.Tensor, config: MaskCLIPConfig, *,
                   layer: int = 0, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
    """MaskCLIP's last block: the value path ``out_proj(v)`` in place of attention.

    x: (B, T, C) -> (B, T, C).
    """
    return modified_block(block, x, None, residual=config.residual, ffn=config.ffn,
                          layer=layer, hooks=hooks)


def sclip_block(block: nn.Module, x: torch.Tensor, config: SCLIPConfig, *,
                layer: int = 0, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
    """SCLIP's last block: correlative self-attention. x: (B, T, C) -> (B, T, C)."""
    return modified_block(block, x, lambda q, k, v: correlative_probs(q, k, config.scale),
                          residual=config.residual, ffn=config.ffn, layer=layer, hooks=hooks)


def clearclip_block(block: nn.Module, x: torch.Tensor, config: ClearCLIPConfig, *,
                    layer: int = 0, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
    """ClearCLIP's last block: self-self (q-q) attention. x: (B, T, C) -> (B, T, C)."""
    which = "qkv".index(config.attention[0])
    return modified_block(
        block, x, lambda q, k, v: self_self_probs((q, k, v)[which], config.scale),
        residual=config.residual, ffn=config.ffn, layer=layer, hooks=hooks,
    )


def naclip_block(
    block: nn.Module, x: torch.Tensor, grid: forward.Grid, config: NACLIPConfig, *,
    layer: int = 0, hooks: Hooks = NO_HOOKS,
) -> torch.Tensor:
    """NACLIP's last block: k-k attention with a Gaussian neighbourhood bias on the logits.

    x: (B, 1 + gh * gw, C) tokens on ``grid`` -> (B, 1 + gh * gw, C).
    """
    n = int(grid[0]) * int(grid[1])
    if x.shape[1] != 1 + n:
        raise ValueError(f"x holds {x.shape[1]} tokens; grid {grid} needs 1 + {n}.")
    bias = gaussian_neighbourhood_bias(grid, config.gaussian_std, device=x.device)
    return modified_block(block, x, lambda q, k, v: neighbourhood_probs(k, bias, config.scale),
                          residual=config.residual, ffn=config.ffn, layer=layer, hooks=hooks)


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


class CLIPEncoder(Encoder):
    """Vanilla CLIP: the patch tokens of the last block through ``ln_post`` and ``proj``.

    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
    ICML 2021; the forward is open_clip's (github.com/mlfoundations/open_clip), which
    :mod:`sfp.core.forward` reproduces. Its class token path is exactly ``model.encode_image``.
    """

    name = "clip"

    def __init__(self, bundle: Any, config: None = None) -> None:
        if config is not None:
            raise TypeError(f"The 'clip' encoder has no configuration; got {config!r}.")
        super().__init__(bundle)

    @torch.no_grad()
    def encode_tokens(self, images: torch.Tensor, fwd_hooks: FwdHooks = None) -> torch.Tensor:
        """Final hidden states h_L: images (B, 3, H, W) -> (B, 1 + N, C), before ln_post."""
        return forward.run(self.visual, images, self.hooks(fwd_hooks))[0]

    def encode_patches(self, images: torch.Tensor, fwd_hooks: FwdHooks = None) -> torch.Tensor:
        """images (B, 3, H, W) -> (B, N, D): ``ln_post(h_L[:, 1:]) @ proj``."""
        n = self.grid(images)
        tokens = self.encode_tokens(images, fwd_hooks)
        return forward.project_patches(self.visual, tokens[:, 1 : 1 + n[0] * n[1]])


class _LastBlockEncoder(Encoder):
    """Blocks 1..L-1 unchanged, block L replaced by :meth:`last_block`."""

    config_type: type = object

    def __init__(self, bundle: Any, config: Any = None) -> None:
        super().__init__(bundle)
        if config is None:
            config = self.config_type()
        if not isinstance(config, self.config_type):
            raise TypeError(
                f"The {self.name!r} encoder takes a {self.config_type.__name__} (or None), "
                f"got {type(config).__name__}."
            )
        self._config = config

    #: ``block_fn(block, x, [grid,] config, layer=, hooks=)``: the modified block L.
    block_fn: Callable[..., torch.Tensor]
    #: Whether ``block_fn`` takes the patch grid (NACLIP's neighbourhood).
    needs_grid: bool = False

    def last_block(self, block: nn.Module, x: torch.Tensor, grid: forward.Grid,
                   layer: int = 0, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
        """The modified block L: x = h_{L-1} (B, 1 + N, C) -> (B, 1 + N, C)."""
        extra = (grid,) if self.needs_grid else ()
        return type(self).block_fn(block, x, *extra, self._config, layer=layer, hooks=hooks)

    @torch.no_grad()
    def encode_tokens(self, images: torch.Tensor, fwd_hooks: FwdHooks = None) -> torch.Tensor:
        """Output of the modified block L: images (B, 3, H, W) -> (B, 1 + N, C), before ln_post."""
        hooks = self.hooks(fwd_hooks)
        x, grid = forward.embed(self.visual, images, hooks)
        last = self.num_layers
        x = forward.run_blocks(self.visual, x, 1, last - 1, hooks)
        return self.last_block(forward.blocks_of(self.visual)[last - 1], x, grid, last, hooks)

    def encode_patches(self, images: torch.Tensor, fwd_hooks: FwdHooks = None) -> torch.Tensor:
        """images (B, 3, H, W) -> (B, N, D): ``ln_post(tokens[:, 1:]) @ proj``."""
        n = self.grid(images)
        tokens = self.encode_tokens(images, fwd_hooks)
        return forward.project_patches(self.visual, tokens[:, 1 : 1 + n[0] * n[1]])


class MaskCLIPEncoder(_LastBlockEncoder):
    """MaskCLIP: the last block's value path instead of its q-k attention.

    Zhou, Loy, Dai, "Extract Free Dense Labels from CLIP", ECCV 2022; code
    github.com/chongzhou96/MaskCLIP (mmsegmentation-based). Read in its history as mirrored by
    volgachen/MaskCLIP: ``mmseg/models/backbones/forward.py`` (``TransformerEncoderLayer.forward``
    with ``return_qkv``/``attn2ffn``: ``y = in_proj(norm1(x))``, split into q, k, v, each through
    ``out_proj``; ``v += x``; ``v = ffn(norm2(v), identity=v)``), the last layer then takes
    ``final_norm`` (= ln_post) and ``configs/_base_/models/maskclip_vit16.py`` sets
    ``return_qkv=True, final_norm=True``; ``mmseg/models/decode_heads/maskclip_head.py`` applies
    CLIP's ``proj`` (a bias-free 1x1 conv) to v. So the release **keeps the residual and the
    FFN** around the value path; its key smoothing and prompt denoising are off by default
    (``num_vote=0``, ``topk_text=0``, ``cls_thresh=0``) and are not part of this encoder.
    Its mmseg ViT config names plain GELU and LayerNorm eps 1e-6; here the bundle's own blocks
    are used (QuickGELU and eps 1e-5 for OpenAI weights).
    """

    name = "maskclip"
    config_type = MaskCLIPConfig
    block_fn = staticmethod(maskclip_block)


class SCLIPEncoder(_LastBlockEncoder):
    """SCLIP: correlative self-attention in the last block.

    Wang, Mei, Yuille, "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference",
    ECCV 2024; code github.com/wangf3014/SCLIP. From ``clip/model.py``
    (``VisionTransformer.forward`` and ``custom_attn(csa=True)``): blocks 1..L-1 unchanged; in
    block L ``x = x + custom_attn(attn, ln_1(x))`` then ``x = x + mlp(ln_2(x))`` (residual and
    FFN kept), where ``custom_attn`` computes ``softmax(q q^T s) + softmax(k k^T s)`` (summed,
    not averaged; ``s = head_dim ** -0.5``) over all tokens including cls, applies it to v and
    ``out_proj``; ``clip_segmentor.py`` calls ``encode_image(img, return_all=True, csa=True)``
    (``ln_post(x) @ proj`` on every token) and drops the cls token.
    """

    name = "sclip"
    config_type = SCLIPConfig
    block_fn = staticmethod(sclip_block)


class ClearCLIPEncoder(_LastBlockEncoder):
    """ClearCLIP: self-self (q-q) attention, no residual connection, no FFN in the last block.

    Lan, Chen, Ke, Wang, Feng, Zhang, "ClearCLIP: Decomposing CLIP Representations for Dense
    Vision-Language Inference", ECCV 2024; code github.com/mc-lan/ClearCLIP. From
    ``open_clip/transformer.py`` (``VisionTransformer.forward`` with ``ignore_residual=True``,
    ``last_n_layers=1``: ``output = custom_attn(blk.attn, blk.ln_1(x), model_type)``, no
    residual, no FFN; ``custom_attn`` with ``model_type='ClearCLIP'`` is
    ``softmax(q q^T * head_dim ** -0.5)`` applied to v, then ``out_proj``, no extra temperature)
    and ``clearclip_segmentor.py`` (``ignore_residual=True`` default; ``ln_post`` and ``proj``
    on the patch tokens). Note: the released ``configs/base_config.py`` sets
    ``model_type='vanilla'`` (q-k attention without residual/FFN), while the paper's method and
    ``forward``'s default are ``'ClearCLIP'`` (q-q); we follow the method. The release runs in
    fp16.
    """

    name = "clearclip"
    config_type = ClearCLIPConfig
    block_fn = staticmethod(clearclip_block)


class NACLIPEncoder(_LastBlockEncoder):
    """NACLIP: k-k attention plus a Gaussian neighbourhood bias, "reduced" last block.

    Hajimiri, Ben Ayed, Dolz, "Pay Attention to Your Neighbours: Training-Free Open-Vocabulary
    Semantic Segmentation", WACV 2025; code github.com/sinahmr/NACLIP. From ``naclip.py``
    (defaults ``arch='reduced'``, ``attn_strategy='naclip'``, ``gaussian_std=5.``) and
    ``clip/model.py``: with ``arch='reduced'`` block L is ``x = custom_attn(attn, ln_1(x))``
    (no residual, no FFN); ``custom_attn`` for ``'naclip'`` computes
    ``softmax(k k^T * head_dim ** -0.5 + omega)``, the bias ``omega`` added to the logits
    unscaled and shared by all heads, then v and ``out_proj``. ``omega`` comes from
    ``gaussian_window(2 gh - 1, 2 gw - 1, std)`` convolved ('same' padding) with one-hot maps of
    each patch (``get_attention_addition``), i.e. ``exp(-(dr^2 + dc^2) / (2 std^2))`` between
    patches on the ``(gh, gw)`` grid, with a zero row and column for the cls token
    (``adjust_for_cls=True``): see :func:`gaussian_neighbourhood_bias`. Its default PAMR
    post-processing (``pamr_steps=10``) acts on segmentation logits, not on these features.
    """

    name = "naclip"
    config_type = NACLIPConfig
    block_fn = staticmethod(naclip_block)
    needs_grid = True


register_encoder("clip", CLIPEncoder, display="CLIP", citation="Radford et al., ICML 2021",
                 doc="plain CLIP patch tokens")
register_encoder("maskclip", MaskCLIPEncoder, display="MaskCLIP", config_type=MaskCLIPConfig,
                 citation="Zhou et al., ECCV 2022", doc="the last block's value path")
register_encoder("sclip", SCLIPEncoder, display="SCLIP", config_type=SCLIPConfig,
                 citation="Wang et al., ECCV 2024", doc="correlative self-attention (q-q + k-k)")
register_encoder("clearclip", ClearCLIPEncoder, display="ClearCLIP", config_type=ClearCLIPConfig,
                 citation="Lan et al., ECCV 2024",
                 doc="q-q attention without residual and FFN in the last block")
register_encoder("naclip", NACLIPEncoder, display="NACLIP", config_type=NACLIPConfig,
                 citation="Hajimiri et al., WACV 2025",
                 doc="k-k attention with a Gaussian neighbourhood, reduced last block")
