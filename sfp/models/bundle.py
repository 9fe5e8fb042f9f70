"""What a loaded model is: :class:`ModelBundle`, its provenance, and wrapping an open_clip CLIP
into one (:func:`bundle_from_model`).

Kept apart from :mod:`sfp.models.loading` so the model sources (the planted model, the toy
CLIP) build bundles without importing the loader, which in turn knows them by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from torch import nn

from sfp.core.errors import SFPError

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "PROVENANCES", "ModelBundle", "ModelLoadError",
           "bundle_from_model"]

#: open_clip stores OpenAI's CLIP normalisation constants here.
OPENAI_MEAN = tuple(open_clip.OPENAI_DATASET_MEAN)
OPENAI_STD = tuple(open_clip.OPENAI_DATASET_STD)


class ModelLoadError(SFPError, ValueError):
    """The model name, weights file or architecture is not usable."""


#: Where a bundle's weights came from (``ModelBundle.provenance``), and the caveat every
#: figure, widget and written image of such a model must carry (None: no caveat).
PROVENANCES: dict[str, str | None] = {
    "pretrained": None,  # an open_clip pretrained tag
    "file": None,  # a local weights file
    "random": "random weights (results mean nothing)",
    "synthetic": "synthetic (planted outliers)",
    "toy": "toy CLIP trained on generated textures — not a pretrained CLIP",
    "toy-planted": "toy CLIP with planted outliers — not a pretrained CLIP",
}


@dataclass
class ModelBundle:
    """A loaded CLIP model with the facts the rest of the toolkit needs.

    ``pretrained`` is the weights' description: a tag, a file path, ``"random"``, or
    ``"synthetic (planted outliers)"`` for :mod:`sfp.models.synthetic` models; ``provenance``
    says which kind of source that is (a key of :data:`PROVENANCES`).
    """

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str
    pretrained: str
    patch_size: int
    num_layers: int
    width: int
    heads: int
    embed_dim: int
    device: torch.device
    image_size: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    quick_gelu: bool = False
    provenance: str = "pretrained"

    def __post_init__(self) -> None:
        if self.provenance not in PROVENANCES:
            raise ModelLoadError(f"provenance must be one of {sorted(PROVENANCES)}, got "
                                 f"{self.provenance!r}.")

    @property
    def visual(self) -> nn.Module:
        """The open_clip ``VisionTransformer``."""
        return self.model.visual

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    @property
    def is_random(self) -> bool:
        return self.provenance == "random"

    @property
    def is_synthetic(self) -> bool:
        """Outliers planted on purpose (the planted random ViT or the planted toy CLIP)."""
        return self.provenance in ("synthetic", "toy-planted")

    @property
    def is_toy(self) -> bool:
        """The toy CLIP trained on generated textures (:mod:`sfp.models.toy`), planted or not."""
        return self.provenance in ("toy", "toy-planted")

    @property
    def caveat(self) -> str | None:
        """What every output of this model must say about it (None for real weights)."""
        return PROVENANCES[self.provenance]

    @property
    def label(self) -> str:
        """Short human label, e.g. ``"ViT-B-16 / openai"``; used in titles."""
        return f"{self.name} / {self.pretrained}"

    def __repr__(self) -> str:
        return (
            f"ModelBundle(name={self.name!r}, pretrained={self.pretrained!r}, "
            f"layers={self.num_layers}, width={self.width}, heads={self.heads}, "
            f"patch={self.patch_size}, embed_dim={self.embed_dim}, device={self.device}, "
            f"dtype={self.dtype}, quick_gelu={self.quick_gelu})"
        )


def bundle_from_model(
    model: nn.Module,
    *,
    name: str,
    pretrained: str,
    preprocess: Callable[[Any], torch.Tensor] | None = None,
    quick_gelu: bool = False,
    mean: tuple[float, ...] = OPENAI_MEAN,
    std: tuple[float, ...] = OPENAI_STD,
    provenance: str | None = None,
    tokenizer: Callable[..., torch.Tensor] | None = None,
) -> ModelBundle:
    """Wrap an already-built open_clip CLIP model (ViT visual tower) in a bundle.

    provenance: a key of :data:`PROVENANCES`; None: ``"random"`` when ``pretrained`` is
    ``"random"``, else ``"pretrained"``. tokenizer: None: ``open_clip.get_tokenizer(name)``.
    """
    if provenance is None:
        provenance = "random" if pretrained == "random" else "pretrained"
    visual = getattr(model, "visual", None)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if visual is None or blocks is None or not hasattr(visual, "conv1"):
        raise ModelLoadError(
            "Only open_clip CLIP models with a ViT visual tower are supported "
            f"(got {type(visual).__name__} as the visual tower)."
        )
    attn = blocks[0].attn
    if not isinstance(attn, nn.MultiheadAttention):
        raise ModelLoadError(
            f"Unsupported attention module {type(attn).__name__}; sfp's forward needs "
            "open_clip's standard ViT blocks (nn.MultiheadAttention)."
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ModelLoadError("ViTs with attentional pooling (CoCa-style) are not supported.")
    ps = visual.patch_size
    ph, pw = (ps, ps) if isinstance(ps, int) else ps
    if ph != pw:
        raise ModelLoadError(f"Non-square patches {ps} are not supported.")
    img = visual.image_size
    image_size = (img, img) if isinstance(img, int) else tuple(img)
    if preprocess is None:
        preprocess = open_clip.image_transform(image_size, is_train=False, mean=mean, std=std)
    device = visual.conv1.weight.device
    return ModelBundle(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer if tokenizer is not None else open_clip.get_tokenizer(name),
        name=name,
        pretrained=pretrained,
        patch_size=int(ph),
        num_layers=len(blocks),
        width=int(visual.transformer.width),
        heads=int(attn.num_heads),
        embed_dim=int(visual.output_dim),
        device=device,
        image_size=image_size,  # type: ignore[arg-type]
        mean=tuple(mean),  # type: ignore[arg-type]
        std=tuple(std),  # type: ignore[arg-type]
        quick_gelu=quick_gelu,
        provenance=provenance,
    )
