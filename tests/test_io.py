"""Image loading: formats, modes, orientation, errors; normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sfp.core import io
from sfp.core.io import ImageError


def test_uint8_rgb_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    t = io.load_image(tmp_path / "a.png")
    assert t.shape == (3, 20, 30) and t.dtype == torch.float32
    assert torch.allclose(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert torch.equal(io.load_image(arr), t)
    assert torch.equal(io.load_image(Image.fromarray(arr)), t)


def test_grayscale_uint16_float_and_tensor():
    g = np.full((16, 18), 128, np.uint8)
    t = io.load_image(g)
    assert t.shape == (3, 16, 18) and torch.allclose(t, torch.full_like(t, 128 / 255))
    u16 = np.full((16, 16, 3), 65535, np.uint16)
    assert torch.allclose(io.load_image(u16), torch.ones(3, 16, 16))
    f = np.full((16, 16, 3), 0.25, np.float32)
    assert torch.allclose(io.load_image(f), torch.full((3, 16, 16), 0.25))
    chw = torch.rand(3, 17, 19)
    assert torch.allclose(io.load_image(chw), chw)


def test_rgba_composited_on_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255  # red, alpha 0 -> white
    rgba[:8, :, 3] = 255  # top half opaque red
    t = io.load_image(rgba)
    assert torch.allclose(t[:, 0, 0], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(t[:, 15, 0], torch.tensor([1.0, 1, 1]))


def test_palette_image(tmp_path):
    p = Image.new("P", (20, 16))
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (0, 0, 10, 16))
    p.save(tmp_path / "p.png")
    t = io.load_image(tmp_path / "p.png")
    assert torch.allclose(t[:, 0, 0], torch.tensor([0.0, 1, 0]))
    assert torch.allclose(t[:, 0, 15], torch.tensor([0.0, 0, 0]))


def test_exif_orientation(tmp_path):
    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, :16] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    t = io.load_image(tmp_path / "r.jpg")
    assert t.shape == (3, 32, 16)  # rotated
    assert t[:, :10].mean() > 0.9 and t[:, -10:].mean() < 0.1  # white now on top


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.png", "no such file"),
        (lambda p: (p / "t.txt").write_text("hello") and p / "t.txt", "not an image"),
        (lambda p: (p / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20) and p / "c.png",
         "corrupt|not an image"),
    ],
)
def test_bad_files_name_the_file(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(ImageError, match=match) as info:
        io.load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.jpg")
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="x.jpg"):
        io.load_image(tmp_path / "x.jpg")


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((8, 40, 3), np.uint8), "smaller than one"),
        (np.zeros((3, 20, 20), np.uint8), "channels must come last"),
        (np.zeros((20, 20, 5), np.uint8), "1, 3 or 4 channels"),
        (np.full((20, 20), 2.0), r"\[0, 1\]"),
        (np.full((20, 20), np.nan), "NaN"),
        (np.zeros((20, 20), np.int64), "unsupported dtype"),
        ("not-a-thing-at-all", "no such file"),
        (3.5, "Cannot read"),
    ],
)
def test_bad_arrays(bad, match):
    with pytest.raises(ImageError, match=match):
        io.load_image(bad)


def test_normalize_uses_bundle_stats(tiny_vit):
    img = torch.rand(3, 16, 16)
    out = io.normalize(img, tiny_vit)
    mean = torch.tensor(tiny_vit.mean).view(3, 1, 1)
    std = torch.tensor(tiny_vit.std).view(3, 1, 1)
    assert torch.allclose(out, (img - mean) / std)
    assert io.normalize(img[None], tiny_vit).shape == (1, 3, 16, 16)
    with pytest.raises(ImageError, match="normalize"):
        io.normalize(torch.rand(4, 16, 16), tiny_vit)


def test_prepare_and_resize(tiny_vit):
    arr = np.random.default_rng(2).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    x = io.prepare(arr, tiny_vit, size=64)
    assert x.shape == (1, 3, 64, 64)
    r = io.resize_short_side(torch.rand(3, 300, 451), 336, max_long=400)
    assert max(r.shape[-2:]) == 400


def test_sample_images_offline():
    imgs = io.sample_images()
    assert set(imgs) == {"astronaut", "coffee", "chelsea", "rocket"}
    assert all(a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8 for a in imgs.values())
