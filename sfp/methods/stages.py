"""The stage ladder: SFP's stages switched on one at a time, named once.

Used by the stage-ablation figure (paper Fig. 3, :mod:`sfp.viz.figures.ablation`) and the
``StageComparison`` widget alike, so a column and a panel with the same name show the same
thing. From a full SFP configuration ``base`` (default ``SFPConfig.official()``):

=============  =========  ==============================================================
stage          method     what it switches off in ``base``
=============  =========  ==============================================================
``CLIP``       clip       everything (plain CLIP patch tokens)
``+SOM``       sfp        SAE, HAI and both similarity aggregations (outliers of block L-1
                          mitigated, then the standard block L)
``+SOM+SAE``   sfp        HAI (SOM, reference/post similarity aggregation and the attention
                          enhancer in place of block L)
``SFP``        sfp        nothing (the full configuration)
=============  =========  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from sfp.methods.config import SFPConfig

__all__ = ["STAGES", "Stage", "stage_ladder"]


@dataclass(frozen=True)
class Stage:
    """One rung: ``name``, the encoder ``method`` and the SFP switches it turns off."""

    name: str
    method: str
    off: tuple[str, ...] = ()

    def config(self, base: SFPConfig) -> SFPConfig | None:
        """This stage's configuration derived from ``base`` (None for non-SFP stages)."""
        if self.method != "sfp":
            return None
        return base.replace(**dict.fromkeys(self.off, False)) if self.off else base


#: The ladder, in order.
STAGES: tuple[Stage, ...] = (
    Stage("CLIP", "clip"),
    Stage("+SOM", "sfp", ("sae", "hai", "pre_aggregate", "post_aggregate")),
    Stage("+SOM+SAE", "sfp", ("hai",)),
    Stage("SFP", "sfp"),
)


def stage_ladder(config: SFPConfig | str | None = None) -> list[tuple[str, str, SFPConfig | None]]:
    """``[(stage name, method, config), ...]`` of :data:`STAGES` for the full configuration
    ``config`` (an SFPConfig or a preset name; default official)."""
    base = SFPConfig.official() if config is None else config
    if isinstance(base, str):
        base = SFPConfig.preset(base)
    return [(s.name, s.method, s.config(base)) for s in STAGES]
