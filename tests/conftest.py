"""Shared fixtures: random-weight models of the real architectures, built once per session."""

from __future__ import annotations

import logging

import open_clip
import pytest
import torch

from sfp.models.loading import ModelBundle, bundle_from_model, load_model

logging.getLogger("sfp.models.loading").setLevel(logging.ERROR)


def make_tiny_bundle(layers: int = 6, width: int = 64, heads: int = 4, patch: int = 16,
                     image_size: int = 64, seed: int = 0) -> ModelBundle:
    """A small open_clip CLIP with a standard ViT visual tower (random weights)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=layers, width=width, head_width=width // heads, patch_size=patch,
            image_size=image_size,
        ),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2,
                                       layers=2),
    ).eval()
    return bundle_from_model(model, name=f"tiny-vit-L{layers}", pretrained="random")


@pytest.fixture(scope="session")
def vit_b16() -> ModelBundle:
    """Random-initialised ViT-B-16 (the paper's architecture) on CPU."""
    return load_model("ViT-B-16", pretrained=None, device="cpu")


@pytest.fixture(scope="session")
def vit_s16() -> ModelBundle:
    """Random-initialised ViT-S-16: 12 blocks of width 384, cheaper than B/16."""
    return load_model("ViT-S-16", pretrained=None, device="cpu")


@pytest.fixture(scope="session")
def tiny_vit() -> ModelBundle:
    """A 6-block, 64-wide ViT: for depth-dependent logic and fast tests."""
    return make_tiny_bundle()


@pytest.fixture(autouse=True, scope="session")
def _text_cache_in_tmp(tmp_path_factory):
    """The on-disk text-query cache of every test lives in a temporary folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SFP_TEXT_CACHE", str(tmp_path_factory.mktemp("text-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_registries():
    """Detectors, encoders or presets a test registers do not leak into later tests."""
    from sfp.core.outliers import DETECTORS
    from sfp.methods.base import ENCODERS
    from sfp.methods.config import PRESETS
    from sfp.methods.encoders import make_encoder  # noqa: F401  (registers every method first)

    saved = [(r, r.snapshot()) for r in (DETECTORS, ENCODERS, PRESETS)]
    yield
    for registry, snap in saved:
        registry.restore(snap)
