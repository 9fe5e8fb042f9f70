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

__all__ = [
    "BENCHMARKS",
    "DATASETS",
    "DatasetLayoutError",
    "DatasetSpec",
    "Sample",
    "SegDataset",
    "apply_reduce_zero_label",
    "class_file",
    "class_names",
    "get_spec",
    "load_dataset",
    "prepare_coco_object",
]

IGNORE_INDEX = 255

BENCHMARKS: tuple[str, ...] = (
    "voc21",
    "voc20",
    "context60",
    "context59",
    "coco_object",
    "coco_stuff164k",
    "cityscapes",
    "ade20k",
)

_DATA_DIR = Path(__file__).resolve().parents[1] / "data"


class DatasetLayoutError(FileNotFoundError):
    """A benchmark root is missing or not laid out as expected (message shows the tree)."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where one benchmark's files live, relative to its root.

    Paths may contain ``{split}``, replaced by the split name (or its ``split_alias``). A sample
    ``id`` maps to ``root/img_dir/{id}{img_suffix}`` and ``root/ann_dir/{id}{seg_map_suffix}``;
    ids come from ``split_file`` (one per line) or, when it is None, from scanning ``img_dir``
    (recursively when ``recursive``; an id then includes its sub-folder, e.g. ``city/name``).
    """

    name: str
    num_classes: int
    img_dir: str
    ann_dir: str
    img_suffix: str
    seg_map_suffix: str
    split_file: str | None
    reduce_zero_label: bool
    root_display: str
    """Conventional root path, shown in error messages (e.g. ``VOCdevkit/VOC2012``)."""
    root_subdirs: tuple[str, ...] = ()
    """Sub-folders of a given root also tried as the real root (e.g. ``VOC2012``)."""
    recursive: bool = False
    split_alias: tuple[tuple[str, str], ...] = ()
    """``(split, folder name)`` pairs, e.g. ADE20K's ``("val", "validation")``."""
    id_pattern: str = "{id}"
    """How an id looks, for messages (cityscapes: ``{city}/{id}``)."""
    label_note: str = ""
    hint: str = ""
    """How to produce this layout (shown in error messages)."""
    has_background: bool = False
    """Label 0 is a background class (voc21, context60, coco_object)."""

    def resolve(self, split: str) -> tuple[str, str, str | None]:
        """``(img_dir, ann_dir, split_file)`` for ``split``, relative to the root."""
        s = dict(self.split_alias).get(split, split)
        split_file = self.split_file.format(split=s) if self.split_file is not None else None
        return self.img_dir.format(split=s), self.ann_dir.format(split=s), split_file

    def expected_tree(self, split: str = "val") -> str:
        """ASCII tree of the expected layout for ``split``."""
        img_dir, ann_dir, split_file = self.resolve(split)
        entries = [
            (f"{img_dir}/", f"{self.id_pattern}{self.img_suffix}  (RGB images)"),
            (f"{ann_dir}/", f"{self.id_pattern}{self.seg_map_suffix}  ({self.label_note})"),
        ]
        if split_file is not None:
            entries.append((split_file, "sample ids, one per line"))
        width = max(len(e[0]) for e in entries) + 6
        lines = [f"{self.root_display}/   <- root"]
        for k, (path, note) in enumerate(entries):
            branch = "`-- " if k == len(entries) - 1 else "|-- "
            lines.append(f"{branch}{path}".ljust(width) + note)
        return "\n".join(lines)


_VOC_LABEL = "palette PNG; palette indices are the labels, 255 = ignore"


def _voc(name: str, num_classes: int, reduce: bool) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        num_classes=num_classes,
        img_dir="JPEGImages",
        ann_dir="SegmentationClass",
        img_suffix=".jpg",
        seg_map_suffix=".png",
        split_file="ImageSets/Segmentation/{split}.txt",
        reduce_zero_label=reduce,
        root_display="VOCdevkit/VOC2012",
        root_subdirs=("VOC2012", "VOCdevkit/VOC2012"),
        label_note=_VOC_LABEL + (", 0 = background (dropped)" if reduce else ""),
        hint="Pass the VOC2012 folder or its parent VOCdevkit.",
        has_background=not reduce,
    )


