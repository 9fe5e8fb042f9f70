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
