"""The one table of the eight benchmarks: layout, classes, background, released settings.

Each :class:`Benchmark` of :data:`BENCHMARKS` (a :class:`~sfp.core.registry.Registry`) holds
everything sfp knows about one benchmark:

- ``layout``: where its files live (:class:`DatasetSpec`, mmsegmentation's folder layouts),
  read by :mod:`sfp.seg.datasets`;
- its class list (``sfp/data/{name}.txt``, one class per line, synonyms separated by ", ",
  exactly as the releases ship them) and whether label 0 is a background class whose line lists
  many stuff names (voc21, context60, coco_object; shown as "background");
- ``settings``: the released segmentation hyper-parameters (:class:`Settings`), used by
  :meth:`sfp.seg.pipeline.Segmenter.for_benchmark`, and the prompt template set.

Sources of the settings: the SFP release's ``Kimsure/SFP SFP_ICCV/configs/cfg_*.py`` (commit
2804f5b; ``cfg_city_scapes.py`` for cityscapes). Every benchmark uses slide crop 224, stride 112
and ``Resize(scale=(2048, short_side))``; logit scale 40, probability threshold 0 and no area
threshold unless a config sets them. ADE20K's short side is 384 in the release's config (the
paper's text says 336).

Some settings depend on the method or the model (:meth:`Benchmark.settings_for`):

- per model: the configs' commented "for ViT-L/14" values (voc21 ``prob_thd=0.2``,
  coco_object ``prob_thd=0.25``), used when the model is a ViT-L/14;
- per method: SC-CLIP's ``SuleBai/SC-CLIP configs/cfg_ade20k.py`` resizes ADE20K to short
  side 336, so the method ``"sc-clip"`` uses 336 there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from importlib import resources
from typing import Any

from sfp.core.registry import Registry
from sfp.models.text import parse_classes, read_class_file

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "DatasetSpec",
    "Settings",
    "benchmark_classes",
    "class_list",
    "class_names",
    "file_benchmarks",
    "get_benchmark",
    "model_key",
]

BACKGROUND = "background"


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


def _pascal(name: str, num_classes: int, reduce: bool, year: int, task: str, note: str,
            hint: str) -> DatasetSpec:
    """A PASCAL layout: ``VOCdevkit/VOC{year}`` with ``SegmentationClass{task}`` labels and
    ``ImageSets/Segmentation{task}`` split files."""
    return DatasetSpec(
        name=name,
        num_classes=num_classes,
        img_dir="JPEGImages",
        ann_dir=f"SegmentationClass{task}",
        img_suffix=".jpg",
        seg_map_suffix=".png",
        split_file=f"ImageSets/Segmentation{task}/{{split}}.txt",
        reduce_zero_label=reduce,
        root_display=f"VOCdevkit/VOC{year}",
        root_subdirs=(f"VOC{year}", f"VOCdevkit/VOC{year}"),
        label_note=note,
        hint=hint,
    )


def _voc(name: str, num_classes: int, reduce: bool) -> DatasetSpec:
    return _pascal(name, num_classes, reduce, 2012, "",
                   _VOC_LABEL + (", 0 = background (dropped)" if reduce else ""),
                   "Pass the VOC2012 folder or its parent VOCdevkit.")


def _context(name: str, num_classes: int, reduce: bool) -> DatasetSpec:
    return _pascal(
        name, num_classes, reduce, 2010, "Context",
        "0 = background" + (" (dropped)" if reduce else "") + ", 1..59 classes",
        "Pass the VOC2010 folder or its parent VOCdevkit. SegmentationClassContext and "
        "ImageSets/SegmentationContext come from mmsegmentation's "
        "tools/dataset_converters/pascal_context.py (needs trainval_merged.json).",
    )


def _scanned(name: str, num_classes: int, img_dir: str, ann_dir: str, img_suffix: str,
             seg_suffix: str, note: str, hint: str, *, root: str | None = None,
             year: str = "", **extra: Any) -> DatasetSpec:
    """A layout without split files: ``{img_dir}/{split}{year}`` is scanned for images."""
    root = root or name
    return DatasetSpec(name=name, num_classes=num_classes, img_dir=f"{img_dir}/{{split}}{year}",
                       ann_dir=f"{ann_dir}/{{split}}{year}", img_suffix=img_suffix,
                       seg_map_suffix=seg_suffix, split_file=None,
                       reduce_zero_label=extra.pop("reduce_zero_label", False),
                       root_display=root, root_subdirs=(root,), label_note=note, hint=hint,
                       **extra)


def _coco(name: str, num_classes: int, suffix: str, note: str, hint: str) -> DatasetSpec:
    return _scanned(name, num_classes, "images", "annotations", ".jpg", suffix, note, hint,
                    root="coco_stuff164k", year="2017")


_LAYOUTS: dict[str, DatasetSpec] = {
    "voc21": _voc("voc21", 21, reduce=False),
    "voc20": _voc("voc20", 20, reduce=True),
    "context60": _context("context60", 60, reduce=False),
    "context59": _context("context59", 59, reduce=True),
    "coco_object": _coco(
        "coco_object",
        81,
        "_instanceTrainIds.png",
        "0 = background (stuff and unlabeled), 1..80 things",
        "Derive the *_instanceTrainIds.png labels from COCO-Stuff164k's *_labelTrainIds.png "
        "with sfp.seg.datasets.prepare_coco_object(root) (sfp prepare coco-object).",
    ),
    "coco_stuff164k": _coco(
        "coco_stuff164k",
        171,
        "_labelTrainIds.png",
        "0..170 train ids, 255 = ignore",
        "Create *_labelTrainIds.png with mmsegmentation's "
        "tools/dataset_converters/coco_stuff164k.py.",
    ),
    "cityscapes": _scanned(
        "cityscapes", 19, "leftImg8bit", "gtFine", "_leftImg8bit.png",
        "_gtFine_labelTrainIds.png", "0..18 train ids, 255 = ignore",
        "Create *_gtFine_labelTrainIds.png with cityscapesscripts' createTrainIdLabelImgs "
        "(or mmsegmentation's tools/dataset_converters/cityscapes.py).",
        recursive=True, id_pattern="{city}/{id}",
    ),
    "ade20k": _scanned(
        "ade20k", 150, "images", "annotations", ".jpg", ".png",
        "0 = other (dropped), 1..150 classes",
        "Unzip ADEChallengeData2016.zip and pass the ADEChallengeData2016 folder.",
        root="ADEChallengeData2016", reduce_zero_label=True,
        split_alias=(("val", "validation"), ("train", "training")),
    ),
}




@dataclass(frozen=True)
class Settings:
    """Segmentation hyper-parameters of a benchmark (see :class:`sfp.seg.pipeline.Segmenter`).

    short_side, max_long_side: resize rule; crop, stride: sliding windows; logit_scale,
    prob_thd, area_thd: post-processing (area_thd None = off).
    """

    short_side: int = 336
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    crop: int = 224
    stride: int = 112
    max_long_side: int = 2048

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of :class:`~sfp.seg.pipeline.Segmenter`."""
        return asdict(self)