def _context(name: str, num_classes: int, reduce: bool) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        num_classes=num_classes,
        img_dir="JPEGImages",
        ann_dir="SegmentationClassContext",
        img_suffix=".jpg",
        seg_map_suffix=".png",
        split_file="ImageSets/SegmentationContext/{split}.txt",
        reduce_zero_label=reduce,
        root_display="VOCdevkit/VOC2010",
        root_subdirs=("VOC2010", "VOCdevkit/VOC2010"),
        label_note="0 = background" + (" (dropped)" if reduce else "") + ", 1..59 classes",
        hint=(
            "Pass the VOC2010 folder or its parent VOCdevkit. SegmentationClassContext and "
            "ImageSets/SegmentationContext come from mmsegmentation's "
            "tools/dataset_converters/pascal_context.py (needs trainval_merged.json)."
        ),
        has_background=not reduce,
    )


def _coco(
    name: str, num_classes: int, suffix: str, note: str, hint: str, background: bool
) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        num_classes=num_classes,
        img_dir="images/{split}2017",
        ann_dir="annotations/{split}2017",
        img_suffix=".jpg",
        seg_map_suffix=suffix,
        split_file=None,
        reduce_zero_label=False,
        root_display="coco_stuff164k",
        root_subdirs=("coco_stuff164k",),
        label_note=note,
        hint=hint,
        has_background=background,
    )


DATASETS: dict[str, DatasetSpec] = {
    "voc21": _voc("voc21", 21, reduce=False),
    "voc20": _voc("voc20", 20, reduce=True),
    "context60": _context("context60", 60, reduce=False),
    "context59": _context("context59", 59, reduce=True),
    "coco_object": _coco(
        "coco_object",
        81,
        "_instanceTrainIds.png",
        "0 = background, 1..80 things, 255 = ignore",
        "Derive the *_instanceTrainIds.png labels from COCO-Stuff164k's *_labelTrainIds.png "
        "with sfp.seg.datasets.prepare_coco_object(root).",
        background=True,
    ),
    "coco_stuff164k": _coco(
        "coco_stuff164k",
        171,
        "_labelTrainIds.png",
        "0..170 train ids, 255 = ignore",
        "Create *_labelTrainIds.png with mmsegmentation's "
        "tools/dataset_converters/coco_stuff164k.py.",
        background=False,
    ),
    "cityscapes": DatasetSpec(
        name="cityscapes",
        num_classes=19,
        img_dir="leftImg8bit/{split}",
        ann_dir="gtFine/{split}",
        img_suffix="_leftImg8bit.png",
        seg_map_suffix="_gtFine_labelTrainIds.png",
        split_file=None,
        reduce_zero_label=False,
        root_display="cityscapes",
        root_subdirs=("cityscapes",),
        recursive=True,
        id_pattern="{city}/{id}",
        label_note="0..18 train ids, 255 = ignore",
        hint=(
            "Create *_gtFine_labelTrainIds.png with cityscapesscripts' createTrainIdLabelImgs "
            "(or mmsegmentation's tools/dataset_converters/cityscapes.py)."
        ),
    ),
    "ade20k": DatasetSpec(
        name="ade20k",
        num_classes=150,
        img_dir="images/{split}",
        ann_dir="annotations/{split}",
        img_suffix=".jpg",
        seg_map_suffix=".png",
        split_file=None,
        reduce_zero_label=True,
        root_display="ADEChallengeData2016",
        root_subdirs=("ADEChallengeData2016",),
        split_alias=(("val", "validation"), ("train", "training")),
        label_note="0 = other (dropped), 1..150 classes",
        hint="Unzip ADEChallengeData2016.zip and pass the ADEChallengeData2016 folder.",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of benchmark ``name`` (ValueError listing valid names)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}"
        ) from None


