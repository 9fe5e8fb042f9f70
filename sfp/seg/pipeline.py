"""Sliding-window open-vocabulary segmentation and its post-processing: the one pipeline.

Every segmentation sfp shows goes through :class:`Segmenter`: ``sfp segment``, ``sfp eval``,
the figures and the widgets.

>>> seg = Segmenter(bundle, "cat; dog; grass", method="sfp")
>>> out = seg.predict("photo.jpg")          # Segmentation
>>> out.labels.shape, out.probs.shape        # (H, W) int64, (C, H, W) float32
>>> Image.fromarray(out.overlay()).save("overlay.png")

The pipeline, one image at a time (the released SFP/SCLIP ``forward_slide`` and
``postprocess_result``):

1. resize so the short side is ``short_side`` and the long side at most ``max_long_side``
   (mmcv's ``imrescale`` rule, bilinear, no antialiasing), normalise;
2. :func:`slide_windows`: ``crop x crop`` windows every ``stride`` pixels, the last one flush
   with the border (mmseg's slide inference); windows are ``min(crop, h) x min(crop, w)``
   when the image is smaller than a crop;
3. per window (``batch_size`` windows per encoder call): patch features, L2-normalised, dot
   the text query embeddings -> cosine logits ``(Q, gh, gw)``, bilinearly upsampled to the
   window (:func:`window_logits`);
4. :func:`stitch`: summed over windows and divided by the per-pixel window count;
5. bilinear upsampling to the original image size;
6. :func:`postprocess`: ``* logit_scale``, softmax over queries, max over each class's
   synonyms, optional area threshold, probability threshold -> class 0.

Steps 1-4 are :meth:`Segmenter.predict_logits` (returns :class:`SegmentationScores`, the
expensive part); steps 5-6 are :meth:`Segmenter.postprocess`, which takes overrides of
``logit_scale``, ``prob_thd`` and ``area_thd``, so thresholds can be tuned on cached scores
without re-encoding. :meth:`Segmenter.predict` does both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from sfp.core import forward
from sfp.core.io import ImageSource, image_tag, load_image, normalize, save_png
from sfp.methods.base import Encoder
from sfp.methods.config import preset_templates
from sfp.methods.encoders import make_encoder
from sfp.models.loading import ModelBundle
from sfp.models.text import (
    ClassSpec,
    Queries,
    TemplateSpec,
    embed_queries,
    resolve_templates,
    templates_key,
)
from sfp.seg.benchmarks import BACKGROUND, Settings, class_list, get_benchmark

__all__ = [
    "PALETTE",
    "class_palette",
    "Prepared",
    "Segmentation",
    "SegmentationScores",
    "Segmenter",
    "Stitcher",
    "Window",
    "embed_classes",
    "inference_size",
    "label_image",
    "postprocess",
    "resize_image",
    "save_segmentation",
    "slide_windows",
    "stitch",
    "window_logits",
]

_DEFAULTS = Settings()

Window = tuple[int, int, int, int]
"""``(y0, x0, y1, x1)``: rows ``y0:y1`` and columns ``x0:x1`` of the resized image."""

def _voc_palette() -> np.ndarray:
    """PASCAL VOC colour map: (256, 3) uint8, index 0 black, 255 (ignore) light grey-ish."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


#: Fixed class colours (the PASCAL VOC colour map): ``PALETTE[c]`` is class c's RGB colour
#: in a benchmark with a background class (class 0, black).
PALETTE: np.ndarray = _voc_palette()
PALETTE.flags.writeable = False
_USER_PALETTE = np.concatenate([PALETTE[1:], PALETTE[:1]])
_USER_PALETTE.flags.writeable = False


def class_palette(class_names: Sequence[str] | None = None) -> np.ndarray:
    """(256, 3) uint8 colours of classes 0..255 for a class list.

    Black is the background's colour only: a list whose class 0 is named "background" (the
    benchmarks with a background class) gets :data:`PALETTE`; any other list (the classes a
    user typed) starts at PALETTE[1], so its first class is not drawn black. None: PALETTE.
    """
    if class_names is None or (len(class_names) and class_names[0] == BACKGROUND):
        return PALETTE
    return _USER_PALETTE


