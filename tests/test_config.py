"""Tests of sfp.methods.config: presets, derived layers, validation, serialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sfp.core import outliers
from sfp.methods.config import ConfigError, SFPConfig, derive_layer


def test_official_preset_holds_the_release_numbers() -> None:
    cfg = SFPConfig.official()
    assert cfg == SFPConfig()
    assert cfg.preset_name == "official"
    assert (cfg.detector, cfg.top_k, cfg.cls_scale) == ("som", 10, 1.5)
    assert (cfg.sim_threshold, cfg.res_cls, cfg.sim_temperature) == (0.4, 0.3, 3.0)
    assert cfg.pre_aggregate and cfg.post_aggregate and cfg.som and cfg.sae and cfg.hai
    r = cfg.resolve(12)
    assert r.detect_layer == 11
    assert r.som_layers == (11,)
    assert (r.ref_layer, r.post_layer) == (9, 4)
    assert r.hai_layers == (4, 5, 6, 7, 8, 9, 10)


def test_paper_preset() -> None:
    cfg = SFPConfig.paper()
    assert cfg.preset_name == "paper"
    assert (cfg.top_k, cfg.cls_scale, cfg.omega, cfg.hai_iterations) == (None, 1.0, 0.5, 1)
    assert (cfg.sae_variant, cfg.hai_variant) == ("paper", "paper")
    assert not cfg.pre_aggregate and not cfg.post_aggregate
    r = cfg.resolve(12)
    assert r.som_layers == tuple(range(1, 12))
    assert r.hai_layers == tuple(range(1, 12))
    r24 = cfg.resolve(24)
    assert r24.som_layers == tuple(range(1, 24)) and r24.hai_layers == tuple(range(1, 24))


def test_official_cls_scale_follows_res_cls_like_the_release() -> None:
    assert SFPConfig.official(res_cls=0.2).cls_scale == pytest.approx(1.0)
    assert SFPConfig.official(res_cls=0.2, cls_scale=2.0).cls_scale == 2.0
    assert SFPConfig(res_cls=0.2).cls_scale == 1.5  # the plain constructor does not couple


@pytest.mark.parametrize(
    "depth, expected",
    [
        (12, (11, 9, 4, 4, 10)),
        (24, (23, 18, 8, 8, 20)),
        (32, (31, 24, 11, 11, 27)),
        (6, (5, 5, 2, 2, 5)),
        (2, (1, 1, 1, 1, 1)),
    ],
)
def test_layers_derived_from_depth(depth: int, expected: tuple[int, ...]) -> None:
    r = SFPConfig.official(layer_rule="scaled").resolve(depth)
    got = (r.detect_layer, r.ref_layer, r.post_layer, r.hai_layers[0], r.hai_layers[-1])
    assert got == expected


def test_derive_layer_is_identity_at_12_and_rounds_half_up() -> None:
    assert [derive_layer(l, 12) for l in range(1, 12)] == list(range(1, 12))
    assert derive_layer(9, 6) == 5  # 4.5 rounds up, not to even
    assert derive_layer(3, 6) == 2  # 1.5 -> 2
    assert derive_layer(1, 4) == 1  # 0.33 clamps to 1
    assert derive_layer(12, 12) == 11  # clamps to L - 1


def test_explicit_layers_win() -> None:
    r = SFPConfig.official(ref_layer=3, post_layer=2, hai_start=1, hai_stop=5,
                           detect_layer=4).resolve(6)
    assert (r.ref_layer, r.post_layer, r.hai_layers, r.detect_layer) == (3, 2, (1, 2, 3, 4, 5), 4)
    assert r.som_layers == (4,)
    r = SFPConfig.official(som_start=2).resolve(12)
    assert r.som_layers == tuple(range(2, 12))
    assert SFPConfig.official(som=False).resolve(12).som_layers == ()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sim_threshold": -0.1}, "sim_threshold"),
        ({"sim_threshold": 1.5}, "sim_threshold"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": None, "detector": "l2"}, "top_k=None"),
        ({"detector": "lofx"}, "unknown detector 'lofx'"),
        ({"preset_name": "best"}, "preset_name"),
        ({"hai_start": 8, "hai_stop": 4}, "reversed"),
        ({"som_start": 9, "detect_layer": 5}, "som_start"),
        ({"ref_layer": 0}, "ref_layer"),
        ({"post_layer": -1}, "post_layer"),
        ({"res_cls": -0.3}, "res_cls"),
        ({"cls_scale": 0.0}, "cls_scale"),
        ({"sim_temperature": 0}, "sim_temperature"),
        ({"omega": -1.0}, "omega"),
        ({"eps": 0.0}, "eps"),
        ({"lof_neighbors": 0}, "lof_neighbors"),
        ({"lof_contamination": 0.7}, "lof_contamination"),
        ({"lof_variant": "sklearn"}, "lof_variant"),
        ({"sae_variant": "nope"}, "sae_variant"),
        ({"hai_variant": "nope"}, "hai_variant"),
        ({"hai_attention": "qk"}, "hai_attention"),
        ({"hai_iterations": 0}, "hai_iterations"),
        ({"paper_sae_form": "x"}, "paper_sae_form"),
        ({"paper_sae_value": "x"}, "paper_sae_value"),
        ({"som": "yes"}, "som"),
        ({"sim_threshold": float("nan")}, "sim_threshold"),
        ({"detector_params": [1, 2]}, "detector_params"),
    ],
)
def test_invalid_values_raise_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SFPConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_unknown_field_raises_config_error_with_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean 'top_k'|Did you mean 'top_k'"):
        SFPConfig.official(topk=5)
    with pytest.raises(ConfigError, match="no field"):
        SFPConfig.paper(foo=1)
    with pytest.raises(ConfigError, match="no field"):
        SFPConfig.from_dict({"bar": 1})


@pytest.mark.parametrize(
    "kwargs, depth, message",
    [
        ({"ref_layer": 12}, 12, "ref_layer=12 is out of range for a 12-block model"),
        ({"detect_layer": 6}, 6, "detect_layer=6"),
        ({"hai_stop": 9}, 6, "hai_stop=9"),
        ({"post_layer": 7}, 6, "post_layer=7"),
        ({"som_start": 8}, 6, "som_start=8"),
        ({"hai_start": 11}, 12, "reversed"),  # explicit start after the derived stop (10)
        ({}, 1, "at least 2 blocks"),
    ],
)
def test_layer_out_of_range_raises_at_resolve(kwargs: dict, depth: int, message: str) -> None:
    cfg = SFPConfig.official(**kwargs)
    with pytest.raises(ConfigError, match=message):
        cfg.resolve(depth)


def test_frozen_and_hashable() -> None:
    cfg = SFPConfig.official()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3  # type: ignore[misc]
    assert hash(cfg) == hash(SFPConfig.official())
    assert len({cfg, SFPConfig.official(), SFPConfig.paper()}) == 2


@pytest.mark.parametrize(
    "cfg",
    [
        SFPConfig.official(),
        SFPConfig.paper(),
        SFPConfig.official(top_k=5, detector="lof", lof_variant="standard"),
        SFPConfig.official(res_cls=0.25, hai=False, ref_layer=8),
        SFPConfig.paper(omega=0.7, som_start=3, paper_sae_form="eq7", hai_iterations=3),
        SFPConfig(preset_name="custom", sae_variant="paper", hai_attention="sae"),
        SFPConfig.official(detector_params={"cls_scale": 2.0}),
    ],
)
def test_to_code_and_dict_round_trip(cfg: SFPConfig) -> None:
    code = cfg.to_code()
    assert repr(cfg) == code
    assert eval(code, {"SFPConfig": SFPConfig}) == cfg
    d = cfg.to_dict()
    json.dumps(d)  # plain values only
    assert SFPConfig.from_dict(d) == cfg
    assert SFPConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_to_code_lists_only_non_default_fields() -> None:
    assert SFPConfig.official().to_code() == "SFPConfig.official()"
    assert SFPConfig.paper().to_code() == "SFPConfig.paper()"
    assert SFPConfig.official(top_k=5).to_code() == "SFPConfig.official(top_k=5)"
    assert SFPConfig.paper(omega=0.7).to_code() == "SFPConfig.paper(omega=0.7)"
    assert SFPConfig.official(top_k=5).overrides() == {"top_k": 5}
    assert SFPConfig(preset_name="custom").to_code() == "SFPConfig(preset_name='custom')"


def test_from_dict_partial_uses_the_preset() -> None:
    assert SFPConfig.from_dict({"preset": "paper", "omega": 0.9}) == SFPConfig.paper(omega=0.9)
    assert SFPConfig.from_dict({"top_k": 3}) == SFPConfig.official(top_k=3)


def test_replace_validates() -> None:
    cfg = SFPConfig.official()
    assert cfg.replace(top_k=3).top_k == 3
    with pytest.raises(ConfigError):
        cfg.replace(top_k=-1)
    with pytest.raises(ConfigError, match="no field"):
        cfg.replace(topk=3)


def test_detector_kwargs() -> None:
    assert SFPConfig.official().detector_kwargs() == {"top_k": 10, "cls_scale": 1.5}
    assert SFPConfig.official(detector="l2", top_k=4).detector_kwargs() == {"top_k": 4}
    assert SFPConfig.official(detector="lof", lof_neighbors=5).detector_kwargs() == {
        "n_neighbors": 5, "contamination": 0.05, "variant": "sc-clip"
    }
    assert SFPConfig.official(detector="norm_z", detector_params={"threshold": 2.0}
                              ).detector_kwargs() == {"threshold": 2.0}
    assert SFPConfig.paper().detector_kwargs() == {"top_k": None, "cls_scale": 1.0}


def test_custom_registered_detector_is_accepted() -> None:
    def first_patch(hidden: torch.Tensor) -> outliers.OutlierResult:
        mask = torch.zeros(hidden.shape[0], hidden.shape[1] - 1, dtype=torch.bool)
        mask[:, 0] = True
        return outliers.OutlierResult(scores=mask.float(), mask=mask)

    outliers.register_detector("test-config-first", first_patch, needs="hidden", overwrite=True)
    cfg = SFPConfig.official(detector="test-config-first")
    assert cfg.detector_kwargs() == {}
    assert "detector='test-config-first'" in cfg.to_code()
