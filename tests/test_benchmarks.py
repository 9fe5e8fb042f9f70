"""The benchmark table against the values of the released configs, and its overrides."""

from __future__ import annotations

import dataclasses

import pytest

from sfp.seg.benchmarks import file_benchmarks, get_benchmark, model_key
from sfp.seg.pipeline import Segmenter

SIMPLE = ["a photo of a {}."]

# (short side, logit scale, prob thd, area thd) as written in Kimsure/SFP
# SFP_ICCV/configs/cfg_*.py (commit 2804f5b); defaults of SFP_segmentor: 40, 0.0, None.
RELEASED = {
    "voc21": (336, 50.0, 0.15, 0.1),
    "voc20": (336, 40.0, 0.0, None),
    "context60": (336, 40.0, 0.15, None),
    "context59": (336, 40.0, 0.0, None),
    "coco_object": (336, 55.0, 0.35, None),
    "coco_stuff164k": (336, 40.0, 0.0, None),
    "cityscapes": (560, 40.0, 0.0, None),
    "ade20k": (384, 40.0, 0.0, None),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_settings_match_released_configs(name: str) -> None:
    st = get_benchmark(name).settings_for("sfp", "ViT-B-16")
    assert (st.short_side, st.logit_scale, st.prob_thd, st.area_thd) == RELEASED[name]
    assert (st.crop, st.stride, st.max_long_side) == (224, 112, 2048)
    assert "SFP_ICCV/configs/cfg_" in get_benchmark(name).source


def test_vit_l_thresholds_from_config_comments() -> None:
    for model in ("ViT-L-14", "ViT-L/14", "ViT-L-14-quickgelu"):
        assert get_benchmark("voc21").settings_for("sfp", model).prob_thd == 0.2
        assert get_benchmark("coco_object").settings_for("sfp", model).prob_thd == 0.25
    # only the threshold changes; other benchmarks and models keep theirs
    voc_l = get_benchmark("voc21").settings_for("sfp", "ViT-L-14")
    assert (voc_l.logit_scale, voc_l.area_thd, voc_l.short_side) == (50.0, 0.1, 336)
    assert get_benchmark("context60").settings_for("sfp", "ViT-L-14").prob_thd == 0.15
    assert get_benchmark("voc21").settings_for("sfp", "ViT-B-16").prob_thd == 0.15
    assert get_benchmark("voc21").settings_for("sfp", "ViT-L-14-336").prob_thd == 0.15
    assert model_key("ViT-L/14") == "ViT-L-14"


def test_method_overrides_sc_clip_ade() -> None:
    ade = get_benchmark("ade20k")
    assert ade.settings_for("sfp").short_side == 384
    assert ade.settings_for("sc-clip").short_side == 336
    assert ade.settings_for("SC_CLIP").short_side == 336
    assert ade.settings_for(None).short_side == 384
    assert all(get_benchmark(n).settings_for("sc-clip").short_side == RELEASED[n][0]
               for n in file_benchmarks() if n != "ade20k")


def test_for_benchmark_uses_method_and_model(tiny_vit) -> None:
    seg = Segmenter.for_benchmark(tiny_vit, "ade20k", method="clip", templates=SIMPLE)
    assert seg.short_side == 384
    # method keys are looked up by name; an encoder instance by its .name
    seg2 = Segmenter.for_benchmark(tiny_vit, "ade20k", method=seg.encoder, templates=SIMPLE)
    assert seg2.short_side == 384
    seg.encoder.name = "sc-clip"
    try:
        seg3 = Segmenter.for_benchmark(tiny_vit, "ade20k", method=seg.encoder, templates=SIMPLE)
    finally:
        seg.encoder.name = "clip"
    assert seg3.short_side == 336
    large = dataclasses.replace(tiny_vit, name="ViT-L-14")
    seg4 = Segmenter.for_benchmark(large, "voc21", method="clip", templates=SIMPLE)
    assert (seg4.prob_thd, seg4.logit_scale) == (0.2, 50.0)
    # explicit overrides still win
    seg5 = Segmenter.for_benchmark(large, "voc21", method="clip", templates=SIMPLE,
                                   prob_thd=0.5)
    assert seg5.prob_thd == 0.5
