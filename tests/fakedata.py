"""Tiny fake benchmark folders in mmsegmentation's layouts, for tests (no downloads).

``make_fake_dataset(name, base)`` writes ``n`` random images and label PNGs under ``base``
in the layout of benchmark ``name`` and returns the root to pass to
``sfp.seg.datasets.load_dataset(name, root)``.

Every raw label map holds valid class values, the ignore value 255 (pixel ``[0, 0]``) and,
for ``reduce_zero_label`` benchmarks, raw 0s (pixel ``[0, 1]``; they become 255 when read).
VOC labels are palette PNGs, as in the real dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sfp.seg.benchmarks import file_benchmarks, get_benchmark

BENCHMARK_NAMES = tuple(file_benchmarks())

__all__ = ["FAKE_ROOTS", "fake_ids", "make_fake_dataset", "voc_palette", "write_label"]

# Where, under the base folder, each benchmark's root goes.
FAKE_ROOTS: dict[str, str] = {
    "voc21": "VOCdevkit/VOC2012",
    "voc20": "VOCdevkit/VOC2012",
    "context60": "VOCdevkit/VOC2010",
    "context59": "VOCdevkit/VOC2010",
    "coco_object": "coco_stuff164k",
    "coco_stuff164k": "coco_stuff164k",
    "cityscapes": "cityscapes",
    "ade20k": "ADEChallengeData2016",
}


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat 768-entry PIL palette (index i -> RGB)."""
    pal: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_label(path: Path, label: np.ndarray, palette: bool = False) -> None:
    """Write a ``(H, W)`` label map with values in 0..255 as an 8-bit (palette) PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(label, dtype=np.uint8))
    if palette:
        im = im.convert("P")  # 'L' -> 'P' keeps the values as palette indices
        im.putpalette(voc_palette())
    im.save(path, format="PNG")


def fake_ids(name: str, n: int) -> list[str]:
    """Plausible sample ids for benchmark ``name`` (cityscapes ids include the city)."""
    if name in ("voc21", "voc20"):
        return [f"2007_{i:06d}" for i in range(n)]
    if name in ("context60", "context59"):
        return [f"2008_{i:06d}" for i in range(n)]
    if name in ("coco_object", "coco_stuff164k"):
        return [f"{139 + i:012d}" for i in range(n)]
    if name == "cityscapes":
        cities = ("frankfurt", "lindau")
        return [f"{cities[i % 2]}/{cities[i % 2]}_{i:06d}_000019" for i in range(n)]
    if name == "ade20k":
        return [f"ADE_val_{i + 1:08d}" for i in range(n)]
    raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARK_NAMES)}")


def make_fake_dataset(
    name: str, root: str | Path, n: int = 3, size: tuple[int, int] = (12, 16), seed: int = 0
) -> Path:
    """Write ``n`` fake samples of benchmark ``name`` under ``root``; return the dataset root.

    Args:
        name: one of ``sfp.seg.benchmarks.BENCHMARKS``.
        root: base folder; the dataset goes to ``root / FAKE_ROOTS[name]``.
        n: number of samples (all listed in the split file, where the benchmark has one).
        size: ``(H, W)`` of every image and label.
        seed: images depend on ``(seed, i)`` only, labels also on the benchmark.

    Returns:
        The path to pass to ``load_dataset(name, path)``.
    """
    spec = get_benchmark(name).layout
    if size[0] < 1 or size[1] < 4:
        raise ValueError(f"size must be at least (1, 4), got {size}")
    ds_root = Path(root) / FAKE_ROOTS[name]
    img_dir, ann_dir, split_file = spec.resolve("val")
    h, w = size
    ids = fake_ids(name, n)
    # Raw stored values: [0, C) as-is, or 0..C with 0 dropped by reduce_zero_label.
    hi = spec.num_classes + 1 if spec.reduce_zero_label else spec.num_classes
    for i, ident in enumerate(ids):
        img_rng = np.random.default_rng([seed, i])
        image = img_rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        img_path = ds_root / img_dir / f"{ident}{spec.img_suffix}"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(img_path, format="JPEG" if img_path.suffix == ".jpg" else "PNG")

        lab_rng = np.random.default_rng([seed, i, BENCHMARK_NAMES.index(name)])
        label = lab_rng.integers(0, hi, size=(h, w))
        label[0, 0] = 255
        if spec.reduce_zero_label:
            label[0, 1] = 0
        label[0, 2] = hi - 1  # the largest raw class value
        label[0, 3] = 1
        write_label(
            ds_root / ann_dir / f"{ident}{spec.seg_map_suffix}",
            label,
            palette=name in ("voc21", "voc20"),
        )
    if split_file is not None:
        path = ds_root / split_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{ident}\n" for ident in ids), encoding="utf-8")
    return ds_root
