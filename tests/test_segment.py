"""Tests of sfp.seg.pipeline: sliding windows, stitching, post-processing, the Segmenter.

Pure stages are checked against hand-computed numbers; the Segmenter end to end with a fake
encoder that plants known query embeddings (labels must follow the planted split exactly),
and with every registered encoder on a tiny random CLIP (shapes, batch-size invariance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sfp.methods.encoders import Encoder, available_methods
from sfp.seg.pipeline import (
    PALETTE,
    Segmentation,
    Segmenter,
    inference_size,
    label_image,
    postprocess,
    save_segmentation,
    slide_windows,
    stitch,
    window_logits,
)

SIMPLE = "simple"


# --------------------------------------------------------------------------- slide_windows
def test_slide_windows_336x500_hand_checked() -> None:
    # rows: starts 0, 112 (336 - 224 = 112 -> 2 rows); cols: 0, 112, 224, then 336 -> moved
    # back to end at 500: 276 (ceil(276 / 112) + 1 = 4 columns).
    wins = slide_windows(336, 500, 224, 112)
    expected = [
        (0, 0, 224, 224), (0, 112, 224, 336), (0, 224, 224, 448), (0, 276, 224, 500),
        (112, 0, 336, 224), (112, 112, 336, 336), (112, 224, 336, 448), (112, 276, 336, 500),
    ]
    assert wins == expected


@pytest.mark.parametrize(
    "h,w", [(336, 500), (224, 224), (225, 224), (20, 300), (300, 20), (10, 10), (561, 1120)]
)
def test_slide_windows_cover_every_pixel(h: int, w: int) -> None:
    wins = slide_windows(h, w, 224, 112)
    cover = np.zeros((h, w), dtype=int)
    for y0, x0, y1, x1 in wins:
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        assert (y1 - y0, x1 - x0) == (min(224, h), min(224, w))
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    n_rows = -(-max(h - 224, 0) // 112) + 1
    n_cols = -(-max(w - 224, 0) // 112) + 1
    assert len(wins) == n_rows * n_cols


def test_slide_windows_small_image_is_one_window() -> None:
    assert slide_windows(100, 150, 224, 112) == [(0, 0, 100, 150)]


def test_inference_size_follows_mmcv_imrescale() -> None:
    assert inference_size(375, 500, 336, 2048) == (336, 448)
    assert inference_size(500, 375, 336, 2048) == (448, 336)
    # long side capped: scale = min(2048 / 300, 336 / 20) = 6.8267
    assert inference_size(20, 300, 336, 2048) == (137, 2048)
    assert inference_size(1024, 2048, 560, 2048) == (560, 1120)
    assert inference_size(33, 47, None, None) == (33, 47)


# --------------------------------------------------------------------------- stitch / logits
def test_stitch_of_constant_logits_is_the_constant() -> None:
    wins = slide_windows(336, 500, 224, 112)
    logits = torch.full((len(wins), 3, 224, 224), 0.37)
    logits[:, 1] = -1.25
    out = stitch(logits, wins, (336, 500))
    assert out.shape == (3, 336, 500)
    assert torch.allclose(out[0], torch.tensor(0.37))
    assert torch.allclose(out[1], torch.tensor(-1.25))


def test_stitch_averages_overlaps() -> None:
    wins = [(0, 0, 2, 2), (0, 1, 2, 3)]
    logits = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    out = stitch(logits, wins, (2, 3))
    assert out[0].tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match="cover"):
        stitch(logits[:1], wins[:1], (2, 3))


def test_window_logits_are_cosines_upsampled() -> None:
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    feats = torch.tensor([[[3.0, 0.0], [0.0, -2.0], [1.0, 1.0], [5.0, 5.0]]])  # (1, 4, 2)
    out = window_logits(feats, q, (2, 2), (2, 2))
    s = 2**-0.5
    assert torch.allclose(out[0, 0], torch.tensor([[1.0, 0.0], [s, s]]))
    assert torch.allclose(out[0, 1], torch.tensor([[0.0, -1.0], [s, s]]))
    assert window_logits(feats, q, (2, 2), (32, 32)).shape == (1, 2, 32, 32)


# --------------------------------------------------------------------------- postprocess
def test_postprocess_scale_softmax_and_synonym_max() -> None:
    # 3 queries: query 0 -> class 0, queries 1 and 2 -> class 1 (synonyms). One pixel.
    scores = torch.tensor([0.20, 0.25, 0.10]).view(3, 1, 1)
    labels, probs = postprocess(scores, [0, 1, 1], logit_scale=10.0)
    e = np.exp(np.array([2.0, 2.5, 1.0]))
    p = e / e.sum()
    assert probs.shape == (2, 1, 1)
    assert probs[0, 0, 0].item() == pytest.approx(p[0], rel=1e-6)
    assert probs[1, 0, 0].item() == pytest.approx(max(p[1], p[2]), rel=1e-6)
    assert labels.dtype == torch.int64 and labels.item() == 1
    # With scale 1 the difference is small but the ranking is the same.
    assert postprocess(scores, [0, 1, 1], logit_scale=1.0)[0].item() == 1


def test_postprocess_prob_threshold_sets_background() -> None:
    # Two pixels: a confident one (class 2) and a flat one (max prob ~ 0.36 -> background).
    scores = torch.tensor([[0.0, 0.00], [0.0, 0.01], [1.0, 0.02]]).view(3, 1, 2)
    labels, probs = postprocess(scores, [0, 1, 2], logit_scale=10.0, prob_thd=0.5)
    assert labels.tolist() == [[2, 0]]
    assert probs[:, 0, 1].max().item() < 0.5
    labels, _ = postprocess(scores, [0, 1, 2], logit_scale=10.0, prob_thd=0.0)
    assert labels.tolist() == [[2, 2]]


def test_postprocess_area_threshold_drops_small_foreground_class() -> None:
    # 10 x 10 image, 3 classes. Class 1 wins 60 px, class 2 wins 5 px (second choice there:
    # class 1), background 35 px. Foreground area 65: class 2 has 5 / 65 = 7.7% < 10%.
    h = w = 10
    scores = torch.zeros(3, h, w)
    scores[0] = 0.5
    scores[1, :6] = 1.0
    scores[2, 6, :5] = 2.0
    scores[1, 6, :5] = 1.5
    labels, probs = postprocess(scores, [0, 1, 2], logit_scale=10.0, area_thd=None)
    assert int((labels == 2).sum()) == 5 and int((labels == 1).sum()) == 60
    labels, probs = postprocess(scores, [0, 1, 2], logit_scale=10.0, area_thd=0.1)
    assert int((labels == 2).sum()) == 0
    assert labels[6, :5].tolist() == [1] * 5  # dropped pixels go to their next best class
    assert float(probs[2].abs().sum()) == 0.0
    # 5 / 65 > 0.07: kept.
    labels, _ = postprocess(scores, [0, 1, 2], logit_scale=10.0, area_thd=0.07)
    assert int((labels == 2).sum()) == 5


def test_postprocess_area_threshold_is_strict_and_ignores_background() -> None:
    # Class 1: 9 px, class 2: 1 px -> 1 / 10 = 10% is not > 10%: dropped.
    scores = torch.zeros(3, 1, 20)
    scores[0, 0, 10:] = 1.0
    scores[1, 0, :9] = 1.0
    scores[2, 0, 9] = 1.0
    labels, _ = postprocess(scores, [0, 1, 2], logit_scale=10.0, area_thd=0.1)
    assert int((labels == 2).sum()) == 0
    labels, _ = postprocess(scores, [0, 1, 2], logit_scale=10.0, area_thd=0.099)
    assert int((labels == 2).sum()) == 1


def test_label_image_roundtrip(tmp_path) -> None:
    lab = np.array([[0, 1, 2], [20, 150, 255]])
    label_image(lab).save(tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), lab)
        assert im.getpalette()[3:6] == PALETTE[1].tolist()
    big = np.array([[0, 300]])
    label_image(big).save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as im:
        assert np.asarray(im).tolist() == [[0, 300]]


# --------------------------------------------------------------------------- Segmenter
class PlantedEncoder(Encoder):
    """Patch features = query embedding ``a`` where the patch is dark, ``b`` where bright."""

    name = "planted"

    def __init__(self, bundle, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(bundle)
        self.a, self.b = a, b
        self.calls: list[int] = []

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape[0])
        p = self.bundle.patch_size
        means = F.avg_pool2d(images.mean(1, keepdim=True), p)  # (B, 1, gh, gw)
        bright = (means.flatten(1) > 0)[..., None]  # (B, N, 1)
        return torch.where(bright, self.b * 3.0, self.a * 0.5)


@pytest.fixture(scope="module")
def planted(tiny_vit):
    base = Segmenter(tiny_vit, ["other", "dark thing", "bright thing"], method="clip",
                     templates=SIMPLE)
    emb = base.queries.embeddings
    return PlantedEncoder(tiny_vit, emb[1], emb[2])


@pytest.mark.parametrize("size,short_side", [((64, 128), None), ((48, 96), 64), ((64, 128), 64)])
def test_planted_split_is_recovered_exactly(tiny_vit, planted, size, short_side) -> None:
    h, w = size
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, w // 2 :] = 255
    seg = Segmenter(tiny_vit, ["other", "dark thing", "bright thing"], method=planted,
                    short_side=short_side, crop=64, stride=32, templates=SIMPLE, batch_size=2)
    out = seg.predict(img)
    expected = np.full((h, w), 1)
    expected[:, w // 2 :] = 2
    assert out.labels.shape == (h, w)
    assert np.array_equal(out.labels.numpy(), expected)
    assert out.present() == [1, 2]
    assert max(planted.calls[-3:]) <= 2  # windows were batched by batch_size


def test_labels_at_original_resolution_for_odd_and_tiny_images(tiny_vit) -> None:
    seg = Segmenter(tiny_vit, "cat; dog; grass", method="clip", templates=SIMPLE,
                    short_side=40, crop=32, stride=16, max_long_side=400)
    rng = np.random.default_rng(0)
    for h, w in [(37, 53), (20, 300), (300, 20), (17, 17)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = seg.predict(img)
        assert out.labels.shape == (h, w) and out.labels.dtype == torch.int64
        assert out.probs.shape == (3, h, w)
        assert int(out.labels.min()) >= 0 and int(out.labels.max()) < 3
        assert torch.allclose(out.probs.sum(0), torch.ones(h, w), atol=1e-5)


def test_image_smaller_than_crop_uses_one_nonsquare_window(tiny_vit) -> None:
    seg = Segmenter(tiny_vit, "cat; dog", method="clip", templates=SIMPLE, short_side=None,
                    crop=224, stride=112)
    img = np.random.default_rng(1).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    scores = seg.predict_logits(img)
    assert scores.logits.shape == (2, 40, 100)
    assert seg.predict(img).labels.shape == (40, 100)


def test_batch_size_does_not_change_results(tiny_vit) -> None:
    img = np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    kw = dict(method="clip", templates=SIMPLE, short_side=64, crop=32, stride=16)
    a = Segmenter(tiny_vit, "cat; dog; grass", batch_size=1, **kw).predict_logits(img)
    b = Segmenter(tiny_vit, "cat; dog; grass", batch_size=8, **kw).predict_logits(img)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)


def test_predict_logits_then_postprocess_with_overrides(tiny_vit) -> None:
    img = np.random.default_rng(3).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    kw = dict(method="clip", templates=SIMPLE, short_side=48, crop=32, stride=16)
    seg = Segmenter(tiny_vit, "sky; cat; dog, puppy", **kw)
    scores = seg.predict_logits(img)
    assert scores.logits.shape[0] == 4 and scores.size == (50, 60)
    direct = seg.predict(img)
    again = seg.postprocess(scores)
    assert torch.equal(direct.labels, again.labels)
    assert torch.equal(seg.predict_labels(img), direct.labels)
    tuned = seg.postprocess(scores, logit_scale=7.0, prob_thd=0.6, area_thd=0.2)
    other = Segmenter(tiny_vit, "sky; cat; dog, puppy", logit_scale=7.0, prob_thd=0.6,
                      area_thd=0.2, **kw).predict(img)
    assert torch.equal(tuned.labels, other.labels)
    assert tuned.params == {"logit_scale": 7.0, "prob_thd": 0.6, "area_thd": 0.2}
    # By hand from the cached scores.
    up = F.interpolate(scores.logits[None], size=(50, 60), mode="bilinear",
                       align_corners=False)[0]
    p = torch.softmax(up * 7.0, 0)
    p = torch.stack([p[0], p[1], p[2:].amax(0)])
    lab = p.argmax(0)
    lab[p.amax(0) < 0.6] = 0
    assert torch.equal(seg.postprocess(scores, logit_scale=7.0, prob_thd=0.6,
                                       area_thd=None).labels, lab)


def test_overlay_shape_dtype_and_blend(tiny_vit, tmp_path) -> None:
    labels = torch.zeros(30, 40, dtype=torch.long)
    labels[:, 20:] = 2
    image = np.full((30, 40, 3), 100, dtype=np.uint8)
    seg = Segmentation(labels=labels, probs=torch.zeros(3, 30, 40),
                       class_names=["background", "cat", "dog"], image=image)
    ov = seg.overlay(alpha=0.5)
    assert ov.dtype == np.uint8 and ov.ndim == 3 and ov.shape[2] == 3
    assert ov.shape[0] >= 30 and ov.shape[1] > 40
    plain = seg.overlay(alpha=0.5, legend=False)
    assert plain.shape == (30, 40, 3)
    assert np.array_equal(ov[:30, :40], plain)
    expected = np.round(0.5 * 100 + 0.5 * PALETTE[2].astype(float)).astype(np.uint8)
    assert np.array_equal(plain[0, 30], expected)
    assert np.array_equal(seg.overlay(alpha=0.0, legend=False), image)
    assert np.array_equal(seg.overlay(alpha=1.0, legend=False)[0, 0], PALETTE[0])
    lab, ovp = save_segmentation(seg, tmp_path, "x")
    assert np.array_equal(np.asarray(Image.open(lab)), labels.numpy())
    assert np.asarray(Image.open(ovp)).shape == ov.shape


@pytest.mark.parametrize("method", ["clip", "maskclip", "sclip", "clearclip", "naclip", "sfp"])
def test_every_encoder_segments(tiny_vit, method) -> None:
    if method not in available_methods():
        pytest.skip(f"{method} not registered")
    if method == "sfp":
        pytest.importorskip("sfp.methods.purify")
    img = np.random.default_rng(4).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    seg = Segmenter(tiny_vit, "cat; dog", method=method, templates=SIMPLE, short_side=48,
                    crop=32, stride=16)
    out = seg.predict(img)
    assert out.labels.shape == (40, 70)
    assert torch.isfinite(out.probs).all()


def test_sfp_presets(tiny_vit) -> None:
    pytest.importorskip("sfp.methods.purify")
    img = np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for preset in ("official", "paper"):
        seg = Segmenter(tiny_vit, "cat; dog", method="sfp", config=preset, templates=SIMPLE,
                        short_side=48, crop=32, stride=16)
        assert seg.encoder.config.preset_name == preset
        assert seg.predict(img).labels.shape == (40, 50)


def test_benchmark_presets_and_overrides(tiny_vit) -> None:
    from sfp.seg.benchmarks import BENCHMARKS, file_benchmarks, get_benchmark

    assert set(file_benchmarks()) == {
        "voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff164k",
        "cityscapes", "ade20k",
    }
    assert set(BENCHMARKS) - set(file_benchmarks()) == {"toy"} and get_benchmark("toy").generated
    voc = get_benchmark("voc21").settings
    assert (voc.logit_scale, voc.prob_thd, voc.area_thd, voc.short_side) == (50.0, 0.15, 0.1, 336)
    assert get_benchmark("coco_object").settings.logit_scale == 55.0
    assert get_benchmark("coco_object").settings.prob_thd == 0.35
    assert get_benchmark("cityscapes").settings.short_side == 560
    assert all(get_benchmark(n).settings.crop == 224 and get_benchmark(n).settings.stride == 112
               for n in file_benchmarks())
    seg = Segmenter.for_benchmark(tiny_vit, "voc21", method="clip", templates=SIMPLE,
                                  prob_thd=0.3)
    assert seg.num_classes == 21 and seg.class_names[0] == "background"
    assert (seg.logit_scale, seg.prob_thd, seg.area_thd) == (50.0, 0.3, 0.1)
    assert seg.queries.embeddings.shape[0] > 21  # voc21's background line has synonyms
    with pytest.raises(ValueError, match="unknown benchmark 'voc22'"):
        Segmenter.for_benchmark(tiny_vit, "voc22", method="clip")


def test_bad_arguments(tiny_vit) -> None:
    with pytest.raises(ValueError, match="stride"):
        Segmenter(tiny_vit, "a; b", method="clip", crop=32, stride=64)
    with pytest.raises(ValueError, match="template"):
        Segmenter(tiny_vit, "a; b", method="clip", templates="fancy")
    with pytest.raises(ValueError, match="prob_thd"):
        Segmenter(tiny_vit, "a; b", method="clip", prob_thd=2.0)
