"""The encoder contract, and the registry every dense method is entered in.

An *encoder* turns a batch of normalised crops into dense patch features that are compared with
text queries by cosine similarity::

    enc = make_encoder(bundle, "sclip")      # sfp.methods.encoders
    feats = enc(images)            # images (B, 3, H, W) -> feats (B, gh * gw, D)
    gh, gw = enc.grid(images)      # patch grid of those images, row-major order of feats

``feats`` are the patch tokens after ``ln_post`` and ``proj`` and are **not** normalised. Every
encoder runs :mod:`sfp.core.forward`, so any input size works (non-square grids too) and
forward hooks (``enc.encode_patches(images, fwd_hooks=[...])``) reach every method's blocks.
``encode_patches`` always runs under ``torch.no_grad`` (these are inference-only methods).

The methods register themselves in :data:`ENCODERS` where they are defined
(:mod:`sfp.methods.baselines`, :mod:`sfp.methods.purify`); each entry carries a display
name, a one-line description and its configuration type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from sfp.core import forward
from sfp.core.hooks import HookFn, Hooks
from sfp.core.registry import Entry, Registry

__all__ = ["ENCODERS", "Encoder", "EncoderFactory", "FwdHooks", "register_encoder"]

FwdHooks = Hooks | Iterable[tuple[str, HookFn]] | None
"""Forward hooks as :func:`sfp.core.forward.run_with_hooks` takes them."""

_NO_GRAD_FLAG = "_sfp_no_grad"


def _with_no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(fn, _NO_GRAD_FLAG, False):
        return fn
    wrapped = torch.no_grad()(fn)
    setattr(wrapped, _NO_GRAD_FLAG, True)
    return wrapped


class Encoder(ABC):
    """Base class of every dense encoder: ``images (B, 3, H, W) -> patches (B, N, D)``.

    Subclasses set ``name`` and implement :meth:`encode_patches`; whatever a subclass defines as
    ``encode_patches`` is wrapped in ``torch.no_grad`` when the class is created, so the
    contract holds without each implementation remembering it.

    Attributes:
        bundle: the :class:`~sfp.models.loading.ModelBundle` whose visual tower is used.
        name: the method name the encoder is registered under (e.g. ``"sclip"``).
    """

    name: str = "encoder"

    def __init__(self, bundle: Any) -> None:
        self.bundle = bundle

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("encode_patches")
        if fn is not None and not getattr(fn, "__isabstractmethod__", False):
            cls.encode_patches = _with_no_grad(fn)  # type: ignore[method-assign]

    @property
    def visual(self) -> nn.Module:
        """The open_clip ``VisionTransformer`` of the bundle."""
        return forward.visual_of(self.bundle)

    @property
    def num_layers(self) -> int:
        return len(forward.blocks_of(self.visual))

    @property
    def config(self) -> Any:
        """The encoder's frozen configuration, or None when it has none."""
        return getattr(self, "_config", None)

    @property
    def display(self) -> str:
        """The method's display name (``"SCLIP"``), from its registry entry."""
        return ENCODERS.get(self.name).display if self.name in ENCODERS else self.name

    def hooks(self, fwd_hooks: FwdHooks) -> Hooks:
        """``fwd_hooks`` as :class:`~sfp.core.hooks.Hooks`, names checked for this depth."""
        return Hooks.of(fwd_hooks, self.num_layers)

    def grid(self, images_or_hw: torch.Tensor | Sequence[int]) -> forward.Grid:
        """Patch grid ``(gh, gw)`` for images ``(..., H, W)`` or a size ``(H, W)`` in pixels."""
        if isinstance(images_or_hw, torch.Tensor):
            if images_or_hw.ndim < 2:
                raise ValueError(
                    f"grid() needs images (..., H, W) or (H, W), got a tensor of shape "
                    f"{tuple(images_or_hw.shape)}."
                )
            h, w = images_or_hw.shape[-2:]
        else:
            if len(images_or_hw) != 2:
                raise ValueError(f"grid() needs (H, W), got {images_or_hw!r}.")
            h, w = images_or_hw
        return forward.patch_grid(self.visual, int(h), int(w))

    @abstractmethod
    def encode_patches(self, images: torch.Tensor, fwd_hooks: FwdHooks = None) -> torch.Tensor:
        """Patch features: images (B, 3, H, W) normalised -> (B, gh * gw, D), not normalised.

        D is the joint embedding size (``bundle.embed_dim``); patches are row-major on the
        ``grid(images)``; the dtype is the model's. ``fwd_hooks`` run at their hook points.
        """

    def __call__(self, images: torch.Tensor, fwd_hooks: FwdHooks = None) -> torch.Tensor:
        """Same as :meth:`encode_patches`."""
        return self.encode_patches(images, fwd_hooks)

    def __repr__(self) -> str:
        cfg = f", config={self.config!r}" if self.config is not None else ""
        label = getattr(self.bundle, "label", "?")
        return f"{type(self).__name__}(name={self.name!r}, model={label!r}{cfg})"


EncoderFactory = Callable[[Any, Any], Encoder]
"""``factory(bundle, config) -> Encoder``; ``config`` may be None (the method's defaults)."""

#: Every dense method by name: value = factory; metadata: ``config_type``, ``citation``.
ENCODERS: Registry[EncoderFactory] = Registry("encoder method")


def register_encoder(
    name: str,
    factory: EncoderFactory,
    *,
    display: str | None = None,
    doc: str = "",
    config_type: type | None = None,
    citation: str = "",
    overwrite: bool = False,
) -> Entry[EncoderFactory]:
    """Register ``factory(bundle, config) -> Encoder`` under ``name`` (case-insensitive).

    display: label in figures and widgets; doc: one line for ``--help``; config_type: the
    configuration class the factory takes (None: no configuration).

    Raises RegistryError when ``name`` is empty or already registered (``overwrite=True``
    replaces it); TypeError when ``factory`` is not callable.
    """
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}.")
    return ENCODERS.register(name, factory, display=display, doc=doc, overwrite=overwrite,
                             config_type=config_type, citation=citation)