# ---------------------------------------------------------------------------------------------
# Pure stages
# ---------------------------------------------------------------------------------------------


def slide_windows(h: int, w: int, crop: int = _DEFAULTS.crop, stride: int = _DEFAULTS.stride
                  ) -> list[Window]:
    """Sliding windows over an ``h x w`` image, as mmseg's slide inference places them.

    Window starts are ``0, stride, 2 stride, ...``; the last window of a row/column is moved
    back to end exactly at the border, and a window never starts before 0, so windows are
    ``min(crop, h) x min(crop, w)`` and together cover every pixel. Row-major order.

    Returns:
        ``[(y0, x0, y1, x1), ...]`` with ``ceil(max(h - crop, 0) / stride) + 1`` rows of
        ``ceil(max(w - crop, 0) / stride) + 1`` windows.
    """
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h} x {w}.")
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}.")
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    out: list[Window] = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1 = min(hi * stride + crop, h)
            x1 = min(wi * stride + crop, w)
            out.append((max(y1 - crop, 0), max(x1 - crop, 0), y1, x1))
    return out


def inference_size(
    h: int, w: int, short_side: int | None = _DEFAULTS.short_side,
    max_long_side: int | None = _DEFAULTS.max_long_side,
) -> tuple[int, int]:
    """Size the image is resized to, by mmcv's ``imrescale(img, (max_long, short))`` rule.

    ``scale = min(max_long_side / max(h, w), short_side / min(h, w))`` and each side becomes
    ``int(side * scale + 0.5)``. ``short_side=None`` keeps the size (the long-side cap still
    applies when given).
    """
    if short_side is None and max_long_side is None:
        return h, w
    scales = []
    if short_side is not None:
        scales.append(short_side / min(h, w))
    if max_long_side is not None:
        scales.append(max_long_side / max(h, w))
    scale = min(scales)
    if short_side is None and scale >= 1:
        return h, w
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialiasing, like cv2 INTER_LINEAR).

    img: (3, H, W) or (B, 3, H, W) float -> same rank at ``size = (h, w)``.
    """
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    batched = img.ndim == 4
    x = img if batched else img[None]
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x if batched else x[0]


def window_logits(
    features: torch.Tensor, queries: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Cosine logits of each window, upsampled to the window.

    features: (B, gh*gw, D) patch features (any scale); queries: (Q, D) L2-normalised text
    embeddings; grid: (gh, gw); size: window (h, w) -> (B, Q, h, w) float32, bilinear
    (align_corners=False).
    """
    b, n, _ = features.shape
    gh, gw = grid
    if n != gh * gw:
        raise ValueError(f"{n} patch features do not fill a {gh} x {gw} grid.")
    feats = F.normalize(features.float(), dim=-1)
    logits = feats @ queries.to(device=feats.device, dtype=torch.float32).T  # (B, N, Q)
    logits = logits.transpose(1, 2).reshape(b, -1, gh, gw)
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class Stitcher:
    """Averages overlapping window logits into one map, window by window.

    ``Stitcher(num_queries, (h, w))``; :meth:`add` the logits of some windows, then
    :meth:`result` is the per-pixel sum over the windows covering it divided by their count.
    """

    def __init__(self, num_queries: int, size: tuple[int, int],
                 device: torch.device | str | None = None) -> None:
        self.acc = torch.zeros((num_queries, *size), dtype=torch.float32, device=device)
        self.count = torch.zeros((1, *size), dtype=torch.float32, device=device)

    def add(self, logits: torch.Tensor | Sequence[torch.Tensor], windows: Sequence[Window]) -> None:
        """Add window logits (K, Q, hw, ww) (or K tensors (Q, hw, ww)), one per window."""
        if len(logits) != len(windows):
            raise ValueError(f"{len(logits)} window logits for {len(windows)} windows.")
        for lg, (y0, x0, y1, x1) in zip(logits, windows, strict=True):
            self.acc[:, y0:y1, x0:x1] += lg.float()
            self.count[:, y0:y1, x0:x1] += 1

    def result(self) -> torch.Tensor:
        """(Q, h, w) window-averaged logits. Raises ValueError if a pixel has no window."""
        if bool((self.count == 0).any()):
            raise ValueError("the windows do not cover the whole image.")
        return self.acc / self.count


