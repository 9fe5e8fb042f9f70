"""Build a dense encoder by method name: ``make_encoder(bundle, "sclip")``.

The methods (see :func:`available_methods`, and :data:`sfp.methods.base.ENCODERS` for their
display names and descriptions):

- ``"sfp"``: SFP, Jin et al. ICCV 2025 (:class:`sfp.methods.purify.SFPEncoder`; its config is
  an ``SFPConfig`` or a preset name of :data:`sfp.methods.config.PRESETS`);
- ``"sc-clip"``: SC-CLIP on SFP's engine (:class:`sfp.methods.purify.SCCLIPEncoder`, default
  config ``SFPConfig.preset("sc-clip")``);
- ``"clip"``, ``"maskclip"``, ``"sclip"``, ``"clearclip"``, ``"naclip"``: the baselines of
  :mod:`sfp.methods.baselines`;
- ``"ttr"``: test-time registers, Jiang, Dravid et al. NeurIPS 2025
  (:class:`sfp.methods.registers.TTREncoder`, config ``TTRConfig``).

Other encoders can be added with :func:`sfp.methods.base.register_encoder`.
"""

from __future__ import annotations

from typing import Any

from sfp.methods import baselines, purify, registers  # noqa: F401  (they register their methods)
from sfp.methods.base import ENCODERS, Encoder, register_encoder

__all__ = ["Encoder", "available_methods", "make_encoder", "method_variants", "register_encoder"]


def available_methods() -> tuple[str, ...]:
    """Names accepted by :func:`make_encoder`, in registration order."""
    return ENCODERS.names()


def method_variants() -> list[tuple[str, str | None]]:
    """Every encoder once and ``sfp`` once per preset, as ``(method, preset)`` pairs (preset
    None for the others): what ``sfp eval --method all`` and the toy tables compare."""
    from sfp.methods.config import PRESETS

    out: list[tuple[str, str | None]] = [(m, None) for m in available_methods() if m != "sfp"]
    return out + [("sfp", p) for p in PRESETS.names()]


class _AdaptedEncoder(Encoder):
    """Wraps an object with ``encode_patches`` that does not subclass :class:`Encoder`."""

    def __init__(self, impl: Any, bundle: Any, name: str) -> None:
        super().__init__(bundle)
        self.impl = impl
        self.name = name

    @property
    def config(self) -> Any:
        return getattr(self.impl, "config", None)

    def encode_patches(self, images, fwd_hooks=None):  # type: ignore[no-untyped-def]
        if fwd_hooks is not None:
            raise TypeError(f"the {self.name!r} encoder does not take forward hooks.")
        return self.impl.encode_patches(images)


def make_encoder(bundle: Any, method: str = "sfp", config: Any = None) -> Encoder:
    """Build the encoder ``method`` on ``bundle``'s visual tower.

    Args:
        bundle: a loaded model (:func:`sfp.models.loading.load_model`).
        method: one of :func:`available_methods` (case-insensitive).
        config: the method's configuration: for ``"sfp"`` an ``SFPConfig`` or a preset name
            (``"official"``, ``"paper"``, ...); for a baseline its own config dataclass from
            :mod:`sfp.methods.baselines` (e.g. ``NACLIPConfig``); None for the defaults.

    Raises:
        RegistryError (a ValueError): unknown method (the message lists the methods and
            close matches).
        TypeError: ``config`` is not the method's configuration type.
    """
    entry = ENCODERS.get(method)
    encoder = entry.value(bundle, config)
    if not isinstance(encoder, Encoder):
        if not callable(getattr(encoder, "encode_patches", None)):
            raise TypeError(
                f"The factory of {entry.name!r} returned {type(encoder).__name__}, which has no "
                "encode_patches method."
            )
        encoder = _AdaptedEncoder(encoder, bundle, entry.name)
    return encoder
