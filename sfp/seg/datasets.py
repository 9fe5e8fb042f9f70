"""Readers for the eight segmentation benchmarks, in mmsegmentation's folder layouts.

``load_dataset(name, root)`` returns a :class:`SegDataset`; each item is a :class:`Sample`
with the RGB image ``(H, W, 3) uint8`` and the label map ``(H, W) int64`` (values in
``[0, num_classes)`` or ``255`` = ignore), with ``reduce_zero_label`` already applied, so the
label is what the metric compares the prediction against.

Label PNGs are read as stored values (for VOC's palette PNGs: the palette *indices*, not
colours). ``reduce_zero_label`` follows mmseg: raw 0 -> 255, every other value minus 1,
255 stays 255.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sfp.core.errors import SFPError
from sfp.seg.benchmarks import DatasetSpec, get_benchmark

__all__ = [
    "COCO_OBJECT_FORMAT",
    "COCO_OBJECT_MARKER",
    "IGNORE_INDEX",
    "DatasetLayoutError",
    "Sample",
    "SegDataset",
    "ToyDataset",
    "apply_reduce_zero_label",
    "load_dataset",
    "prepare_coco_object",
]

IGNORE_INDEX = 255


class DatasetLayoutError(SFPError, FileNotFoundError):
    """A benchmark root is missing or not laid out as expected (message shows the tree)."""


@dataclass(frozen=True, eq=False)
class Sample:
    """One benchmark image: ``image (H, W, 3) uint8 RGB``, ``label (H, W) int64``, id."""

    image: np.ndarray
    label: np.ndarray
    name: str


def _read_label(path: Path) -> np.ndarray:
    """Stored values of a single-channel (``L``/``P``/``I``) label PNG as ``(H, W) int64``."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            raise ValueError(
                f"label {path} has PIL mode {im.mode!r}; expected a single-channel index PNG "
                "(mode 'L' or palette 'P'). Colour-coded label images must be converted first."
            )
        return np.asarray(im).astype(np.int64)


def _read_image(path: Path) -> np.ndarray:
    """RGB image as ``(H, W, 3) uint8``."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def apply_reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's mapping for ``(H, W)`` labels: 0 -> 255, 255 -> 255, other v -> v - 1."""
    out = label.astype(np.int64, copy=True)
    out[label == 0] = IGNORE_INDEX + 1
    out -= 1
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


def _layout_error(spec: DatasetSpec, split: str, root: Path, missing: Path, what: str) -> str:
    msg = (
        f"{spec.name}: {what}: {missing}\n"
        f"given root: {root}\n\n"
        f"Expected layout for {spec.name!r} (split {split!r}):\n\n"
        f"{spec.expected_tree(split)}\n"
    )
    if spec.hint:
        msg += f"\n{spec.hint}\n"
    return msg


