"""Test-time registers as a dense method: ``make_encoder(bundle, "ttr")``.

Jiang, Dravid, Efros, Gandelsman, "Vision Transformers Don't Need Trained Registers",
NeurIPS 2025; code github.com/nickjiang2378/test-time-registers. Extra tokens are appended to
the sequence and the register neurons' activity is moved onto them
(:func:`sfp.core.neurons.ttr_hooks`), so the high-norm outliers leave the image; the patch
features are those of a base method (CLIP by default) on the patches ``1..N``, the registers
dropped. The register neurons are given (``TTRConfig.neurons``, e.g. from
:func:`sfp.core.neurons.register_neurons` over a dataset) or, when None, found on each batch
of images the encoder is given (two extra forwards; neurons found on a handful of crops are
noisier than a dataset's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sfp.core import neurons as nr
from sfp.methods import baselines  # noqa: F401  (registers the base methods first)
from sfp.methods.base import ENCODERS, Encoder, FwdHooks, register_encoder

__all__ = ["TTRConfig", "TTREncoder"]

_BASES = ("clip", "maskclip", "sclip", "clearclip")


@dataclass(frozen=True)
class TTRConfig:
    """Test-time registers.

    Attributes:
        neurons: ``((layer, neuron), ...)`` register neurons (a ``{layer: [neuron]}`` mapping
            is accepted); None finds the top ``top`` on each batch.
        num_registers: extra tokens appended (the release uses 1).
        normal: what the patch tokens get at the register neurons: ``"zero"`` (the
            release's default) or ``"mean"``.
        top: neurons used when they are found per batch (the release's ``top_k`` is 10).
        base: the method whose patch features are returned (its last block sees the
            registers too).
    """

    neurons: Any = None
    num_registers: int = 1
    normal: Literal["zero", "mean"] = "zero"
    top: int = 10
    base: str = "clip"

    def __post_init__(self) -> None:
        if self.neurons is not None:
            pairs = tuple((l, n) for l, ns in nr.neuron_map(self.neurons).items() for n in ns)
            object.__setattr__(self, "neurons", pairs)
        if int(self.num_registers) < 1:
            raise ValueError(f"num_registers must be >= 1, got {self.num_registers!r}.")
        if self.normal not in ("zero", "mean"):
            raise ValueError(f"normal must be 'zero' or 'mean', got {self.normal!r}.")
        if int(self.top) < 1:
            raise ValueError(f"top must be >= 1, got {self.top!r}.")
        if self.base not in _BASES:
            raise ValueError(f"base must be one of {_BASES}, got {self.base!r}.")


class TTREncoder(Encoder):
    """A base method's patch features with test-time registers (see the module doc)."""

    name = "ttr"

    def __init__(self, bundle: Any, config: TTRConfig | Mapping | None = None) -> None:
        super().__init__(bundle)
        if config is None:
            config = TTRConfig()
        if not isinstance(config, TTRConfig):
            raise TypeError(f"The 'ttr' encoder takes a TTRConfig (or None), got "
                            f"{type(config).__name__}.")
        self._config = config
        self.base = ENCODERS.get(config.base).value(bundle, None)

    def neurons(self, images: torch.Tensor) -> nr.NeuronMap:
        """The register neurons used for ``images``: the configured ones, or found on them."""
        cfg = self._config
        if cfg.neurons is not None:
            return nr.neuron_map(cfg.neurons)
        found = nr.outlier_sources(self.bundle, images)
        if found.n_used == 0:
            return {}
        return found.neuron_map(cfg.top)

    def registers_hooks(self, images: torch.Tensor) -> list:
        """The intervention hooks for ``images`` (empty when no register neuron is known)."""
        cfg = self._config
        found = self.neurons(images)
        if not found:
            return []
        return nr.ttr_hooks(self.bundle, found, num_registers=cfg.num_registers,
                            normal=cfg.normal)

    def encode_patches(self, images: torch.Tensor, fwd_hooks: FwdHooks = None) -> torch.Tensor:
        """images (B, 3, H, W) -> (B, N, D): the base method's patches, registers dropped."""
        hooks = self.hooks(fwd_hooks) + self.hooks(self.registers_hooks(images))
        return self.base.encode_patches(images, hooks)


register_encoder("ttr", TTREncoder, display="CLIP + test-time registers", config_type=TTRConfig,
                 citation="Jiang, Dravid et al., NeurIPS 2025",
                 doc="register neurons' activity moved onto extra tokens (test-time registers)")
