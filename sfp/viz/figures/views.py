"""What the figures are drawn from: the image crop the model saw, and default layer choices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfp.core import io

__all__ = ["CropFigureData", "ImageView", "default_layers", "image_view", "patch_index"]

# The released notebook's layers (1-indexed blocks) for a 12-block ViT.
_NOTEBOOK_LAYERS_12 = (1, 6, 8, 11)


@dataclass
class ImageView:
    """One image as the model sees it.

    name: short name for titles and file names. rgb: (H, W, 3) float32 in [0, 1], the resized
    (and cropped) image. pixels: (1, 3, H, W) normalised for the bundle, on its device.
    truth: (H, W) int64 ground-truth class per pixel of ``rgb`` (255 = not scored) where it
    is known (the toy benchmark's scenes), else None; figures that segment score against it.
    """

    name: str
    rgb: np.ndarray
    pixels: torch.Tensor
    truth: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.truth is not None:
            truth = np.asarray(self.truth)
            if not np.issubdtype(truth.dtype, np.integer):
                raise ValueError(f"truth of {self.name!r} has dtype {truth.dtype}: pass integer "
                                 "class ids per pixel (255 = not scored).")
            self.truth = truth.astype(np.int64)
            if self.truth.shape != self.rgb.shape[:2]:
                raise ValueError(f"truth of {self.name!r} is {self.truth.shape}, the image "
                                 f"{self.rgb.shape[:2]}: pass one class per pixel of the "
                                 "image as the model sees it (after resize and crop).")

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


@dataclass
class CropFigureData:
    """What every figure drawn from one image crop records about its source.

    grid: (gh, gw) patches; image: (H, W, 3) the crop in [0, 1]; name: the image's name;
    label: model and weights (``bundle.label``); is_synthetic: a planted-outlier model;
    config: the SFP configuration's constructor text.
    """

    grid: tuple[int, int]
    image: np.ndarray
    name: str
    label: str
    is_synthetic: bool
    config: str


def image_view(
    bundle: Any,
    src: io.ImageSource,
    *,
    size: int | None | str = 224,
    crop: bool = True,
    name: str | None = None,
    squash: bool = False,
) -> ImageView:
    """Load ``src`` (path, PIL, array, tensor), resize its short side to ``size`` (default 224;
    ``"model"``: the model's input size, 128 for the toy CLIP) and, with
    ``crop``, take the central ``size x size`` crop (``crop=False`` keeps the aspect ratio: a
    non-square patch grid). ``squash``: resize to ``size x size`` ignoring the aspect ratio,
    no crop (the released notebook's ``Resize((224, 224))``; bilinear, antialiased).
    Returns an :class:`ImageView`."""
    img = io.load_image(src)
    if size == "model":
        size = int(bundle.image_size[0])
    if size is not None and squash:
        img = torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear",
                                              align_corners=False, antialias=True)[0]
        img = img.clamp(0, 1)
    elif size is not None:
        img = io.resize_short_side(img, size)
        if crop:
            img = io.center_crop(img, size)
    if name is None:
        name = Path(str(src)).stem if isinstance(src, (str, Path)) else "image"
    rgb = img.permute(1, 2, 0).clamp(0, 1).numpy().astype(np.float32)
    pixels = io.normalize(img, bundle)[None].to(device=bundle.device, dtype=bundle.dtype)
    return ImageView(name=name, rgb=rgb, pixels=pixels)


def default_layers(num_layers: int, reference: tuple[int, ...] = _NOTEBOOK_LAYERS_12) -> list[int]:
    """The released notebook's layers 1, 6, 8, 11 (of 12) scaled to ``num_layers`` blocks.

    Layer l of 12 becomes round(l * L / 12) clamped to 1..L (duplicates dropped), e.g.
    (1, 3, 4, 6) for L = 6 and (2, 12, 16, 22) for L = 24.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    out: list[int] = []
    for layer in reference:
        scaled = min(max(int(np.floor(layer * num_layers / 12 + 0.5)), 1), num_layers)
        if scaled not in out:
            out.append(scaled)
    return out


def patch_index(patch: int | tuple[int, int] | None, grid: tuple[int, int]) -> int:
    """Row-major patch index from an index, a (row, col) pair, or None (the centre patch)."""
    gh, gw = grid
    if patch is None:
        return (gh // 2) * gw + gw // 2
    if isinstance(patch, tuple):
        r, c = patch
        if not (0 <= r < gh and 0 <= c < gw):
            raise ValueError(f"patch (row, col) = {patch} is outside the {gh} x {gw} grid")
        return int(r) * gw + int(c)
    if not 0 <= int(patch) < gh * gw:
        raise ValueError(f"patch index {patch} is outside 0..{gh * gw - 1}")
    return int(patch)
