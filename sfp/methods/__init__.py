"""Dense methods: the encoders, SFP's configuration and presets, the stage ladder.

- :mod:`~sfp.methods.base` — the encoder contract and ``ENCODERS``;
  :mod:`~sfp.methods.encoders` — ``make_encoder``;
- :mod:`~sfp.methods.attention` — attention variants (pure functions);
- :mod:`~sfp.methods.baselines` — CLIP, MaskCLIP, SCLIP, ClearCLIP, NACLIP;
- :mod:`~sfp.methods.config` — ``SFPConfig``, ``PRESETS``; :mod:`~sfp.methods.purify` — SFP;
- :mod:`~sfp.methods.registers` — test-time registers (``"ttr"``);
- :mod:`~sfp.methods.stages` — the stage ladder (CLIP, +SOM, +SOM+SAE, SFP).
"""

from sfp._lazy import attach

__getattr__, __dir__ = attach(
    __name__, ("attention", "base", "baselines", "config", "encoders", "purify", "registers",
              "stages")
)
