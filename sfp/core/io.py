"""Reading images into tensors, and the model's normalisation.

``load_image`` gives a float32 tensor (3, H, W) in [0, 1] from a path, a PIL image, a numpy
array or a tensor; ``normalize`` applies a bundle's mean/std; ``prepare`` does both and
resizes, for one-line use with :func:`sfp.core.probe.record`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


class ImageError(ValueError):
    """An image could not be read or is unusable; the message names the source."""


MIN_SIDE = 16


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (np.ndarray, torch.Tensor)):
        return f"{type(src).__name__} of shape {tuple(src.shape)} ({src.dtype})"
    return type(src).__name__


def _from_pil(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float32)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        return np.repeat(np.clip(arr, 0, 1)[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ImageError(f"{name}: expected HxW, HxWx3 or HxWx4, got {arr.ndim} dimensions.")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        raise ImageError(
            f"{name}: channels must come last (HxWxC) for numpy arrays; got {arr.shape}."
        )
    if arr.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{name}: expected 1, 3 or 4 channels, got {arr.shape[-1]}.")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise ImageError(f"{name}: holds NaN or infinite values.")
        if out.min() < 0 or out.max() > 1:
            raise ImageError(
                f"{name}: float images must be in [0, 1]; got [{out.min():.3g}, {out.max():.3g}]."
            )
    elif arr.dtype == bool:
        out = arr.astype(np.float32)
    else:
        raise ImageError(f"{name}: unsupported dtype {arr.dtype} (use uint8, uint16 or float).")
    if out.shape[-1] == 4:
        alpha = out[..., 3:4]
        out = out[..., :3] * alpha + (1.0 - alpha)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def load_image(src: ImageSource) -> torch.Tensor:
    """Read an image -> float32 tensor (3, H, W) in [0, 1].

    Accepts a file path, a PIL image (EXIF orientation applied; grayscale, palette and RGBA
    converted, transparency composited on white), a numpy array (HxW, HxWx3, HxWx4; uint8,
    uint16 or float in [0, 1]) or a tensor ((3, H, W) or (H, W) float in [0, 1], or uint8).

    Raises:
        ImageError: not an image, unreadable, or smaller than 16 px on a side.
    """
    name = _describe(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"{name}: no such file.")
        try:
            with Image.open(path) as img:
                img.load()
                arr = _from_pil(img)
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not an image file PIL can read.") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: the image file is corrupt or truncated ({exc}).") from exc
    elif isinstance(src, Image.Image):
        arr = _from_pil(src)
    elif isinstance(src, np.ndarray):
        arr = _from_array(src, name)
    elif isinstance(src, torch.Tensor):
        t = src.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        arr = _from_array(t.numpy(), name)
    else:
        raise ImageError(
            f"Cannot read an image from {name}; pass a path, PIL image, numpy array or tensor."
        )
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"{name}: image is {h} x {w} px, smaller than one 16 px patch.")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def normalize(img: torch.Tensor, bundle) -> torch.Tensor:
    """Apply the model's mean/std: (3, H, W) or (B, 3, H, W) in [0, 1] -> same shape."""
    if img.ndim not in (3, 4) or img.shape[-3] != 3:
        raise ImageError(f"normalize expects (3, H, W) or (B, 3, H, W), got {tuple(img.shape)}.")
    shape = (3, 1, 1)
    mean = torch.tensor(bundle.mean, dtype=img.dtype, device=img.device).view(shape)
    std = torch.tensor(bundle.std, dtype=img.dtype, device=img.device).view(shape)
    return (img - mean) / std


def resize_short_side(img: torch.Tensor, short: int, max_long: int | None = None) -> torch.Tensor:
    """Resize (3, H, W) keeping aspect so the short side is ``short`` (bilinear, antialiased)."""
    h, w = img.shape[-2:]
    scale = short / min(h, w)
    if max_long is not None and max(h, w) * scale > max_long:
        scale = max_long / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return img
    out = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp(0, 1)


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Central ``size x size`` crop of (3, H, W) (H, W >= size)."""
    h, w = img.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return img[..., top : top + size, left : left + size]


def prepare(src: ImageSource, bundle, size: int | None = 224, crop: bool = True) -> torch.Tensor:
    """Load, resize (short side ``size``), optionally centre-crop and normalise -> (1, 3, H, W)."""
    img = load_image(src)
    if size is not None:
        img = resize_short_side(img, size)
        if crop:
            img = center_crop(img, size)
    return normalize(img, bundle)[None].to(bundle.device)


def sample_images() -> dict[str, np.ndarray]:
    """A few of scikit-image's bundled photos (no download): name -> HxWx3 uint8."""
    from skimage import data

    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = getattr(data, name)()
        out[name] = img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)
    return out