class _Samples:
    """What both benchmark readers share: ``names``, length, iteration, range-checked
    indices and the class names of ``benchmark``."""

    benchmark: str
    names: list[str]

    @property
    def class_names(self) -> list[str]:
        """Display names of the ``num_classes`` classes (from ``sfp/data/{name}.txt``)."""
        return get_benchmark(self.benchmark).class_names()

    def __len__(self) -> int:
        return len(self.names)

    def _index(self, i: int) -> int:
        """``i`` (negative counts from the end) as 0..len-1; IndexError outside."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        return i % len(self)

    def __getitem__(self, i: int) -> Sample:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


class SegDataset(_Samples):
    """A benchmark split, read lazily: ``ds[i] -> Sample``, ``len(ds)``, iteration.

    Attributes:
        benchmark: benchmark name (one of :data:`sfp.seg.benchmarks.BENCHMARKS`).
        root: the resolved dataset root.
        split: split name (``"val"``).
        names: sorted sample ids.
        num_classes, reduce_zero_label, ignore_index: evaluation settings.
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(self, spec: DatasetSpec, root: str | os.PathLike[str], split: str = "val") -> None:
        self.spec = spec
        self.split = split
        self.benchmark = spec.name
        self.num_classes = spec.num_classes
        self.reduce_zero_label = spec.reduce_zero_label
        self.root = self._find_root(Path(root).expanduser())
        img_dir, ann_dir, _ = spec.resolve(split)
        self.img_dir = self.root / img_dir
        self.ann_dir = self.root / ann_dir
        self.names: list[str] = self._list_ids()
        self._check_labels()

    # -- layout ------------------------------------------------------------------------------
    def _required(self, root: Path) -> list[tuple[Path, str]]:
        img_dir, ann_dir, split_file = self.spec.resolve(self.split)
        req = [
            (root, "dataset root does not exist"),
            (root / img_dir, "image folder not found"),
            (root / ann_dir, "label folder not found"),
        ]
        if split_file is not None:
            req.append((root / split_file, "split file not found"))
        return req

    def _find_root(self, root: Path) -> Path:
        candidates = [root] + [root / sub for sub in self.spec.root_subdirs]
        for cand in candidates:
            if all(p.exists() for p, _ in self._required(cand)):
                return cand
        # Report against the candidate that got furthest (the given root when none did).
        best, best_n = root, -1
        for cand in candidates:
            n = 0
            for p, _ in self._required(cand):
                if not p.exists():
                    break
                n += 1
            if n > best_n:
                best, best_n = cand, n
        path, what = next((p, w) for p, w in self._required(best) if not p.exists())
        raise DatasetLayoutError(_layout_error(self.spec, self.split, root, path, what))

    def _list_ids(self) -> list[str]:
        _, _, split_file = self.spec.resolve(self.split)
        if split_file is not None:
            path = self.root / split_file
            ids = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            ids = sorted(i for i in ids if i)
            if not ids:
                raise DatasetLayoutError(
                    _layout_error(self.spec, self.split, self.root, path, "split file is empty")
                )
            return ids
        suffix = self.spec.img_suffix
        pattern = f"**/*{suffix}" if self.spec.recursive else f"*{suffix}"
        ids = sorted(
            p.relative_to(self.img_dir).as_posix()[: -len(suffix)]
            for p in self.img_dir.glob(pattern)
            if p.is_file()
        )
        if not ids:
            raise DatasetLayoutError(
                _layout_error(
                    self.spec, self.split, self.root, self.img_dir, f"no *{suffix} images in"
                )
            )
        return ids

    def _check_labels(self) -> None:
        """Every id needs its image and label; report the first few that lack one."""
        problems: list[str] = []
        count = 0
        for i in range(len(self.names)):
            img, lab = self.image_path(i), self.label_path(i)
            if not img.is_file():
                count += 1
                if len(problems) < 5:
                    problems.append(f"  image missing: {img} (listed in the split file)")
            elif not lab.is_file():
                count += 1
                if len(problems) < 5:
                    problems.append(f"  image {img}\n    has no label: expected {lab}")
        if count:
            more = f"\n  ... and {count - len(problems)} more" if count > len(problems) else ""
            raise DatasetLayoutError(
                f"{self.benchmark}: {count} of {len(self.names)} samples in {self.root} lack "
                f"their image or label file:\n" + "\n".join(problems) + more
            )

    # -- access ------------------------------------------------------------------------------
    def image_path(self, i: int) -> Path:
        """Image file of sample ``i``."""
        return self.img_dir / f"{self.names[i]}{self.spec.img_suffix}"

    def label_path(self, i: int) -> Path:
        """Label file of sample ``i``."""
        return self.ann_dir / f"{self.names[i]}{self.spec.seg_map_suffix}"

    def read_label(self, i: int) -> np.ndarray:
        """Label map of sample ``i`` as evaluated: ``(H, W) int64``, 255 = ignore."""
        label = _read_label(self.label_path(i))
        return apply_reduce_zero_label(label) if self.reduce_zero_label else label

    def __getitem__(self, i: int) -> Sample:
        i = self._index(i)
        image = _read_image(self.image_path(i))
        label = self.read_label(i)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"{self.benchmark} sample {self.names[i]!r}: image {image.shape[:2]} and label "
                f"{label.shape} sizes differ ({self.image_path(i)}, {self.label_path(i)})"
            )
        return Sample(image=image, label=label, name=self.names[i])

    def __repr__(self) -> str:
        return (
            f"SegDataset({self.benchmark!r}, root={str(self.root)!r}, split={self.split!r}, "
            f"n={len(self)}, num_classes={self.num_classes})"
        )


