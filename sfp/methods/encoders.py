"""The encoder contract and the registry that builds encoders by method name.

An *encoder* turns a batch of normalised crops into dense patch features that are compared with
text queries by cosine similarity::

    enc = make_encoder(bundle, "sclip")
    feats = enc(images)            # images (B, 3, H, W) -> feats (B, gh * gw, D)
    gh, gw = enc.grid(images)      # patch grid of those images, row-major order of feats

``feats`` are the patch tokens after ``ln_post`` and ``proj`` and are **not** normalised. Every
encoder builds on the one forward path in :mod:`sfp.core.forward`, so any input size works, including
non-square grids (rows and columns kept apart). ``encode_patches`` always runs under
``torch.no_grad`` (these are inference-only, training-free methods).

Methods registered here (see :func:`available_methods`):

- ``"sfp"``: SFP, Jin et al. ICCV 2025 (:class:`sfp.methods.purify.SFPEncoder`, config ``SFPConfig``);
- ``"clip"``: plain CLIP patch tokens (:class:`sfp.methods.baselines.CLIPEncoder`);
- ``"maskclip"``: MaskCLIP's value path (:class:`sfp.methods.baselines.MaskCLIPEncoder`);
- ``"sclip"``: SCLIP's correlative self-attention (:class:`sfp.methods.baselines.SCLIPEncoder`);
- ``"clearclip"``: ClearCLIP's q-q attention without residual and FFN
  (:class:`sfp.methods.baselines.ClearCLIPEncoder`);
- ``"naclip"``: NACLIP's k-k attention with a Gaussian neighbourhood
  (:class:`sfp.methods.baselines.NACLIPEncoder`).

Other encoders can be added with :func:`register_encoder`.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sfp.core import forward
from sfp.models.loading import ModelBundle

__all__ = [
    "Encoder",
    "EncoderFactory",
    "available_methods",
    "make_encoder",
    "register_encoder",
]

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

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("encode_patches")
        if fn is not None and not getattr(fn, "__isabstractmethod__", False):
            cls.encode_patches = _with_no_grad(fn)  # type: ignore[method-assign]

    @property
    def visual(self) -> nn.Module:
        """The open_clip ``VisionTransformer`` of the bundle."""
        return self.bundle.visual

    @property
    def config(self) -> Any:
        """The encoder's frozen configuration, or None when it has none."""
        return getattr(self, "_config", None)

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
    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features: images (B, 3, H, W) normalised -> (B, gh * gw, D), not normalised.

        D is the joint embedding size (``bundle.embed_dim``); patches are row-major on the
        ``grid(images)``; the dtype is the model's.
        """

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode_patches`."""
        return self.encode_patches(images)

    def __repr__(self) -> str:
        cfg = f", config={self.config!r}" if self.config is not None else ""
        return f"{type(self).__name__}(name={self.name!r}, model={self.bundle.label!r}{cfg})"


class _AdaptedEncoder(Encoder):
    """Wraps an object with ``encode_patches`` that does not subclass :class:`Encoder`."""

    def __init__(self, impl: Any, bundle: ModelBundle, name: str) -> None:
        super().__init__(bundle)
        self.impl = impl
        self.name = name

    @property
    def config(self) -> Any:
        return getattr(self.impl, "config", None)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        return self.impl.encode_patches(images)


EncoderFactory = Callable[[ModelBundle, Any], Encoder]
"""``factory(bundle, config) -> Encoder``; ``config`` may be None (the method's defaults)."""

_REGISTRY: dict[str, EncoderFactory] = {}


def _key(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"An encoder method is named by a string, got {type(name).__name__}.")
    return name.strip().lower()


def register_encoder(name: str, factory: EncoderFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(bundle, config) -> Encoder`` under ``name`` (case-insensitive).

    Raises:
        ValueError: ``name`` is empty or already registered (pass ``overwrite=True`` to replace).
    """
    key = _key(name)
    if not key:
        raise ValueError("An encoder method name must not be empty.")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}.")
    if key in _REGISTRY and not overwrite:
        raise ValueError(
            f"Encoder method {key!r} is already registered; pass overwrite=True to replace it."
        )
    _REGISTRY[key] = factory


def available_methods() -> tuple[str, ...]:
    """Names accepted by :func:`make_encoder`, in registration order."""
    return tuple(_REGISTRY)


def make_encoder(bundle: ModelBundle, method: str = "sfp", config: Any = None) -> Encoder:
    """Build the encoder ``method`` on ``bundle``'s visual tower.

    Args:
        bundle: a loaded model (:func:`sfp.models.loading.load_model`).
        method: one of :func:`available_methods` (case-insensitive).
        config: the method's configuration: for ``"sfp"`` an ``SFPConfig`` or a preset name
            (``"official"``, ``"paper"``); for a baseline its own config dataclass from
            :mod:`sfp.methods.baselines` (e.g. ``NACLIPConfig``); None for the authors' defaults.

    Raises:
        ValueError: unknown method (the message lists the methods and close matches).
        TypeError: ``config`` is not the method's configuration type.
    """
    key = _key(method)
    factory = _REGISTRY.get(key)
    if factory is None:
        methods = available_methods()
        close = difflib.get_close_matches(key, methods, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown encoder method {method!r}.{hint} Available: {', '.join(methods)}."
        )
    encoder = factory(bundle, config)
    if not isinstance(encoder, Encoder):
        if not callable(getattr(encoder, "encode_patches", None)):
            raise TypeError(
                f"The factory of {key!r} returned {type(encoder).__name__}, which has no "
                "encode_patches method."
            )
        encoder = _AdaptedEncoder(encoder, bundle, key)
    return encoder


def _make_sfp(bundle: ModelBundle, config: Any) -> Encoder:
    """Factory of ``"sfp"``: :class:`sfp.methods.purify.SFPEncoder` (imported when first asked for)."""
    from sfp.methods import purify

    if isinstance(config, str):
        from sfp.methods.config import SFPConfig

        presets = {"official": SFPConfig.official, "paper": SFPConfig.paper}
        preset = presets.get(config.strip().lower())
        if preset is None:
            raise ValueError(
                f"Unknown SFP preset {config!r}; use 'official' or 'paper', or pass an SFPConfig."
            )
        config = preset()
    return purify.SFPEncoder(bundle, config)


def _baseline_factory(class_name: str) -> EncoderFactory:
    """Factory that imports :mod:`sfp.methods.baselines` lazily (it imports this module)."""

    def factory(bundle: ModelBundle, config: Any) -> Encoder:
        from sfp.methods import baselines

        return getattr(baselines, class_name)(bundle, config)

    factory.__name__ = f"make_{class_name}"
    return factory


register_encoder("sfp", _make_sfp)
register_encoder("clip", _baseline_factory("CLIPEncoder"))
register_encoder("maskclip", _baseline_factory("MaskCLIPEncoder"))
register_encoder("sclip", _baseline_factory("SCLIPEncoder"))
register_encoder("clearclip", _baseline_factory("ClearCLIPEncoder"))
register_encoder("naclip", _baseline_factory("NACLIPEncoder"))