Changes = tuple[tuple[str, Any], ...]
"""``((field of Settings, value), ...)``: what an override changes."""


def model_key(name: str) -> str:
    """An open_clip model name as the override tables key it: "/" -> "-", without a
    ``-quickgelu`` suffix (``"ViT-L/14"``, ``"ViT-L-14-quickgelu"`` -> ``"ViT-L-14"``)."""
    key = name.replace("/", "-")
    return key[: -len("-quickgelu")] if key.endswith("-quickgelu") else key


def _norm(name: str) -> str:
    return name.replace("_", "-").lower()


@dataclass(frozen=True)
class Benchmark:
    """One benchmark (see the module docstring).

    ``settings`` are the defaults; ``model_settings`` and ``method_settings`` hold
    ``(key, changes)`` pairs applied on top of them by :meth:`settings_for` (model keys as
    :func:`model_key` writes them, method keys as :func:`sfp.methods.encoders.make_encoder`
    names them).
    """

    name: str
    display: str
    layout: DatasetSpec
    has_background: bool
    settings: Settings
    templates: str = "openai80"
    source: str = ""
    model_settings: tuple[tuple[str, Changes], ...] = ()
    method_settings: tuple[tuple[str, Changes], ...] = ()
    generated: bool = False
    """Scenes generated from a seed (the toy benchmark): no files, no data root."""

    def settings_for(self, method: str | None = None, model: str | None = None) -> Settings:
        """The settings for ``method`` (e.g. ``"sfp"``, ``"sc-clip"``) on ``model`` (an
        open_clip name such as ``"ViT-L-14"``): the defaults, then the model's changes, then
        the method's. None or an unlisted key changes nothing."""
        out = self.settings
        for table, key in ((self.model_settings, model and model_key(model)),
                           (self.method_settings, method)):
            for k, changes in table:
                if key and _norm(k) == _norm(key):
                    out = replace(out, **dict(changes))
        return out

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    def classes(self) -> list[list[str]]:
        """The class list as released: one list of synonyms per class.

        Released lists may repeat a name across classes (coco_object: "bed" is both in the
        background line and a class); it is kept, so the query set matches the release.
        """
        with resources.as_file(resources.files("sfp") / "data" / f"{self.name}.txt") as p:
            return read_class_file(p, allow_duplicates=True)

    def class_names(self) -> list[str]:
        """One display name per class: the first synonym, and "background" for label 0 of the
        benchmarks with a background class."""
        names = [syns[0] for syns in self.classes()]
        if self.has_background:
            names[0] = BACKGROUND
        return names