def stitch(
    logits: torch.Tensor | Sequence[torch.Tensor],
    windows: Sequence[Window],
    size: tuple[int, int],
) -> torch.Tensor:
    """Average overlapping window logits into one map (see :class:`Stitcher`).

    logits: (K, Q, hw, ww) (or K tensors (Q, hw, ww)), one per window of ``windows``;
    size: (h, w) of the image the windows tile -> (Q, h, w).

    Raises:
        ValueError: counts differ, or some pixel is covered by no window.
    """
    if len(logits) != len(windows):
        raise ValueError(f"{len(logits)} window logits for {len(windows)} windows.")
    st = Stitcher(logits[0].shape[0], size, device=logits[0].device)
    st.add(logits, windows)
    return st.result()


def _class_max(probs: torch.Tensor, query_to_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Max over each class's queries: (Q, H, W), (Q,) -> (C, H, W)."""
    q = probs.shape[0]
    q2c = query_to_class.to(probs.device)
    if q == num_classes and bool((q2c == torch.arange(q, device=q2c.device)).all()):
        return probs
    flat = probs.reshape(q, -1)
    out = flat.new_zeros((num_classes, flat.shape[1]))
    index = q2c[:, None].expand_as(flat)
    out = out.scatter_reduce(0, index, flat, reduce="amax", include_self=False)
    return out.reshape(num_classes, *probs.shape[1:])


def postprocess(
    scores: torch.Tensor,
    query_to_class: torch.Tensor | Sequence[int],
    *,
    logit_scale: float = _DEFAULTS.logit_scale,
    prob_thd: float = _DEFAULTS.prob_thd,
    area_thd: float | None = _DEFAULTS.area_thd,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn cosine logits into labels, as the released ``postprocess_result`` does.

    1. ``probs = softmax(logit_scale * scores)`` over the Q queries;
    2. class probability = max over the class's queries (synonyms);
    3. area threshold (when ``area_thd`` is not None): with ``a_c`` the number of pixels whose
       argmax is c, a class c >= 1 is kept only if ``a_c > area_thd * sum_{c' >= 1} a_c'``
       (class 0 is background and always kept); a dropped class's probabilities become 0,
       so its pixels go to their next most probable class;
    4. labels = argmax (first index on ties); pixels whose maximum probability is below
       ``prob_thd`` become 0 (background).

    Args:
        scores: (Q, H, W) cosine logits (features and queries L2-normalised).
        query_to_class: (Q,) class index of each query.
        num_classes: C; default ``max(query_to_class) + 1``.

    Returns:
        labels (H, W) int64 and probs (C, H, W) float32 (after step 3), on scores' device.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be (Q, H, W), got {tuple(scores.shape)}.")
    q2c = torch.as_tensor(query_to_class, dtype=torch.long, device=scores.device)
    if q2c.shape != (scores.shape[0],):
        raise ValueError(f"query_to_class has {q2c.numel()} entries for {scores.shape[0]} queries.")
    c = int(q2c.max()) + 1 if num_classes is None else int(num_classes)
    probs = torch.softmax(scores.float() * float(logit_scale), dim=0)
    probs = _class_max(probs, q2c, c)
    if area_thd is not None:
        pred = probs.argmax(0)
        area = torch.bincount(pred.flatten(), minlength=c)[1:].to(torch.float32)
        keep = area > float(area_thd) * area.sum()  # float32, as the release computes it
        probs[1:] *= keep.to(probs.dtype)[:, None, None]
    best = probs.amax(0)
    labels = probs.argmax(0)
    labels[best < prob_thd] = 0
    return labels, probs


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def label_image(labels: np.ndarray | torch.Tensor,
                class_names: Sequence[str] | None = None) -> Image.Image:
    """Label map (H, W) of class indices -> PIL image: a palette PNG ('P', colours from
    :func:`class_palette` of ``class_names``, pixel values = class indices) when all indices
    < 256, else 16-bit grayscale ('I;16')."""
    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError("label values must be in 0..65535 to be stored as a PNG.")
    if arr.size == 0 or arr.max() < 256:
        im = Image.fromarray(arr.astype(np.uint8)).convert("P")
        im.putpalette(class_palette(class_names).reshape(-1).tolist())
        return im
    return Image.fromarray(arr.astype(np.uint16))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    x0, _, x1, _ = draw.textbbox((0, 0), text, font=font)
    return int(math.ceil(x1 - x0))


@dataclass(eq=False)
class Segmentation:
    """A segmentation of one image.

    Attributes:
        labels: (H, W) int64 class indices at the original resolution.
        probs: (C, H, W) float32 class probabilities (after the area threshold; labels are
            their argmax, then pixels below ``prob_thd`` set to 0).
        class_names: C display names (the first synonym of each class).
        image: (H, W, 3) uint8 RGB of the input, for :meth:`overlay` (None if not kept).
        params: the post-processing values used (logit_scale, prob_thd, area_thd).
        model: what written images say about the model (:func:`sfp.core.io.image_tag`:
            label, provenance, caveat); empty when unknown.
    """

    labels: torch.Tensor
    probs: torch.Tensor
    class_names: list[str]
    image: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def present(self) -> list[int]:
        """Indices of the classes that label at least one pixel, ascending."""
        return [int(c) for c in torch.unique(self.labels).tolist()]

    def areas(self) -> dict[str, float]:
        """Fraction of the image each present class covers: ``{name: fraction}``."""
        counts = torch.bincount(self.labels.flatten(), minlength=self.num_classes)
        total = float(self.labels.numel())
        return {self.class_names[c]: float(counts[c]) / total for c in self.present()}

    def label_image(self) -> Image.Image:
        """The labels as a palette PNG image (see :func:`label_image`)."""
        return label_image(self.labels, self.class_names)

    def colorize(self) -> np.ndarray:
        """Labels painted with :func:`class_palette` of the class list: (H, W, 3) uint8."""
        return class_palette(self.class_names)[self.labels.cpu().numpy() % 256]

    def overlay(self, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
        """The image blended with the class colours, with a legend of the classes present.

        ``out = (1 - alpha) * image + alpha * colour``. With ``legend`` a white panel listing
        the present classes (colour swatch + name) is appended on the right, so the result is
        ``(max(H, legend height), W + legend width, 3)`` uint8 with the blend at ``[:H, :W]``;
        without it exactly (H, W, 3).
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        colours = self.colorize().astype(np.float32)
        h, w = colours.shape[:2]
        if self.image is None:
            base = np.zeros_like(colours)
        else:
            base = self.image.astype(np.float32)
        blend = np.clip((1.0 - alpha) * base + alpha * colours + 0.5, 0, 255).astype(np.uint8)
        if not legend:
            return blend
        present = self.present()
        size = max(10, min(24, round(max(h, w) / 40)))
        font = _font(size)
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        line = size + 6
        pad = 6
        names = [self.class_names[c] if c < self.num_classes else str(c) for c in present]
        text_w = max((_text_width(probe, n, font) for n in names), default=0)
        panel_w = pad + size + pad + text_w + pad
        panel_h = pad + line * len(present) + pad
        out = Image.new("RGB", (w + panel_w, max(h, panel_h)), (255, 255, 255))
        out.paste(Image.fromarray(blend), (0, 0))
        draw = ImageDraw.Draw(out)
        for k, (c, name) in enumerate(zip(present, names, strict=True)):
            y = pad + k * line
            colour = tuple(int(v) for v in class_palette(self.class_names)[c % 256])
            draw.rectangle([w + pad, y, w + pad + size, y + size], fill=colour, outline=(0, 0, 0))
            draw.text((w + pad + size + pad, y), name, fill=(0, 0, 0), font=font)
        return np.asarray(out, dtype=np.uint8)

    def __repr__(self) -> str:
        h, w = self.labels.shape
        names = [self.class_names[c] for c in self.present() if c < self.num_classes]
        return f"Segmentation({h} x {w}, {self.num_classes} classes, present={names})"


@dataclass(eq=False)
class SegmentationScores:
    """Window-averaged cosine logits of one image, before post-processing.

    Attributes:
        logits: (Q, h, w) float32 at the inference resolution (after resizing).
        size: (H, W) of the original image; :meth:`upsampled` gives (Q, H, W).
        query_to_class: (Q,) class index of each query.
        class_names: C display names.
        image: (H, W, 3) uint8 input (for overlays), or None.
    """

    logits: torch.Tensor
    size: tuple[int, int]
    query_to_class: torch.Tensor
    class_names: list[str]
    image: np.ndarray | None = None

    def upsampled(self) -> torch.Tensor:
        """Bilinear (align_corners=False) upsampling to the original size: (Q, H, W)."""
        if tuple(self.logits.shape[-2:]) == tuple(self.size):
            return self.logits
        return F.interpolate(
            self.logits[None], size=tuple(self.size), mode="bilinear", align_corners=False
        )[0]

    def to(self, device: torch.device | str) -> SegmentationScores:
        """A copy with the tensors on ``device``."""
        return SegmentationScores(
            self.logits.to(device), self.size, self.query_to_class.to(device),
            self.class_names, self.image,
        )


# ---------------------------------------------------------------------------------------------
# Segmenter
# ---------------------------------------------------------------------------------------------


class _Keep:
    """Type of :data:`KEEP`."""

    def __repr__(self) -> str:
        return "KEEP"


#: Default of :meth:`Segmenter.postprocess`'s ``area_thd``: keep the segmenter's value.
KEEP = _Keep()


def embed_classes(bundle: ModelBundle, classes: ClassSpec, templates: TemplateSpec = None
                  ) -> Queries:
    """Text queries of any class specification, benchmark names included
    (:func:`sfp.seg.benchmarks.class_list`, then :func:`sfp.models.text.embed_queries`)."""
    parsed, _ = class_list(classes)
    # class_list validated the names already (released lists may repeat one across classes)
    return embed_queries(bundle, parsed, templates, allow_duplicates=True)


def _to_image(image: ImageSource) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]; HxWx3 uint8 arrays (dataset samples) take a fast path."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and (
        image.shape[-1] == 3
    ):
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    return load_image(image)


def _uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@dataclass(frozen=True)
class Prepared:
    """An image made ready for the encoder (steps 1-2 of the pipeline).

    pixels: (3, h, w) normalised, resized, on the model's device and dtype; windows: the
    sliding windows over it; grid: the patch grid of one window; window_size: (hw, ww);
    size: (H, W) of the original image.
    """

    pixels: torch.Tensor
    windows: list[Window]
    grid: tuple[int, int]
    window_size: tuple[int, int]
    size: tuple[int, int]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, list[Window]]]:
        """``(crops (K, 3, hw, ww), their windows)``, ``batch_size`` windows at a time."""
        for i in range(0, len(self.windows), batch_size):
            chunk = self.windows[i : i + batch_size]
            yield torch.stack([self.pixels[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk]), chunk


class Segmenter:
    """Open-vocabulary semantic segmentation with a training-free dense CLIP encoder.

    Args:
        bundle: the loaded CLIP model (:func:`sfp.models.loading.load_model`).
        classes: a benchmark name (``"voc21"``), a class file, ``"cat; dog; grass"``, a list
            of names (", "-separated synonyms allowed) or a list of synonym lists.
        method: an encoder method of :func:`sfp.methods.encoders.make_encoder` (``"sfp"``,
            ``"clip"``, ...) or an :class:`~sfp.methods.base.Encoder` instance.
        config: the method's configuration (for ``"sfp"``: an ``SFPConfig`` or a preset
            name); None = the method's defaults.
        short_side, max_long_side: resize rule (:func:`inference_size`); None = keep.
        crop, stride: sliding windows (:func:`slide_windows`).
        logit_scale, prob_thd, area_thd: post-processing (:func:`postprocess`).
        batch_size: windows per encoder call (results do not depend on it).
        templates: prompt templates: a set of :data:`sfp.models.text.TEMPLATES` (``"openai80"``,
            the 80 OpenAI ImageNet templates; ``"sfp15"``; ``"simple"``), or a list of format
            strings / callables. None: the SFP preset's own set where it was released with
            one (``"release-2025-12"``: ``"sfp15"``), else ``"openai80"``.
        fwd_hooks: interventions applied in every window's forward (``[(hook name, fn)]``).
        queries: text queries already embedded for these classes (reused, not re-embedded).
        text_cache: read and write the on-disk text-query cache
            (:func:`sfp.models.text.text_cache_dir`); False embeds afresh.

    Defaults are :class:`sfp.seg.benchmarks.Settings`' (the released protocol). Text queries
    are embedded once, on first use, and kept.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        classes: ClassSpec,
        method: str | Encoder = "sfp",
        config: Any = None,
        short_side: int | None = _DEFAULTS.short_side,
        crop: int = _DEFAULTS.crop,
        stride: int = _DEFAULTS.stride,
        logit_scale: float = _DEFAULTS.logit_scale,
        prob_thd: float = _DEFAULTS.prob_thd,
        area_thd: float | None = _DEFAULTS.area_thd,
        batch_size: int = 8,
        templates: TemplateSpec = None,
        max_long_side: int | None = _DEFAULTS.max_long_side,
        fwd_hooks: Any = None,
        queries: Queries | None = None,
        text_cache: bool = True,
    ) -> None:
        if crop < bundle.patch_size:
            raise ValueError(f"crop ({crop}) must be at least one patch ({bundle.patch_size}).")
        if stride < 1 or stride > crop:
            raise ValueError(f"stride must be in 1..crop ({crop}), got {stride}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if short_side is not None and short_side < 1:
            raise ValueError(f"short_side must be positive or None, got {short_side}.")
        self._check_post(logit_scale, prob_thd, area_thd)
        self.bundle = bundle
        self.classes, self.class_names = class_list(classes)
        self._classes_arg = classes
        if isinstance(method, Encoder):
            if config is not None:
                raise ValueError("config must be None when method is an Encoder instance.")
            self.encoder = method
        else:
            self.encoder = make_encoder(bundle, method, config)
        self.method = getattr(self.encoder, "name", str(method))
        if templates is None:  # a preset released with its own templates uses them
            templates = preset_templates(self.encoder.config)
        self.short_side = short_side
        self.max_long_side = max_long_side
        self.crop = int(crop)
        self.stride = int(stride)
        self.logit_scale = float(logit_scale)
        self.prob_thd = float(prob_thd)
        self.area_thd = None if area_thd is None else float(area_thd)
        self.batch_size = int(batch_size)
        self.templates = templates
        self.text_cache = bool(text_cache)
        resolve_templates(templates)
        self.fwd_hooks = None if fwd_hooks is None else self.encoder.hooks(fwd_hooks)
        self._queries: Queries | None = None
        self._query_emb: torch.Tensor | None = None
        if queries is not None:
            if len(queries.class_names) != self.num_classes:
                raise ValueError(f"queries hold {len(queries.class_names)} classes, the class "
                                 f"list {self.num_classes}.")
            self._queries = queries
            self._query_emb = queries.embeddings.to(self.bundle.device, torch.float32)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def for_benchmark(cls, bundle: ModelBundle, name: str, **overrides: Any) -> Segmenter:
        """A segmenter with the released settings of benchmark ``name``
        (:data:`sfp.seg.benchmarks.BENCHMARKS`).

        ``overrides`` replace any argument of :class:`Segmenter` (``method``, ``config``,
        ``templates``, ``logit_scale``, ...); the classes are the benchmark's class list. The
        settings are :meth:`~sfp.seg.benchmarks.Benchmark.settings_for` the method (default
        ``"sfp"``) and ``bundle.name`` (e.g. ADE20K: short side 384, 336 for ``"sc-clip"``;
        ViT-L/14 thresholds on voc21 and coco_object).
        """
        bench = get_benchmark(name)
        method = overrides.get("method", "sfp")
        method_name = method if isinstance(method, str) else getattr(method, "name", None)
        settings = bench.settings_for(method=method_name, model=bundle.name)
        templates = preset_templates(overrides.get("config")) or bench.templates
        kwargs: dict[str, Any] = {**settings.as_kwargs(), "templates": templates, **overrides}
        kwargs.setdefault("classes", bench.name)
        return cls(bundle, **kwargs)

    @staticmethod
    def _check_post(logit_scale: float, prob_thd: float, area_thd: float | None) -> None:
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale}.")
        if not 0.0 <= prob_thd <= 1.0:
            raise ValueError(f"prob_thd must be in [0, 1], got {prob_thd}.")
        if area_thd is not None and not 0.0 <= area_thd <= 1.0:
            raise ValueError(f"area_thd must be in [0, 1] or None, got {area_thd}.")

    # -- text --------------------------------------------------------------------------------
    @property
    def queries(self) -> Queries:
        """The text queries (embedded on first access, then cached)."""
        if self._queries is None:
            # class_list validated the names already (released lists may repeat one)
            self._queries = embed_queries(self.bundle, self.classes, self.templates,
                                          allow_duplicates=True, cache=self.text_cache)
            self._query_emb = self._queries.embeddings.to(self.bundle.device, torch.float32)
        return self._queries

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def params(self) -> dict[str, Any]:
        """The segmenter's settings as a JSON-friendly dict (batch_size excluded: it does not
        change results)."""
        return {
            "short_side": self.short_side,
            "max_long_side": self.max_long_side,
            "crop": self.crop,
            "stride": self.stride,
            "logit_scale": self.logit_scale,
            "prob_thd": self.prob_thd,
            "area_thd": self.area_thd,
            "templates": templates_key(self.templates),
        }

    # -- inference ---------------------------------------------------------------------------
    def prepare(self, image: ImageSource | torch.Tensor) -> Prepared:
        """Steps 1-2: resize, normalise, lay out the windows (see :class:`Prepared`).

        image: a path, PIL image, (H, W, 3) array or (3, H, W) tensor in [0, 1].
        """
        img = _to_image(image) if not isinstance(image, torch.Tensor) else image
        h0, w0 = int(img.shape[-2]), int(img.shape[-1])
        size = inference_size(h0, w0, self.short_side, self.max_long_side)
        x = resize_image(img.to(self.bundle.device), size)
        x = normalize(x, self.bundle).to(self.bundle.dtype)
        windows = slide_windows(size[0], size[1], self.crop, self.stride)
        hw, ww = windows[0][2] - windows[0][0], windows[0][3] - windows[0][1]
        grid = forward.patch_grid(self.bundle.visual, hw, ww)
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(
                f"the image is {size[0]} x {size[1]} px after resizing (short_side="
                f"{self.short_side}), smaller than one {self.bundle.patch_size} px patch; raise "
                "short_side."
            )
        return Prepared(x, windows, grid, (hw, ww), (h0, w0))

    @torch.no_grad()
    def _logits(self, img: torch.Tensor) -> torch.Tensor:
        """img: (3, H, W) in [0, 1] -> (Q, h, w) window-averaged logits (steps 1-4)."""
        self.queries  # noqa: B018 - embeds on first use
        emb = self._query_emb
        assert emb is not None
        prep = self.prepare(img)
        st = Stitcher(emb.shape[0], tuple(prep.pixels.shape[-2:]), device=self.bundle.device)
        for crops, chunk in prep.batches(self.batch_size):
            feats = self.encoder.encode_patches(crops) if self.fwd_hooks is None else \
                self.encoder.encode_patches(crops, self.fwd_hooks)
            st.add(window_logits(feats, emb, prep.grid, prep.window_size), chunk)
        return st.result()

    def _scores(self, img: torch.Tensor, keep_image: bool = True) -> SegmentationScores:
        return SegmentationScores(
            logits=self._logits(img),
            size=(int(img.shape[-2]), int(img.shape[-1])),
            query_to_class=self.queries.query_to_class.clone(),
            class_names=list(self.class_names),
            image=_uint8(img) if keep_image else None,
        )

    def predict_logits(self, image: ImageSource) -> SegmentationScores:
        """Steps 1-4: the expensive part, without post-processing.

        image: a path, PIL image, (H, W, 3) array or (3, H, W) tensor in [0, 1] ->
        :class:`SegmentationScores` (logits (Q, h, w) at the inference resolution, on the CPU).
        Pass it to :meth:`postprocess` (any number of times, with other thresholds).
        """
        return self._scores(_to_image(image)).to("cpu")

    def _post(self, scores: SegmentationScores, logit_scale: float | None,
              prob_thd: float | None, area_thd: float | None | _Keep
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Steps 5-6 on the model's device: (labels, probs, the values used)."""
        ls = self.logit_scale if logit_scale is None else float(logit_scale)
        pt = self.prob_thd if prob_thd is None else float(prob_thd)
        at = self.area_thd if isinstance(area_thd, _Keep) else area_thd
        self._check_post(ls, pt, at)
        up = scores.to(self.bundle.device).upsampled()
        labels, probs = postprocess(up, scores.query_to_class, logit_scale=ls, prob_thd=pt,
                                    area_thd=at, num_classes=len(scores.class_names))
        return labels, probs, {"logit_scale": ls, "prob_thd": pt, "area_thd": at}

    def postprocess(
        self,
        scores: SegmentationScores,
        *,
        logit_scale: float | None = None,
        prob_thd: float | None = None,
        area_thd: float | None | _Keep = KEEP,
    ) -> Segmentation:
        """Steps 5-6 on cached scores; keyword overrides replace the segmenter's values
        (``area_thd=None`` switches the area threshold off; leave it out to keep the
        segmenter's)."""
        labels, probs, params = self._post(scores, logit_scale, prob_thd, area_thd)
        return Segmentation(labels=labels.cpu(), probs=probs.cpu(),
                            class_names=list(scores.class_names), image=scores.image,
                            params=params, model=image_tag(self.bundle))

    def segment_window(self, features: torch.Tensor, grid: tuple[int, int],
                       image: np.ndarray | None = None) -> Segmentation:
        """Steps 3-6 for an image that is a single window whose patch features are known.

        features: (N, D) or (1, N, D) patch features on ``grid`` (gh, gw); the labels cover the
        grid's pixel extent (gh p, gw p). image: (H, W, 3) uint8 for overlays. Figures that
        already hold an encoder's features use this instead of encoding again.
        """
        self.queries  # noqa: B018 - embeds on first use
        feats = features if features.ndim == 3 else features[None]
        size = (grid[0] * self.bundle.patch_size, grid[1] * self.bundle.patch_size)
        st = Stitcher(self._query_emb.shape[0], size, device=self.bundle.device)
        st.add(window_logits(feats.to(self.bundle.device), self._query_emb, grid, size),
               [(0, 0, *size)])
        scores = SegmentationScores(st.result(), size, self.queries.query_to_class.clone(),
                                    list(self.class_names), image)
        return self.postprocess(scores)

    def predict(self, image: ImageSource) -> Segmentation:
        """Segment one image: :meth:`predict_logits` then :meth:`postprocess`."""
        return self.postprocess(self.predict_logits(image))

    __call__ = predict

    def predict_labels(self, image: ImageSource) -> torch.Tensor:
        """Only the label map (H, W) int64 on the CPU (evaluation's fast path: the scores and
        probabilities stay on the device)."""
        return self._post(self._scores(_to_image(image), keep_image=False), None, None,
                          KEEP)[0].cpu()

    def __repr__(self) -> str:
        p = self.params()
        return (
            f"Segmenter(method={self.method!r}, model={self.bundle.label!r}, "
            f"classes={self.num_classes}, "
            + ", ".join(f"{k}={v!r}" for k, v in p.items() if k != "templates")
            + f", batch_size={self.batch_size})"
        )


def save_segmentation(seg: Segmentation, out_dir: str | os.PathLike[str], stem: str,
                      alpha: float = 0.5) -> tuple[Path, Path]:
    """Write ``{stem}_labels.png`` (palette PNG of class indices) and ``{stem}_overlay.png``
    into ``out_dir``; returns both paths.

    Both carry the model's PNG text chunks (:func:`sfp.core.io.save_png`); for random or
    synthetic weights the overlay also gets a banner above the picture (the label map's
    pixels stay class indices).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lab_path = out / f"{stem}_labels.png"
    ov_path = out / f"{stem}_overlay.png"
    save_png(seg.label_image(), lab_path, seg.model or None, banner=False)
    save_png(seg.overlay(alpha), ov_path, seg.model or None)
    return lab_path, ov_path
