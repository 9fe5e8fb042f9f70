"""The on-disk text-query cache: keys (weights, templates, names), location, switches."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_bundle

import sfp.models.text as text
from sfp.models.loading import bundle_from_model
from sfp.models.text import embed_names, text_cache_dir, text_fingerprint

T1 = ["a photo of a {}."]
T2 = ["a photo of a {}.", "a drawing of a {}."]
NAMES = ["cat", "dog", "grass"]


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(text.TEXT_CACHE_ENV, str(tmp_path / "c"))
    return tmp_path / "c"


def _fresh(bundle):
    """Same weights, a new model object (empty in-memory cache), as a second run has."""
    return bundle_from_model(copy.deepcopy(bundle.model), name=bundle.name, pretrained="random")


def _count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = text._encode_text

    def counting(model, tokens):
        calls.append(tokens.shape[0])
        return real(model, tokens)

    monkeypatch.setattr(text, "_encode_text", counting)
    return calls


def test_second_run_reads_disk(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = make_tiny_bundle(layers=2, seed=1)
    calls = _count_encodes(monkeypatch)
    first = embed_names(b, NAMES, T2)
    assert sum(calls) == len(NAMES) * len(T2)
    assert len(list(cache.rglob("*.pt"))) == 1
    calls.clear()
    second = embed_names(_fresh(b), NAMES, T2)
    assert calls == []  # the text encoder did not run
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    # a new name is embedded alone and merged into the same file
    embed_names(_fresh(b), ["tree", "cat"], T2)
    assert sum(calls) == len(T2)
    assert len(list(cache.rglob("*.pt"))) == 1


def test_keys_weights_and_templates(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = make_tiny_bundle(layers=2, seed=1)
    embed_names(b, NAMES, T1)
    calls = _count_encodes(monkeypatch)
    embed_names(_fresh(b), NAMES, T2)  # other templates: recomputed, another file
    assert sum(calls) == len(NAMES) * len(T2)
    assert len(list(cache.rglob("*.pt"))) == 2
    other = _fresh(b)
    with torch.no_grad():
        other.model.text_projection.add_(torch.randn_like(other.model.text_projection))
    # other text weights: another fingerprint
    assert text_fingerprint(other.model) != text_fingerprint(b.model)
    calls.clear()
    got = embed_names(other, NAMES, T1)
    assert sum(calls) == len(NAMES)
    assert not torch.allclose(got, embed_names(b, NAMES, T1))
    # the visual tower does not enter the key
    vis = _fresh(b)
    with torch.no_grad():
        vis.model.visual.conv1.weight.mul_(2)
    assert text_fingerprint(vis.model) == text_fingerprint(b.model)


def test_no_cache_and_off(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = make_tiny_bundle(layers=2, seed=2)
    embed_names(b, NAMES, T1, cache=False)
    assert not cache.exists()
    monkeypatch.setenv(text.TEXT_CACHE_ENV, "off")
    assert text_cache_dir() is None
    embed_names(_fresh(b), NAMES, T1)
    assert not cache.exists()


def test_default_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(text.TEXT_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert text_cache_dir() == tmp_path / "sfp" / "text"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert text_cache_dir() == Path.home() / ".cache" / "sfp" / "text"


def test_broken_file_is_recomputed(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = make_tiny_bundle(layers=2, seed=3)
    want = embed_names(b, NAMES, T1)
    (path,) = cache.rglob("*.pt")
    path.write_bytes(b"not a torch file")
    calls = _count_encodes(monkeypatch)
    got = embed_names(_fresh(b), NAMES, T1)
    assert sum(calls) == len(NAMES)
    torch.testing.assert_close(got, want)


def test_segmenter_and_cli_switch(cache: Path) -> None:
    from sfp.cli.common import add_segmenter_arguments, segmenter_overrides
    from sfp.seg.pipeline import Segmenter

    b = make_tiny_bundle(layers=2, seed=4)
    seg = Segmenter(b, "cat; dog", method="clip", templates=T1, text_cache=False)
    assert seg.queries.embeddings.shape[0] == 2 and not cache.exists()
    p = argparse.ArgumentParser()
    add_segmenter_arguments(p)
    assert segmenter_overrides(p.parse_args(["--no-cache"]))["text_cache"] is False
    assert segmenter_overrides(p.parse_args([]))["text_cache"] is True