class ToyDataset(_Samples):
    """The generated toy benchmark (:func:`sfp.models.toy.toy_scenes`): ``n`` scenes of
    128 px with their texture masks, scene ``i`` a function of ``(split, i)`` alone (so
    ``--limit`` takes a prefix of the same scenes). Same interface as :class:`SegDataset`.
    """

    ignore_index: int = IGNORE_INDEX
    #: Scenes per split and the seed offset of each split (training uses seeds < 10**8).
    SPLITS: dict[str, tuple[int, int]] = {"val": (100, 10**9), "test": (500, 2 * 10**9)}

    def __init__(self, split: str = "val", n: int | None = None) -> None:
        if split not in self.SPLITS:
            raise DatasetLayoutError(f"The toy benchmark has splits {sorted(self.SPLITS)}, not "
                                     f"{split!r}.")
        size, self.offset = self.SPLITS[split]
        self.split = split
        self.benchmark = "toy"
        self.num_classes = get_benchmark("toy").num_classes
        self.reduce_zero_label = False
        self.root = None
        self.source = f"generated: toy {split}, seeds {self.offset}+i"
        self.names = [f"{split}_{i:04d}" for i in range(size if n is None else int(n))]

    def image_path(self, i: int) -> str:
        return f"<generated scene {self.names[i]}>"

    def __getitem__(self, i: int) -> Sample:
        from sfp.models.toy import toy_scenes

        i = self._index(i)
        scene = toy_scenes(1, self.offset + i)
        image = (scene.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Sample(image=image, label=scene.labels[0].numpy(), name=self.names[i])

    def __repr__(self) -> str:
        return f"ToyDataset(split={self.split!r}, n={len(self)}, num_classes={self.num_classes})"


def load_dataset(name: str, root: str | os.PathLike[str] | None = None,
                 split: str = "val") -> SegDataset | ToyDataset:
    """Open benchmark ``name`` (one of :data:`sfp.seg.benchmarks.BENCHMARKS`) under ``root``
    (the generated toy benchmark needs no root and ignores it).

    Raises:
        ValueError: unknown name.
        DatasetLayoutError: no root for a benchmark read from files; missing root / folder /
            split file (message shows the expected tree), an empty split, or a sample without
            its image or label.
    """
    bench = get_benchmark(name)
    if bench.generated:
        return ToyDataset(split)
    if root is None:
        raise DatasetLayoutError(f"{bench.name} is read from files: give its root (--data-root "
                                 f"DIR), laid out as\n\n{bench.layout.expected_tree(split)}")
    return SegDataset(bench.layout, root, split)


#: Version of the COCO-Object label rule; written to :data:`COCO_OBJECT_MARKER` in the output
#: folder once every label there follows it. Version 2: unlabeled pixels (255) are background.
COCO_OBJECT_FORMAT = 2
COCO_OBJECT_MARKER = ".sfp-coco-object-format"


def _coco_object_label(stuff: np.ndarray) -> np.ndarray:
    """COCO-Stuff164k train ids ``(H, W)`` -> COCO-Object labels ``(H, W) uint8``.

    Things (train ids 0..79, the raw COCO-Stuff ids 0..90) -> 1..80; everything else -> 0
    (background): stuff (train ids 80..170, raw ids 91..181) and unlabeled (255). This is the
    rule of the converter the SFP/SC-CLIP releases point to (``datasets/cvt_coco_object.py``:
    raw ids <= 90 -> train id + 1, every raw id > 90, 255 included, -> 0); mmsegmentation's
    ``*_labelTrainIds.png`` are the raw ids through the same train-id table (255 kept), so
    reading them gives the same labels.
    """
    out = np.zeros(stuff.shape, dtype=np.uint8)
    thing = (stuff >= 0) & (stuff <= 79)
    out[thing] = (stuff[thing] + 1).astype(np.uint8)
    return out


def _coco_object_format(dst_dir: Path) -> int | None:
    """The label rule version recorded in ``dst_dir`` (None: no marker, i.e. the old rule that
    kept 255 as ignore, or an unfinished run)."""
    try:
        return int((dst_dir / COCO_OBJECT_MARKER).read_text().strip())
    except (OSError, ValueError):
        return None


def prepare_coco_object(
    stuff_root: str | os.PathLike[str],
    out_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
    split: str = "val",
) -> int:
    """Derive COCO-Object labels from COCO-Stuff164k's ``*_labelTrainIds.png``.

    Reads ``stuff_root/annotations/{split}2017/{id}_labelTrainIds.png`` and writes
    ``(out_root or stuff_root)/annotations/{split}2017/{id}_instanceTrainIds.png`` (things
    0..79 -> 1..80, stuff and unlabeled -> 0; see :func:`_coco_object_label`). Files are written
    atomically; when every label is written, the folder gets the marker file
    :data:`COCO_OBJECT_MARKER` holding :data:`COCO_OBJECT_FORMAT`. Existing outputs are skipped
    only when the marker says they follow the current rule; otherwise (labels written by an
    older sfp, which kept 255 as ignore, or an interrupted run) all are regenerated.
    When ``out_root`` is given and lacks ``images/{split}2017``, a symlink to the
    source images is created (if the platform allows), so ``out_root`` loads as
    ``coco_object``.

    Returns:
        The number of label files written.
    """
    spec = get_benchmark("coco_stuff164k").layout
    given = Path(stuff_root).expanduser()
    _, ann_rel, _ = spec.resolve(split)
    src_root = next(
        (c for c in [given] + [given / s for s in spec.root_subdirs] if (c / ann_rel).is_dir()),
        None,
    )
    if src_root is None:
        missing = given if not given.exists() else given / ann_rel
        what = "dataset root does not exist" if not given.exists() else "label folder not found"
        raise DatasetLayoutError(_layout_error(spec, split, given, missing, what))
    src_dir = src_root / ann_rel
    sources = sorted(src_dir.glob(f"*{spec.seg_map_suffix}"))
    if not sources:
        raise DatasetLayoutError(
            _layout_error(spec, split, given, src_dir, f"no *{spec.seg_map_suffix} labels in")
        )
    dst_root = Path(out_root).expanduser() if out_root is not None else src_root
    dst_dir = dst_root / get_benchmark("coco_object").layout.resolve(split)[1]
    dst_dir.mkdir(parents=True, exist_ok=True)
    if out_root is not None:
        img_rel = spec.resolve(split)[0]
        src_img, dst_img = src_root / img_rel, dst_root / img_rel
        if src_img.is_dir() and not dst_img.exists():
            dst_img.parent.mkdir(parents=True, exist_ok=True)
            try:
                dst_img.symlink_to(src_img.resolve(), target_is_directory=True)
            except OSError:
                pass

    obj_suffix = get_benchmark("coco_object").layout.seg_map_suffix
    written = 0
    total = len(sources)
    current = _coco_object_format(dst_dir) == COCO_OBJECT_FORMAT
    for k, src in enumerate(sources, 1):
        ident = src.name[: -len(spec.seg_map_suffix)]
        dst = dst_dir / f"{ident}{obj_suffix}"
        if not (current and dst.exists()):
            label = _coco_object_label(_read_label(src))
            tmp = dst.with_name(dst.name + ".tmp")
            Image.fromarray(label).save(tmp, format="PNG")
            os.replace(tmp, dst)
            written += 1
        if progress and (k % 500 == 0 or k == total):
            print(
                f"\rprepare_coco_object: {k}/{total} labels ({written} written)",
                end="\n" if k == total else "",
                file=sys.stderr,
                flush=True,
            )
    if not current:
        marker = dst_dir / COCO_OBJECT_MARKER
        marker.with_name(marker.name + ".tmp").write_text(f"{COCO_OBJECT_FORMAT}\n")
        os.replace(marker.with_name(marker.name + ".tmp"), marker)
    return written
