"""Configuration of the SFP encoder: one frozen dataclass with named presets.

Every number of the method (docs/design.md, "The SFP method") is a field of
:class:`SFPConfig`; the constructor's defaults are the **official** preset (the released
implementation). Presets are looked up by name with ``SFPConfig.preset(name)`` (the names:
:data:`PRESETS`):

- ``SFPConfig.official(**overrides)``: what the release computes (SOM at block L-1 only with
  ``cls_scale = 5 * res_cls`` and top-10, reference similarity, SAE as a mean of three
  softmaxes, HAI from summed hidden states).
- ``SFPConfig.paper(**overrides)``: the paper's equations 4-11 (SOM at every block with
  purified tokens propagating, SAE eq. 6-7, HAI eq. 8-11).
- ``SFPConfig.preset("release-2025-12")``: the code behind the release's only run log.
- ``SFPConfig.preset("sc-clip")``: SC-CLIP, the sibling release, on the same engine.

See ``docs/sfp_presets.md``.

Layer fields are 1-indexed block outputs (layer ``l`` = output of block ``l``) and default to
``None``: filled in for the model's depth by :meth:`SFPConfig.resolve`. The detect layer is
always L - 1 (the release runs SOM on the block before the last); the paper variants start at
layer 1 and stop at L - 1. The reference layer (9), post layer (4) and HAI range (4..10) follow
``layer_rule``:

- ``"release"`` (default): the release's absolute numbers at every depth (it indexes its list
  of hidden states with fixed positions), clamped to L - 1 for models shallower than 11 blocks,
  where the release itself cannot run;
- ``"scaled"``: the 12-block value ``l`` scaled to ``L`` blocks,

      derive(l) = min(max(floor(l * L / 12 + 0.5), 1), L - 1)

  (round half up, clamped to 1..L-1; block L itself is replaced by SAE, so no SFP layer can
  be L).

Explicit values win, and must lie in 1..L-1 (checked by ``resolve``).

Invalid values raise :class:`ConfigError` (a ``ValueError``) when the configuration is built,
except layer ranges, which need the depth and are checked by ``resolve``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sfp.core import outliers
from sfp.core.errors import SFPError
from sfp.core.registry import Registry, signature_defaults

__all__ = [
    "PRESETS",
    "REFERENCE_DEPTH",
    "RELEASE_RES_SCALE",
    "ConfigError",
    "ResolvedConfig",
    "SFPConfig",
    "derive_layer",
    "preset_templates",
]

#: Every named SFP preset (value: ``builder(**overrides) -> SFPConfig``); filled below.
PRESETS: Registry[Callable[..., SFPConfig]] = Registry("SFP preset")
#: The ``preset`` label of a configuration built field by field.
CUSTOM = "custom"
#: Depth the paper's / release's layer numbers refer to (ViT-B/16).
REFERENCE_DEPTH = 12
#: The release multiplies res_cls by this factor to get SOM's class-token scale (5 x 0.3).
RELEASE_RES_SCALE = 5.0

_SAE_VARIANTS = ("official", "paper")
_HAI_VARIANTS = ("official", "paper")
_HAI_ATTENTION = ("similarity", "sae")
_SAE_TERMS = ("q+k+sim", "q+k", "k+sim")
_LOGITS_FROM = ("thresholded", "cosine")
_LOF_VARIANTS = ("sc-clip", "standard")
_PAPER_SAE_VALUE = ("proj", "identity")
_PAPER_SAE_FORM = ("block", "eq7")
_LAYER_RULES = ("release", "scaled")
_PAPER_SAE_COMBINE = ("sum", "mean")
_FLAGS = ("som", "pre_aggregate", "post_aggregate", "sae", "hai", "paper_sae_ln1",
          "paper_sae_cls")
_CHOICES: dict[str, tuple[str, ...]] = {
    "lof_variant": _LOF_VARIANTS,
    "sae_variant": _SAE_VARIANTS,
    "paper_sae_value": _PAPER_SAE_VALUE,
    "paper_sae_form": _PAPER_SAE_FORM,
    "paper_sae_combine": _PAPER_SAE_COMBINE,
    "hai_variant": _HAI_VARIANTS,
    "hai_attention": _HAI_ATTENTION,
    "sae_terms": _SAE_TERMS,
    "logits_from": _LOGITS_FROM,
    "layer_rule": _LAYER_RULES,
}


def _gt0(v: float) -> bool:
    return v > 0


def _ge0(v: float) -> bool:
    return v >= 0


def _any(v: float) -> bool:
    return True


# field -> (lower test, upper test, wording) for the numeric fields.
_RANGES: dict[str, tuple[Callable[[float], bool], Callable[[float], bool], str]] = {
    "cls_scale": (_gt0, _any, "a finite number > 0"),
    "lof_contamination": (_gt0, lambda v: v <= 0.5, "in (0, 0.5]"),
    "sim_threshold": (_ge0, lambda v: v <= 1, "a cosine-similarity threshold in [0, 1]"),
    "sim_temperature": (_gt0, _any, "a finite number > 0"),
    "res_cls": (_ge0, _any, "a finite number >= 0"),
    "eps": (_gt0, _any, "a finite number > 0"),
    "omega": (_gt0, _any, "a finite number > 0"),
}

# 12-block layer numbers of the official preset.
_REF_LAYER_12 = 9
_POST_LAYER_12 = 4
_HAI_START_12 = 4
_HAI_STOP_12 = 10

# Defaults the config shares with the detectors (their signatures are the one home).
_SOM_DEFAULTS = signature_defaults(outliers.som)
_LOF_DEFAULTS = signature_defaults(outliers.lof)

_LAYER_FIELDS = ("detect_layer", "som_start", "ref_layer", "post_layer", "hai_start", "hai_stop")

# Values of the paper preset that differ from the official defaults.
_PAPER_VALUES: dict[str, Any] = {
    "top_k": None,
    "cls_scale": 1.0,
    "som_start": 1,
    "pre_aggregate": False,
    "post_aggregate": False,
    "sae_variant": "paper",
    "hai_variant": "paper",
}


# Values of the December 2025 release (the code of the run log) that differ from official.
_RELEASE_2025_12_VALUES: dict[str, Any] = {
    "pre_aggregate": False,
    "post_aggregate": False,
    "sae_terms": "q+k",
    "hai_attention": "sae",
    "hai_stop": 11,
}

# Values of SC-CLIP that differ from the official defaults.
_SC_CLIP_VALUES: dict[str, Any] = {
    "detector": "lof",
    "lof_neighbors": 30,
    "lof_contamination": 0.05,
    "lof_variant": "sc-clip",
    "sae_terms": "k+sim",
    "logits_from": "cosine",
    "hai_attention": "sae",
}


class ConfigError(SFPError, ValueError):
    """An SFP configuration value is invalid (or does not fit the model's depth)."""


def derive_layer(layer_12: int, num_layers: int) -> int:
    """Scale a 12-block layer number to a model with ``num_layers`` blocks.

    ``min(max(floor(layer_12 * L / 12 + 0.5), 1), L - 1)``; e.g. 9 -> 9 (L=12), 18 (L=24), 5
    (L=6). Needs ``num_layers >= 2``.
    """
    scaled = math.floor(layer_12 * num_layers / REFERENCE_DEPTH + 0.5)
    return min(max(scaled, 1), num_layers - 1)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ResolvedConfig:
    """An :class:`SFPConfig` with concrete layer numbers for a model of ``num_layers`` blocks.

    som_layers: the blocks whose outputs SOM purifies (ascending; empty when ``som`` is off),
    ``detect_layer`` is the last of them. hai_layers: the layers HAI integrates.
    """

    config: SFPConfig
    num_layers: int
    detect_layer: int
    som_layers: tuple[int, ...]
    ref_layer: int
    post_layer: int
    hai_layers: tuple[int, ...]

    @property
    def last_layer(self) -> int:
        """L - 1: the last block that runs unchanged; its output's patch tokens become X."""
        return self.num_layers - 1


@dataclass(frozen=True, repr=False)
class SFPConfig:
    """All settings of the SFP encoder (defaults: the official preset).

    Outlier mitigation (SOM, steps 2-3):
        som: switch; False = no detection, no mitigation anywhere.
        detector: registered detector name ("som", "l2", "lof", "norm_z", or one added with
            ``sfp.core.outliers.register_detector`` before the config is built).
        top_k: most outliers kept (som, l2); None = no limit (som only).
        cls_scale: SOM candidates satisfy cls_scale * A[cls, i] > A[i, i] (official 5 x res_cls
            = 1.5; paper eq. 4: 1.0).
        lof_neighbors, lof_contamination, lof_variant: parameters of the "lof" detector.
        detector_params: extra keyword arguments for the detector (override the above).
        detect_layer: the block whose output gives the final outlier set (None -> L-1).
        som_start: first block purified; SOM runs on every block som_start..detect_layer and
            each purified output is what the next block receives (None -> detect_layer: one
            layer, the official preset; the paper preset uses 1).
    Similarity (steps 4, 6):
        pre_aggregate: X <- rownorm(S_pre) X with S_pre from ref_layer (step 4).
        post_aggregate: X <- rownorm(S_post) X and Z <- rownorm(S_post) Z (steps 6-7).
        ref_layer: layer of S_pre (None -> 9); post_layer: of S_post (None -> 4).
        layer_rule: how unset ref/post/HAI layers follow the depth: "release" (the
            release's absolute 9 / 4 / 4..10 at any depth, clamped to L-1) or "scaled"
            (``derive_layer`` of those numbers).
        sim_threshold: cosine similarities below it are set to 0 (0.4).
        sim_temperature: M = sim_temperature * (S - mean(S)) (3.0).
        logits_from: the matrix S of M: "thresholded" (S_pre, the release) or "cosine" (the
            reference cosine matrix before thresholding, SC-CLIP).
        res_cls: lambda, weight of the class token added after SAE / in HAI (0.3).
        eps: added to row (and column) sums before dividing (1e-6).
    SAE (step 5):
        sae: switch; False = block L runs as a standard ViT block on [cls, X].
        sae_variant: "official" (a mean of softmaxes, ``sae_terms``; no MLP, no residual) or
            "paper" (eq. 6-7).
        sae_terms: the softmaxes the official SAE averages: "q+k+sim" (softmax(qq^T s),
            softmax(kk^T s), softmax(M); the release), "q+k" (the first two; the December
            2025 release) or "k+sim" (softmax(kk^T s) and softmax(M); SC-CLIP).
        omega: logit scale of the paper's SAE (0.5).
        paper_sae_ln1: paper SAE takes q, k, v from ln_1(X) (True) or from X.
        paper_sae_value: "proj": attention @ v, then out_proj; "identity": head-averaged
            attention applied to X itself.
        paper_sae_form: "block": X1 = X + attn; F = X1 + mlp(ln_2(X1)) (a standard block's two
            residuals); "eq7": F = X + mlp(ln_2(attn)) (eq. 7 read literally).
        paper_sae_combine: "+" of eq. 6: "sum" = softmax(omega (qq^T + kk^T) s) (one softmax
            of the summed logits, eq. 6 as printed); "mean" = (softmax(omega qq^T s) +
            softmax(omega kk^T s)) / 2 (the two attention maps added, as the supplement's
            Table 1 describes, rows renormalised).
        paper_sae_cls: the class token takes part in the paper SAE's attention.
    HAI (step 7):
        hai: switch; False = no HAI term (official) / F_vis = F_SAE (paper).
        hai_variant: "official" (Z from the summed hidden states, added to X) or "paper"
            (eq. 8-11: F_vis = A_HAI F_SAE).
        hai_start, hai_stop: inclusive layer range (None -> official 4..10 by ``layer_rule``;
            paper 1..L-1).
        hai_attention: official HAI's attention: "similarity" = softmax(M) (docs/design.md,
            "The SFP method"); "sae" = the SAE mixture (``sae_terms``) computed from P's own
            q and k (the December 2025 release, SC-CLIP).
        hai_iterations: paper HAI's passes of row-then-column normalisation (eq. 10: 1).
    preset_name: the preset the configuration was started from (a name of :data:`PRESETS`,
        or "custom").
    """

    # --- SOM -----------------------------------------------------------------------------
    som: bool = True
    detector: str = "som"
    top_k: int | None = _SOM_DEFAULTS["top_k"]
    cls_scale: float = RELEASE_RES_SCALE * 0.3
    lof_neighbors: int = _LOF_DEFAULTS["n_neighbors"]
    lof_contamination: float = _LOF_DEFAULTS["contamination"]
    lof_variant: str = _LOF_DEFAULTS["variant"]
    detector_params: Mapping[str, Any] = field(default_factory=dict)
    detect_layer: int | None = None
    som_start: int | None = None
    # --- similarity ----------------------------------------------------------------------
    pre_aggregate: bool = True
    post_aggregate: bool = True
    ref_layer: int | None = None
    post_layer: int | None = None
    layer_rule: str = "release"
    sim_threshold: float = 0.4
    sim_temperature: float = 3.0
    logits_from: str = "thresholded"
    res_cls: float = 0.3
    eps: float = 1e-6
    # --- SAE -----------------------------------------------------------------------------
    sae: bool = True
    sae_variant: str = "official"
    sae_terms: str = "q+k+sim"
    omega: float = 0.5
    paper_sae_ln1: bool = True
    paper_sae_value: str = "proj"
    paper_sae_form: str = "block"
    paper_sae_combine: str = "sum"
    paper_sae_cls: bool = False
    # --- HAI -----------------------------------------------------------------------------
    hai: bool = True
    hai_variant: str = "official"
    hai_start: int | None = None
    hai_stop: int | None = None
    hai_attention: str = "similarity"
    hai_iterations: int = 1
    # --- label ---------------------------------------------------------------------------
    preset_name: str = "official"

    # ---------------------------------------------------------------------------------------
    # presets
    # ---------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SFPConfig:
        """The preset ``name`` (one of :data:`PRESETS`, e.g. ``"official"``, ``"paper"``) with
        ``overrides`` applied. The one lookup of presets by name."""
        return PRESETS.get(name).value(**overrides)

    @classmethod
    def official(cls, **overrides: Any) -> SFPConfig:
        """``SFPConfig.preset("official", **overrides)``: the released implementation."""
        return cls.preset("official", **overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> SFPConfig:
        """``SFPConfig.preset("paper", **overrides)``: the paper's equations (4-11)."""
        return cls.preset("paper", **overrides)

    @classmethod
    def _build(cls, values: dict[str, Any]) -> SFPConfig:
        _check_keys(values)
        return cls(**values)

    # ---------------------------------------------------------------------------------------
    # validation
    # ---------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        # detector_params: store a plain dict copy (the dataclass stays frozen).
        if not isinstance(self.detector_params, Mapping):
            raise ConfigError(
                f"detector_params must be a mapping of keyword arguments, got "
                f"{type(self.detector_params).__name__}"
            )
        object.__setattr__(self, "detector_params", dict(self.detector_params))
        if self.preset_name != CUSTOM and self.preset_name not in PRESETS:
            raise ConfigError(f"preset_name must be one of "
                              f"{', '.join(map(repr, PRESETS.names()))} or {CUSTOM!r}; got "
                              f"{self.preset_name!r}")
        self._validate_fields()
        self._validate_detector()
        self._validate_layers()

    def _validate_fields(self) -> None:
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
                )
        for name, (low, high, what) in _RANGES.items():
            v = getattr(self, name)
            if not _is_number(v) or not low(v) or not high(v):
                raise ConfigError(f"{name} must be {what}, got {v!r}")
        for name in ("lof_neighbors", "hai_iterations"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")

    def _validate_detector(self) -> None:
        if not isinstance(self.detector, str):
            raise ConfigError(f"detector must be a detector name (str), got {self.detector!r}")
        if self.detector not in outliers.DETECTORS:
            names = outliers.available_detectors()
            close = difflib.get_close_matches(self.detector, names, n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"unknown detector {self.detector!r}; registered: {', '.join(names)}.{hint} "
                "Register custom detectors with sfp.core.outliers.register_detector before "
                "building the config."
            )
        if self.top_k is None:
            if self.detector == "l2":
                raise ConfigError(
                    "top_k=None (no limit) only works with detector 'som'; 'l2' needs an int"
                )
        elif not _is_int(self.top_k) or self.top_k < 1:
            raise ConfigError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")

    def _validate_layers(self) -> None:
        for name in _LAYER_FIELDS:
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigError(f"{name} must be a layer number >= 1 (1-indexed block output) "
                                  f"or None, got {v!r}")
        if self.hai_start is not None and self.hai_stop is not None:
            if self.hai_start > self.hai_stop:
                raise ConfigError(f"HAI layer range is reversed: hai_start={self.hai_start} > "
                                  f"hai_stop={self.hai_stop}")
        if self.som_start is not None and self.detect_layer is not None:
            if self.som_start > self.detect_layer:
                raise ConfigError(
                    f"som_start={self.som_start} is after detect_layer={self.detect_layer}; "
                    "SOM runs on blocks som_start..detect_layer"
                )

    # ---------------------------------------------------------------------------------------
    # detector
    # ---------------------------------------------------------------------------------------

    def detector_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the configured detector (``detector_params`` win)."""
        builtin: dict[str, dict[str, Any]] = {
            "som": {"top_k": self.top_k, "cls_scale": self.cls_scale},
            "l2": {"top_k": self.top_k},
            "lof": {
                "n_neighbors": self.lof_neighbors,
                "contamination": self.lof_contamination,
                "variant": self.lof_variant,
            },
        }
        return {**builtin.get(self.detector, {}), **self.detector_params}

    # ---------------------------------------------------------------------------------------
    # layers
    # ---------------------------------------------------------------------------------------

    def resolve(self, num_layers: int) -> ResolvedConfig:
        """Concrete layer numbers for a model with ``num_layers`` blocks (see module doc).

        Raises ConfigError when the depth is below 2 or an explicit layer is outside 1..L-1.
        """
        if not _is_int(num_layers) or num_layers < 2:
            raise ConfigError(
                f"SFP needs a ViT with at least 2 blocks (block L is replaced by SAE), got "
                f"num_layers={num_layers!r}"
            )
        last = num_layers - 1

        def pick(name: str, derived: int) -> int:
            value = getattr(self, name)
            if value is None:
                return derived
            if value > last:
                raise ConfigError(
                    f"{name}={value} is out of range for a {num_layers}-block model: SFP layers "
                    f"must be in 1..{last} (block {num_layers} is replaced by SAE)"
                )
            return int(value)

        detect = pick("detect_layer", last)
        som_start = pick("som_start", detect)
        if som_start > detect:
            raise ConfigError(
                f"som_start={som_start} is after the detect layer {detect} for a "
                f"{num_layers}-block model"
            )
        def depth_rule(layer_12: int) -> int:
            if self.layer_rule == "scaled":
                return derive_layer(layer_12, num_layers)
            return min(layer_12, last)

        if self.hai_variant == "paper":
            hai_start = pick("hai_start", 1)
            hai_stop = pick("hai_stop", last)
        else:
            hai_start = pick("hai_start", depth_rule(_HAI_START_12))
            hai_stop = pick("hai_stop", depth_rule(_HAI_STOP_12))
        if hai_start > hai_stop:
            raise ConfigError(
                f"HAI layer range {hai_start}..{hai_stop} is reversed for a {num_layers}-block "
                "model; set hai_start and hai_stop explicitly"
            )
        return ResolvedConfig(
            config=self,
            num_layers=num_layers,
            detect_layer=detect,
            som_layers=tuple(range(som_start, detect + 1)) if self.som else (),
            ref_layer=pick("ref_layer", depth_rule(_REF_LAYER_12)),
            post_layer=pick("post_layer", depth_rule(_POST_LAYER_12)),
            hai_layers=tuple(range(hai_start, hai_stop + 1)),
        )

    # ---------------------------------------------------------------------------------------
    # serialisation
    # ---------------------------------------------------------------------------------------

    def replace(self, **changes: Any) -> SFPConfig:
        """A copy with ``changes`` applied (validated like a new config)."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-friendly); ``from_dict`` inverts it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["detector_params"] = dict(self.detector_params)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SFPConfig:
        """Build from a (possibly partial) dict of fields; missing fields take the preset's
        values (``data["preset_name"]``, default official; ``"preset"`` is read too)."""
        values = dict(data)
        _check_keys({k: v for k, v in values.items() if k != "preset"})
        preset = values.pop("preset_name", values.pop("preset", "official"))
        if preset in PRESETS:
            return cls.preset(preset, **values)
        return cls._build({"preset_name": preset, **values})

    def _base(self) -> SFPConfig:
        if self.preset_name == CUSTOM:
            return SFPConfig(preset_name=CUSTOM)
        return SFPConfig.preset(self.preset_name)

    def overrides(self) -> dict[str, Any]:
        """Fields that differ from this configuration's preset."""
        base = self._base()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "preset_name" and getattr(self, f.name) != getattr(base, f.name)
        }

    def to_code(self) -> str:
        """A constructor call that rebuilds this configuration, listing only the fields that
        differ from its preset, e.g. ``SFPConfig.official(top_k=5)``."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.overrides().items())
        if self.preset_name in ("official", "paper"):
            return f"SFPConfig.{self.preset_name}({args})"
        if self.preset_name != CUSTOM:
            return f"SFPConfig.preset({self.preset_name!r}{', ' if args else ''}{args})"
        return f"SFPConfig(preset_name='custom'{', ' if args else ''}{args})"

    def __repr__(self) -> str:
        return self.to_code()

    def __hash__(self) -> int:
        return hash(self.to_code())


def _check_keys(values: Mapping[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(SFPConfig)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"SFPConfig has no field {key!r}.{hint}")


# ------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------


def _official(**overrides: Any) -> SFPConfig:
    """The released implementation's settings, with ``overrides`` applied.

    As in the release, SOM's class-token scale follows res_cls: overriding ``res_cls``
    alone sets ``cls_scale = 5 * res_cls``; give ``cls_scale`` to decouple them.
    """
    values: dict[str, Any] = {"preset_name": "official"}
    if "res_cls" in overrides and "cls_scale" not in overrides:
        res_cls = overrides["res_cls"]
        if _is_number(res_cls):
            values["cls_scale"] = RELEASE_RES_SCALE * res_cls
    values.update(overrides)
    return SFPConfig._build(values)


def _release_2025_12(**overrides: Any) -> SFPConfig:
    """The code behind the release's only run log (its VOC21 61.4 mIoU), with ``overrides``.

    SOM as in the official preset; no reference / post similarity; SAE = (softmax(qq^T s) +
    softmax(kk^T s)) / 2; P = h_4 + ... + h_11 (block outputs before mitigation) with the same
    two-softmax attention. Queries: the template set ``"sfp15"``.
    """
    return _official(**{**_RELEASE_2025_12_VALUES, **overrides, "preset_name": "release-2025-12"})


def _sc_clip(**overrides: Any) -> SFPConfig:
    """SC-CLIP's forward (the sibling release), with ``overrides`` applied.

    LOF (k 30, contamination 0.05) on h_{L-1}; S_pre from h_9; SAE = (softmax(M) +
    softmax(kk^T s)) / 2 with M from the unthresholded cosine matrix; S_post from h_4; HAI over
    h_4..h_10 with the same attention.
    """
    return SFPConfig._build({**_SC_CLIP_VALUES, **overrides, "preset_name": "sc-clip"})


def _paper(**overrides: Any) -> SFPConfig:
    """The paper's equations (4-11), with ``overrides`` applied; see docs/sfp_presets.md."""
    return SFPConfig._build({"preset_name": "paper", **_PAPER_VALUES, **overrides})


PRESETS.register(
    "official", _official, display="SFP (official)",
    doc="the current SFP release: SOM at block L-1 (1.5 r > s, top 10), SAE as a mean of three "
        "softmaxes, HAI from summed hidden states",
)
PRESETS.register(
    "release-2025-12", _release_2025_12, display="SFP (release 2025-12)", templates="sfp15",
    doc="the code of the release's only run log (VOC21 61.4 mIoU): SOM at block L-1, SAE as a "
        "mean of softmax(qq^T) and softmax(kk^T), HAI over h_4..h_11, no similarity steps, "
        "15 templates",
)
PRESETS.register(
    "sc-clip", _sc_clip, display="SC-CLIP",
    doc="SC-CLIP (the sibling release): LOF outliers, SAE as a mean of softmax(M) and "
        "softmax(kk^T) with M from the unthresholded similarity, HAI with the same attention",
)
PRESETS.register(
    "paper", _paper, display="SFP (paper)",
    doc="the paper's equations 4-11: SOM at every block, SAE eq. 6-7, HAI eq. 8-11",
)


def preset_templates(config: Any) -> str | None:
    """The prompt template set an SFP preset was released with (its registry entry's
    ``templates``, e.g. ``"sfp15"`` for ``"release-2025-12"``), or None when it names none.

    config: a preset name, an :class:`SFPConfig` (its ``preset_name``) or None.
    """
    name = config if isinstance(config, str) else getattr(config, "preset_name", None)
    if not isinstance(name, str) or name not in PRESETS:
        return None
    return PRESETS.get(name).meta.get("templates")