# ---------------------------------------------------------------------------------------------
# Writing images: every PNG says which model made it
# ---------------------------------------------------------------------------------------------

#: Background and text colours of the banner on images of synthetic / random models.
BANNER_FILL = (255, 214, 10)
BANNER_TEXT = (0, 0, 0)
#: PNG text-chunk keys sfp writes (``Software`` is PNG's registered key).
PNG_KEYS = ("Software", "sfp:model", "sfp:provenance", "sfp:caveat")


def image_tag(source: Any) -> dict[str, str]:
    """What an image written from ``source`` must say about its model.

    source: a ``ModelBundle``, a ``Trace`` or anything with ``label``, ``provenance`` and
    ``caveat`` attributes, or an already made tag (dict); None: nothing is known. Returns
    the PNG text chunks:
    ``{"Software": "sfp", "sfp:model": label, "sfp:provenance": kind}`` plus ``"sfp:caveat"``
    when the model has one (random or synthetic weights).
    """
    if isinstance(source, dict):
        return {"Software": "sfp", **source}
    tag = {"Software": "sfp"}
    if source is None:
        return tag
    label = getattr(source, "label", None)
    if label:
        tag["sfp:model"] = str(label)
    tag["sfp:provenance"] = str(getattr(source, "provenance", "unknown"))
    caveat = getattr(source, "caveat", None)
    if caveat:
        tag["sfp:caveat"] = str(caveat)
    return tag


def banner_text(tag: dict[str, str]) -> str | None:
    """The banner sentence of an image with PNG chunks ``tag``; None when it needs none."""
    caveat = tag.get("sfp:caveat")
    if not caveat:
        return None
    model = tag.get("sfp:model", "unknown model").replace(f" / {caveat}", "")
    tail = "" if "not a pretrained CLIP" in caveat else ", not a pretrained CLIP"
    # the banner font has no em dash
    return f"{caveat.upper()}: {model}{tail}".replace("—", "-")


def _banner_font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def add_banner(img: Image.Image, text: str) -> Image.Image:
    """``img`` (RGB/RGBA) with a yellow strip holding ``text`` above it: the result is
    (H + strip, W); the original pixels are unchanged below the strip. Long text wraps."""
    from PIL import ImageDraw

    w, h = img.size
    size = max(10, min(22, w // 45))
    font = _banner_font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():  # greedy wrap on the measured width
        trial = f"{lines[-1]} {word}" if lines else word
        x0, _, x1, _ = probe.textbbox((0, 0), trial, font=font)
        if lines and x1 - x0 <= w - 12:
            lines[-1] = trial
        else:
            lines.append(word)
    line_h = size + 4
    strip = 6 + line_h * len(lines) + 4
    mode = "RGBA" if img.mode == "RGBA" else "RGB"
    out = Image.new(mode, (w, h + strip), BANNER_FILL + ((255,) if mode == "RGBA" else ()))
    out.paste(img.convert(mode), (0, strip))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, 6 + i * line_h), line, fill=BANNER_TEXT, font=font)
    return out


def save_png(img: Image.Image | np.ndarray, path: str | os.PathLike, source: Any = None, *,
             banner: bool = True) -> Path:
    """Write ``img`` as a PNG at ``path`` with sfp's text chunks (:func:`image_tag`).

    img: a PIL image or (H, W, 3) uint8 array. For a model with a caveat (random or synthetic
    weights) a banner saying so is drawn above the picture (:func:`add_banner`) unless
    ``banner=False`` (images whose pixels are data, e.g. label maps, get only the chunks).
    """
    from PIL.PngImagePlugin import PngInfo

    pil = Image.fromarray(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
    tag = image_tag(source)
    text = banner_text(tag)
    if banner and text:
        pil = add_banner(pil, text)
    info = PngInfo()
    for key, value in tag.items():
        info.add_itxt(key, value)
    path = Path(path)
    pil.save(path, format="PNG", pnginfo=info)
    return path