#: The eight benchmarks (and the generated toy one) by name (value: :class:`Benchmark`).
BENCHMARKS: Registry[Benchmark] = Registry("benchmark")

_CFG = "Kimsure/SFP SFP_ICCV/configs/cfg_{}.py"
_VIT_L = "ViT-L-14"
for _name, _display, _bg, _settings, _cfg, _models, _methods in (
    ("voc21", "PASCAL VOC 2012 (21 classes)", True,
     Settings(logit_scale=50.0, prob_thd=0.15, area_thd=0.1), "voc21",
     ((_VIT_L, (("prob_thd", 0.2),)),), ()),
    ("voc20", "PASCAL VOC 2012 (20 classes)", False, Settings(), "voc20", (), ()),
    ("context60", "PASCAL Context (60 classes)", True, Settings(prob_thd=0.15), "context60",
     (), ()),
    ("context59", "PASCAL Context (59 classes)", False, Settings(), "context59", (), ()),
    ("coco_object", "COCO-Object", True, Settings(logit_scale=55.0, prob_thd=0.35),
     "coco_object", ((_VIT_L, (("prob_thd", 0.25),)),), ()),
    ("coco_stuff164k", "COCO-Stuff 164k", False, Settings(), "coco_stuff164k", (), ()),
    ("cityscapes", "Cityscapes", False, Settings(short_side=560), "city_scapes", (), ()),
    ("ade20k", "ADE20K", False, Settings(short_side=384), "ade20k", (),
     (("sc-clip", (("short_side", 336),)),)),
):
    _source = _CFG.format(_cfg)
    if _methods:
        _source += " (sc-clip: SuleBai/SC-CLIP configs/cfg_ade20k.py)"
    BENCHMARKS.register(_name, Benchmark(_name, _display, _LAYOUTS[_name], _bg, _settings,
                                         source=_source, model_settings=_models,
                                         method_settings=_methods), display=_display)
del _name, _display, _bg, _settings, _cfg, _models, _methods, _source

#: The generated benchmark of the toy CLIP (:mod:`sfp.models.toy`): scenes made from a seed,
#: no files (:class:`sfp.seg.datasets.ToyDataset`).
TOY_LAYOUT = DatasetSpec(
    name="toy", num_classes=6, img_dir="", ann_dir="", img_suffix="", seg_map_suffix="",
    split_file=None, reduce_zero_label=False, root_display="(generated)",
    label_note="texture index 0..5, 255 = ignore",
    hint="The toy benchmark is generated from a seed; it needs no --data-root.",
)
BENCHMARKS.register(
    "toy",
    Benchmark("toy", "Toy textures (generated)", TOY_LAYOUT, False,
              Settings(short_side=128, crop=128, stride=64), templates="toy",
              source="sfp's toy benchmark: 128 px generated scenes, one 128 px window",
              generated=True),
    display="Toy textures (generated)",
)


def file_benchmarks() -> list[str]:
    """Names of the benchmarks read from files (all but the generated toy one)."""
    return [n for n in BENCHMARKS.names() if not get_benchmark(n).generated]


def get_benchmark(name: str) -> Benchmark:
    """The :class:`Benchmark` called ``name`` ("voc21", "ade20k", ...; "-" and "_" alike);
    RegistryError listing the names and close matches."""
    return BENCHMARKS.get(name).value


def benchmark_classes(name: str) -> list[list[str]]:
    """The class list of benchmark ``name``, as released (see :meth:`Benchmark.classes`)."""
    return get_benchmark(name).classes()


def class_names(name: str) -> list[str]:
    """Display names of benchmark ``name``'s classes (see :meth:`Benchmark.class_names`)."""
    return get_benchmark(name).class_names()


def class_list(classes: Any) -> tuple[list[list[str]], list[str]]:
    """Any class specification -> (synonym lists, display names).

    classes: a benchmark name (its released list; label 0 shown as "background" where it is
    a background class) or anything :func:`sfp.models.text.parse_classes` takes (a class
    file, ``"cat; dog, puppy"``, a list of names or of synonym lists).
    """
    if isinstance(classes, str) and classes in BENCHMARKS:
        bench = get_benchmark(classes)
        return bench.classes(), bench.class_names()
    parsed = parse_classes(classes)
    return parsed, [syns[0] for syns in parsed]