def class_file(name: str) -> Path:
    """Path of the class-name file ``sfp/data/{name}.txt`` (one class per line)."""
    get_spec(name)
    return _DATA_DIR / f"{name}.txt"


def class_names(name: str) -> list[str]:
    """One display name per class: the first synonym of each line of the class file.

    Label 0 of the benchmarks with a background class (voc21, context60, coco_object), whose
    line lists many stuff names, is shown as ``background``.
    """
    lines = [ln.strip() for ln in class_file(name).read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    names = [ln.split(",")[0].strip() for ln in lines]
    if names and get_spec(name).has_background:
        names[0] = "background"
    return names


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


class SegDataset:
    """A benchmark split, read lazily: ``ds[i] -> Sample``, ``len(ds)``, iteration.

    Attributes:
        benchmark: benchmark name (a key of :data:`DATASETS`).
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

    @property
    def class_names(self) -> list[str]:
        """Display names of the ``num_classes`` classes (from ``sfp/data/{name}.txt``)."""
        return class_names(self.benchmark)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i %= len(self)
        image = _read_image(self.image_path(i))
        label = self.read_label(i)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"{self.benchmark} sample {self.names[i]!r}: image {image.shape[:2]} and label "
                f"{label.shape} sizes differ ({self.image_path(i)}, {self.label_path(i)})"
            )
        return Sample(image=image, label=label, name=self.names[i])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"SegDataset({self.benchmark!r}, root={str(self.root)!r}, split={self.split!r}, "
            f"n={len(self)}, num_classes={self.num_classes})"
        )


def load_dataset(name: str, root: str | os.PathLike[str], split: str = "val") -> SegDataset:
    """Open benchmark ``name`` (one of :data:`BENCHMARKS`) under ``root``.

    Raises:
        ValueError: unknown name.
        DatasetLayoutError: missing root / folder / split file (message shows the expected
            tree), an empty split, or a sample without its image or label.
    """
    return SegDataset(get_spec(name), root, split)


def _coco_object_label(stuff: np.ndarray) -> np.ndarray:
    """COCO-Stuff164k train ids ``(H, W)`` -> COCO-Object labels ``(H, W) uint8``.

    Things 0..79 -> 1..80, stuff 80..170 -> 0 (background), anything else -> 255.
    """
    out = np.full(stuff.shape, IGNORE_INDEX, dtype=np.uint8)
    thing = (stuff >= 0) & (stuff <= 79)
    out[thing] = (stuff[thing] + 1).astype(np.uint8)
    out[(stuff >= 80) & (stuff <= 170)] = 0
    return out


def prepare_coco_object(
    stuff_root: str | os.PathLike[str],
    out_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
    split: str = "val",
) -> int:
    """Derive COCO-Object labels from COCO-Stuff164k's ``*_labelTrainIds.png``.

    Reads ``stuff_root/annotations/{split}2017/{id}_labelTrainIds.png`` and writes
    ``(out_root or stuff_root)/annotations/{split}2017/{id}_instanceTrainIds.png`` (things
    0..79 -> 1..80, stuff -> 0, 255 stays). Existing outputs are skipped; files are written
    atomically. When ``out_root`` is given and lacks ``images/{split}2017``, a symlink to the
    source images is created (if the platform allows), so ``out_root`` loads as
    ``coco_object``.

    Returns:
        The number of label files written.
    """
    spec = DATASETS["coco_stuff164k"]
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
    dst_dir = dst_root / DATASETS["coco_object"].resolve(split)[1]
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

    obj_suffix = DATASETS["coco_object"].seg_map_suffix
    written = 0
    total = len(sources)
    for k, src in enumerate(sources, 1):
        ident = src.name[: -len(spec.seg_map_suffix)]
        dst = dst_dir / f"{ident}{obj_suffix}"
        if not dst.exists():
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
    return written
