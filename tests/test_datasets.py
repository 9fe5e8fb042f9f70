"""Tests for sfp.seg.datasets on tiny fake benchmarks built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fakedata import FAKE_ROOTS, make_fake_dataset, write_label
from PIL import Image

from sfp.seg.benchmarks import class_names, file_benchmarks, get_benchmark
from sfp.seg.datasets import (
    COCO_OBJECT_FORMAT,
    COCO_OBJECT_MARKER,
    DatasetLayoutError,
    SegDataset,
    load_dataset,
    prepare_coco_object,
)

NAMES = tuple(file_benchmarks())

EXPECTED_CLASSES = {
    "voc21": 21,
    "voc20": 20,
    "context60": 60,
    "context59": 59,
    "coco_object": 81,
    "coco_stuff164k": 171,
    "cityscapes": 19,
    "ade20k": 150,
}


def test_registry_names() -> None:
    assert NAMES == tuple(EXPECTED_CLASSES)
    for name in NAMES:
        assert get_benchmark(name).layout.name == name == get_benchmark(name).name


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_match_class_files(name: str) -> None:
    path = Path(__file__).resolve().parents[1] / "sfp" / "data" / f"{name}.txt"
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert get_benchmark(name).num_classes == len(lines) == EXPECTED_CLASSES[name]
    names = class_names(name)
    assert len(names) == len(lines) and len(set(names)) == len(names)


def test_class_names_background() -> None:
    assert class_names("voc21")[:2] == ["background", "aeroplane"]
    assert class_names("coco_object")[:2] == ["background", "person"]
    assert class_names("context60")[0] == "background"
    assert class_names("voc20")[0] == "aeroplane"
    assert class_names("ade20k")[0] == "wall"


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'voc'.*voc21.*ade20k"):
        load_dataset("voc", tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_reads_every_layout(name: str, tmp_path: Path) -> None:
    root = make_fake_dataset(name, tmp_path, n=3, size=(12, 16))
    ds = load_dataset(name, root)
    spec = get_benchmark(name).layout
    assert isinstance(ds, SegDataset)
    assert (ds.benchmark, ds.num_classes, ds.ignore_index) == (name, spec.num_classes, 255)
    assert ds.reduce_zero_label == spec.reduce_zero_label
    assert len(ds) == 3 and ds.names == sorted(ds.names)
    c = spec.num_classes
    for i, sample in enumerate(ds):
        assert sample.name == ds.names[i]
        assert sample.image.shape == (12, 16, 3) and sample.image.dtype == np.uint8
        assert sample.label.shape == (12, 16) and sample.label.dtype == np.int64
        lab = sample.label
        valid = lab[lab != 255]
        assert valid.size > 0 and valid.min() >= 0 and valid.max() < c
        # fakedata's fixed pixels: [0,0] raw 255; [0,2] the largest raw class; [0,3] raw 1;
        # [0,1] raw 0 on reduce_zero_label benchmarks.
        assert lab[0, 0] == 255
        assert lab[0, 2] == c - 1
        if spec.reduce_zero_label:
            assert lab[0, 1] == 255 and lab[0, 3] == 0
        else:
            assert lab[0, 3] == 1
    assert ds[-1].name == ds.names[2]
    with pytest.raises(IndexError):
        ds[3]


def test_png_images_read_exactly(tmp_path: Path) -> None:
    root = make_fake_dataset("cityscapes", tmp_path, n=4)
    ds = load_dataset("cityscapes", root)
    assert ds.names == [
        "frankfurt/frankfurt_000000_000019",
        "frankfurt/frankfurt_000002_000019",
        "lindau/lindau_000001_000019",
        "lindau/lindau_000003_000019",
    ]
    path = root / "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png"
    np.testing.assert_array_equal(ds[2].image, np.asarray(Image.open(path)))


def test_order_is_deterministic(tmp_path: Path) -> None:
    root = make_fake_dataset("ade20k", tmp_path, n=4, seed=1)
    a, b = load_dataset("ade20k", root), load_dataset("ade20k", root)
    assert a.names == b.names == sorted(a.names)
    for sa, sb in zip(a, b, strict=True):
        np.testing.assert_array_equal(sa.label, sb.label)
        np.testing.assert_array_equal(sa.image, sb.image)


def test_voc_palette_png_read_as_indices_and_reduce_zero_label(tmp_path: Path) -> None:
    root = make_fake_dataset("voc21", tmp_path, n=2, size=(3, 4))
    raw = np.array([[0, 5, 255, 20], [1, 0, 5, 255], [20, 20, 0, 1]])
    path = root / "SegmentationClass/2007_000000.png"
    write_label(path, raw, palette=True)
    with Image.open(path) as im:
        assert im.mode == "P"
        rgb = np.asarray(im.convert("RGB"))
    assert tuple(rgb[0, 1]) == (128, 0, 128)  # class 5 (bottle): the RGB is not the label
    assert tuple(rgb[0, 2]) == (224, 224, 192)  # VOC's colour for 255 (ignore)
    np.testing.assert_array_equal(load_dataset("voc21", root)[0].label, raw)
    # voc20 reads the same files with reduce_zero_label: 0 -> 255, v -> v - 1, 255 -> 255
    expected = np.array([[255, 4, 255, 19], [0, 255, 4, 255], [19, 19, 255, 0]])
    np.testing.assert_array_equal(load_dataset("voc20", root)[0].label, expected)


def test_voc_accepts_vocdevkit_parent(tmp_path: Path) -> None:
    root = make_fake_dataset("voc21", tmp_path)
    assert root.name == "VOC2012"
    ds = load_dataset("voc21", root.parent)
    assert ds.root == root and len(ds) == 3
    ctx = make_fake_dataset("context59", tmp_path)
    assert load_dataset("context59", tmp_path / "VOCdevkit").root == ctx
    assert load_dataset("ade20k", make_fake_dataset("ade20k", tmp_path).parent).root.name == (
        "ADEChallengeData2016"
    )


def test_split_file_is_respected(tmp_path: Path) -> None:
    root = make_fake_dataset("context60", tmp_path, n=3)
    # An image + label that the split does not list must not be read.
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(root / "JPEGImages/2008_999999.jpg")
    write_label(root / "SegmentationClassContext/2008_999999.png", np.zeros((12, 16)))
    assert load_dataset("context60", root).names == ["2008_000000", "2008_000001", "2008_000002"]
    # Another split, listed out of order with a blank line: sorted, blanks skipped.
    (root / "ImageSets/SegmentationContext/train.txt").write_text("2008_999999\n\n2008_000001\n")
    assert load_dataset("context60", root, split="train").names == ["2008_000001", "2008_999999"]


@pytest.mark.parametrize("name", NAMES)
def test_missing_root_shows_expected_tree(name: str, tmp_path: Path) -> None:
    spec = get_benchmark(name).layout
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError) as err:
        load_dataset(name, missing)
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    img_dir, ann_dir, split_file = spec.resolve("val")
    assert f"dataset root does not exist: {missing}" in msg
    assert f"{spec.root_display}/" in msg
    assert f"|-- {img_dir}/" in msg
    assert f"{ann_dir}/" in msg and spec.seg_map_suffix in msg
    if split_file is not None:
        assert f"`-- {split_file}" in msg


def test_voc_tree_in_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError) as err:
        load_dataset("voc21", tmp_path / "VOCdevkit")
    msg = str(err.value)
    for line in [
        "VOCdevkit/VOC2012/",
        "|-- JPEGImages/",
        "|-- SegmentationClass/",
        "`-- ImageSets/Segmentation/val.txt",
    ]:
        assert line in msg


def test_wrong_layout_names_the_missing_folder(tmp_path: Path) -> None:
    root = make_fake_dataset("coco_stuff164k", tmp_path)
    (root / "annotations/val2017").rename(root / "annotations/validation")
    with pytest.raises(DatasetLayoutError, match="label folder not found") as err:
        load_dataset("coco_stuff164k", root)
    assert str(root / "annotations/val2017") in str(err.value)
    assert "images/val2017/" in str(err.value)

    voc = make_fake_dataset("voc21", tmp_path)
    (voc / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="split file not found"):
        load_dataset("voc21", voc)


def test_image_without_label(tmp_path: Path) -> None:
    root = make_fake_dataset("ade20k", tmp_path)
    label = root / "annotations/validation/ADE_val_00000002.png"
    label.unlink()
    with pytest.raises(DatasetLayoutError, match="has no label") as err:
        load_dataset("ade20k", root)
    msg = str(err.value)
    assert str(root / "images/validation/ADE_val_00000002.jpg") in msg
    assert str(label) in msg


def test_split_lists_missing_image(tmp_path: Path) -> None:
    root = make_fake_dataset("voc20", tmp_path)
    (root / "JPEGImages/2007_000001.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match="image missing.*2007_000001.jpg"):
        load_dataset("voc20", root)


def test_empty_split(tmp_path: Path) -> None:
    voc = make_fake_dataset("voc21", tmp_path)
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(DatasetLayoutError, match="split file is empty"):
        load_dataset("voc21", voc)
    ade = make_fake_dataset("ade20k", tmp_path)
    for p in (ade / "images/validation").iterdir():
        p.unlink()
    with pytest.raises(DatasetLayoutError, match=r"no \*\.jpg images in"):
        load_dataset("ade20k", ade)


def test_rgb_label_and_size_mismatch_raise(tmp_path: Path) -> None:
    root = make_fake_dataset("coco_stuff164k", tmp_path, n=2)
    ds = load_dataset("coco_stuff164k", root)
    Image.new("RGB", (16, 12)).save(ds.label_path(0))
    with pytest.raises(ValueError, match="mode 'RGB'"):
        ds[0]
    write_label(ds.label_path(1), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="sizes differ"):
        ds[1]


def test_prepare_coco_object(tmp_path: Path) -> None:
    stuff = make_fake_dataset("coco_stuff164k", tmp_path, n=2, size=(3, 5))
    hand = np.array([[0, 79, 80, 170, 255], [5, 100, 0, 79, 255], [255, 80, 1, 2, 3]])
    write_label(stuff / "annotations/val2017/000000000139_labelTrainIds.png", hand)
    assert prepare_coco_object(stuff, progress=False) == 2
    out = stuff / "annotations/val2017/000000000139_instanceTrainIds.png"
    # things 0..79 -> +1; stuff 80..170 and unlabeled 255 -> 0 (background)
    expected = np.array([[1, 80, 0, 0, 0], [6, 0, 1, 80, 0], [0, 0, 2, 3, 4]])
    with Image.open(out) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), expected)
    assert prepare_coco_object(stuff, progress=False) == 0  # existing files are skipped
    ds = load_dataset("coco_object", stuff)
    assert len(ds) == 2
    np.testing.assert_array_equal(ds[0].label, expected)
    assert not list(stuff.glob("annotations/val2017/*.tmp"))


def test_prepare_coco_object_regenerates_old_format(tmp_path: Path) -> None:
    stuff = make_fake_dataset("coco_stuff164k", tmp_path, n=2, size=(2, 4))
    hand = np.array([[255, 3, 90, 255], [0, 79, 80, 255]])
    write_label(stuff / "annotations/val2017/000000000139_labelTrainIds.png", hand)
    ann = stuff / "annotations/val2017"
    out = ann / "000000000139_instanceTrainIds.png"
    # outputs of the old rule (255 kept as ignore), no marker: regenerated, marker written
    write_label(out, np.array([[255, 4, 0, 255], [1, 80, 0, 255]]))
    write_label(ann / "000000000140_instanceTrainIds.png", np.full((4, 4), 255))
    assert not (ann / COCO_OBJECT_MARKER).exists()
    assert prepare_coco_object(stuff, progress=False) == 2
    with Image.open(out) as im:
        np.testing.assert_array_equal(np.asarray(im), [[0, 4, 0, 0], [1, 80, 0, 0]])
    assert (ann / COCO_OBJECT_MARKER).read_text().strip() == str(COCO_OBJECT_FORMAT)
    assert not list(ann.glob("*.tmp"))
    assert prepare_coco_object(stuff, progress=False) == 0  # marked current: skipped
    # an older version number in the marker counts as stale too
    (ann / COCO_OBJECT_MARKER).write_text("1\n")
    assert prepare_coco_object(stuff, progress=False) == 2
    assert int((ann / COCO_OBJECT_MARKER).read_text()) == COCO_OBJECT_FORMAT


def test_prepare_coco_object_out_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_fake_dataset("coco_stuff164k", tmp_path / "src", n=3)
    out = tmp_path / "out"
    # The parent of coco_stuff164k is accepted as the source root too.
    assert prepare_coco_object(tmp_path / "src", out_root=out) == 3
    assert "3/3" in capsys.readouterr().err
    assert len(list((out / "annotations/val2017").glob("*_instanceTrainIds.png"))) == 3
    if (out / "images/val2017").exists():  # symlinked images, where the platform allows
        assert len(load_dataset("coco_object", out)) == 3


def test_prepare_coco_object_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="dataset root does not exist"):
        prepare_coco_object(tmp_path / "nope", progress=False)
    (tmp_path / "coco").mkdir()
    with pytest.raises(DatasetLayoutError, match="label folder not found") as err:
        prepare_coco_object(tmp_path / "coco", progress=False)
    assert "_labelTrainIds.png" in str(err.value)


def test_fake_roots_cover_all_benchmarks() -> None:
    assert set(FAKE_ROOTS) == set(NAMES)
