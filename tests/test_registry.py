"""The one registry mechanism: names, metadata, errors, snapshots; the tables built on it."""

from __future__ import annotations

import pytest

from sfp.core.errors import RegistryError
from sfp.core.outliers import DETECTORS, register_detector, som
from sfp.core.registry import Param, Registry, signature_defaults


def _fn(x, top_k: int = 7, *, scale: float = 0.5, has_cls: bool = True):
    return x


def test_names_are_matched_loosely_and_kept_in_order():
    r: Registry[int] = Registry("thing")
    r.register("Sc-Clip", 1, display="SC-CLIP", doc="d", params=(Param("k", 3),), flavour="x")
    r.register("other", 2)
    assert r.names() == ("Sc-Clip", "other") and len(r) == 2
    for spelling in ("sc-clip", "SC_CLIP", " sc_clip "):
        assert spelling in r and r.get(spelling).value == 1
    e = r.get("sc-clip")
    assert (e.display, e.doc, e.defaults(), e["flavour"]) == ("SC-CLIP", "d", {"k": 3}, "x")
    assert r.get("other").display == "other"
    with pytest.raises(RegistryError, match="has no parameter 'q'.*parameters: k"):
        e.param("q")


def test_errors_name_the_registered_entries():
    r: Registry[int] = Registry("widget kind")
    r.register("alpha", 1)
    r.register("beta", 2)
    with pytest.raises(RegistryError, match=r"unknown widget kind 'alpah'\. Did you mean 'alpha'"):
        r.get("alpah")
    with pytest.raises(RegistryError, match="Registered: alpha, beta"):
        r.get("zzz")
    with pytest.raises(RegistryError, match="already registered"):
        r.register("ALPHA", 3)
    r.register("alpha", 3, overwrite=True)
    assert r.get("alpha").value == 3
    with pytest.raises(RegistryError, match="must not be empty"):
        r.register("  ", 4)
    with pytest.raises(TypeError, match="named by a string"):
        r.get(3)  # type: ignore[arg-type]


def test_snapshot_and_restore():
    r: Registry[int] = Registry("thing")
    r.register("a", 1)
    snap = r.snapshot()
    r.register("b", 2)
    r.restore(snap)
    assert r.names() == ("a",)


def test_signature_defaults_skip_the_input():
    assert signature_defaults(_fn) == {"top_k": 7, "scale": 0.5, "has_cls": True}
    assert signature_defaults(som) == {"top_k": 10, "cls_scale": 1.5}


def test_detector_params_come_from_the_signature_with_ranges():
    det = register_detector("tmp", _fn, ranges={"top_k": {"low": 1, "high": 9, "step": 1}})
    assert det.defaults() == {"top_k": 7, "scale": 0.5}  # has_cls is not a tunable parameter
    p = DETECTORS.get("tmp").param("top_k")
    assert (p.default, p.low, p.high, p.step) == (7, 1, 9, 1)
    assert DETECTORS.get("som").param("cls_scale").default == 1.5
    assert DETECTORS.get("lof").param("variant").choices == ("sc-clip", "standard")
