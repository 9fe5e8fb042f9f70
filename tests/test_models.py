"""Model loading: weights files, QuickGELU decisions, offline errors, architecture checks."""

from __future__ import annotations

import logging
import time

import open_clip
import pytest
import torch

from sfp.core import forward
from sfp.models.loading import (
    CHECKPOINT_ENV,
    ModelLoadError,
    WeightsUnavailableError,
    bundle_from_model,
    default_pretrained,
    load_model,
)


@pytest.fixture(scope="module")
def quickgelu_source(tmp_path_factory):
    """A random ViT-B-16-quickgelu model and its state dict saved to a file."""
    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-16-quickgelu").eval()
    path = tmp_path_factory.mktemp("w") / "vitb16_qg.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 224, 224)


def test_bundle_facts(vit_b16):
    b = vit_b16
    assert (b.patch_size, b.num_layers, b.width, b.heads, b.embed_dim) == (16, 12, 768, 12, 512)
    assert b.pretrained == "random" and b.is_random and not b.is_synthetic
    assert b.device == torch.device("cpu") and b.dtype == torch.float32
    assert b.image_size == (224, 224)
    assert "ViT-B-16" in repr(b) and "random" in repr(b)


def test_random_requires_explicit_none_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="sfp.models.loading"):
        b = load_model("ViT-S-16", pretrained=None, device="cpu")
    assert b.pretrained == "random"
    assert any("RANDOM" in r.getMessage() for r in caplog.records)


def test_state_dict_file_with_quick_gelu(quickgelu_source, images):
    model, path = quickgelu_source
    b = load_model("ViT-B-16", pretrained=str(path), device="cpu", quick_gelu=True)
    assert b.quick_gelu
    with torch.no_grad():
        ref = model.encode_image(images)
        got = b.model.encode_image(images)
    assert (ref - got).abs().max() < 1e-5


def test_plain_state_dict_without_choice_warns_and_differs(quickgelu_source, images, caplog):
    model, path = quickgelu_source
    with caplog.at_level(logging.WARNING, logger="sfp.models.loading"):
        b = load_model("ViT-B-16", pretrained=path, device="cpu")
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "quick_gelu=False" in msgs and "quick_gelu=True" in msgs
    assert not b.quick_gelu
    with torch.no_grad():
        # GELU instead of QuickGELU: same weights, different numbers (the silent pitfall).
        assert (model.encode_image(images) - b.model.encode_image(images)).abs().max() > 1e-4


def test_quickgelu_model_name_decides(quickgelu_source, images):
    model, path = quickgelu_source
    b = load_model("ViT-B-16-quickgelu", pretrained=path, device="cpu")
    assert b.quick_gelu
    with torch.no_grad():
        assert (model.encode_image(images) - b.model.encode_image(images)).abs().max() < 1e-5


def test_torchscript_archive_implies_quick_gelu(quickgelu_source, images, tmp_path):
    model, _ = quickgelu_source
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.script(model).save(str(path))
    b = load_model("ViT-B-16", pretrained=path, device="cpu", quick_gelu=None)
    assert b.quick_gelu
    with torch.no_grad():
        assert (model.encode_image(images) - b.model.encode_image(images)).abs().max() < 1e-5


def test_open_clip_checkpoint_with_state_dict_key(quickgelu_source, tmp_path, images):
    model, _ = quickgelu_source
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in
                                           model.state_dict().items()}}, path)
    b = load_model("ViT-B-16-quickgelu", pretrained=path, device="cpu")
    with torch.no_grad():
        assert (model.encode_image(images) - b.model.encode_image(images)).abs().max() < 1e-5


def test_wrong_architecture_names_shapes(quickgelu_source):
    _, path = quickgelu_source
    with pytest.raises(ModelLoadError, match=r"expected shape .* found"):
        load_model("ViT-S-16", pretrained=path, device="cpu")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="Could not read weights file"):
        load_model("ViT-S-16", pretrained=bad, device="cpu")


def test_missing_file_and_unknown_tag():
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("ViT-S-16", pretrained="/nonexistent/weights.pt")
    with pytest.raises(ModelLoadError, match="tags"):
        load_model("ViT-B-16", pretrained="no_such_tag")


def test_unknown_model_lists_close_matches():
    with pytest.raises(ModelLoadError, match="Close matches: .*ViT-B-16"):
        load_model("ViT-B-61", pretrained=None)


def test_resnet_rejected():
    with pytest.raises(ModelLoadError, match="only ViT"):
        load_model("RN50", pretrained=None)


def test_bad_precision():
    with pytest.raises(ModelLoadError, match="precision"):
        load_model("ViT-S-16", pretrained=None, precision="fp8")


def test_offline_tag_fails_fast_with_one_sentence(tmp_path):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 30
    msg = str(info.value)
    assert "ViT-B-16" in msg and "'openai'" in msg
    assert "pretrained='/path/to/weights.pt'" in msg and CHECKPOINT_ENV in msg
    assert msg.count(". ") == 0  # one sentence


def test_default_pretrained_env(monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    assert default_pretrained() == "openai"
    monkeypatch.setenv(CHECKPOINT_ENV, "/w/clip.pt")
    assert default_pretrained() == "/w/clip.pt"


def test_bundle_from_model_rejects_non_vit():
    rn = open_clip.create_model("RN50")
    with pytest.raises(ModelLoadError, match="ViT"):
        bundle_from_model(rn, name="RN50", pretrained="random")


def test_fp16_precision_casts(vit_s16):
    b = load_model("ViT-S-16", pretrained=None, device="cpu", precision="bf16")
    assert b.dtype == torch.bfloat16
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = forward.encode_image(b.visual, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
