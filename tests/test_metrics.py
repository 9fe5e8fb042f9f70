"""Tests for sfp.seg.metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sfp.seg.metrics import ConfusionAccumulator, SegMetrics, confusion_matrix

# A 3 x 4 example with C = 3 and two ignored pixels (255).
GT = np.array(
    [
        [0, 0, 1, 1],
        [0, 2, 1, 255],
        [2, 2, 255, 1],
    ]
)
PRED = np.array(
    [
        [0, 1, 1, 1],
        [0, 2, 2, 0],  # the 0 at [1, 3] sits on an ignored pixel
        [2, 0, 1, 1],  # the 1 at [2, 2] sits on an ignored pixel
    ]
)
# (gt, pred) pairs over the 10 kept pixels:
#   row 0: (0,0) (0,1) (1,1) (1,1)
#   row 1: (0,0) (2,2) (1,2)
#   row 2: (2,2) (2,0) (1,1)
# gt 0 -> pred 0: 2, pred 1: 1
# gt 1 -> pred 1: 3, pred 2: 1
# gt 2 -> pred 0: 1, pred 2: 2
M_HAND = np.array(
    [
        [2, 1, 0],
        [0, 3, 1],
        [1, 0, 2],
    ]
)
# intersection I = diag = [2, 3, 2]; gt area G = row sums = [3, 4, 3];
# pred area P = column sums = [3, 4, 3]; union = G + P - I = [4, 5, 4]
# IoU = [2/4, 3/5, 2/4] = [0.5, 0.6, 0.5]   -> mIoU = 1.6 / 3
# Acc = I / G = [2/3, 3/4, 2/3]               -> mAcc = (2/3 + 3/4 + 2/3) / 3 = 25/36
# aAcc = (2 + 3 + 2) / 10 = 0.7
IOU_HAND = [0.5, 0.6, 0.5]
ACC_HAND = [2 / 3, 3 / 4, 2 / 3]


def test_confusion_matrix_hand_computed() -> None:
    m = confusion_matrix(PRED, GT, num_classes=3)
    assert m.dtype == np.int64
    assert m.shape == (3, 3)
    np.testing.assert_array_equal(m, M_HAND)


def test_summary_hand_computed() -> None:
    s = ConfusionAccumulator(3).update(PRED, GT).summary(["bg", "cat", "dog"])
    np.testing.assert_allclose(s.iou, IOU_HAND)
    np.testing.assert_allclose(s.acc, ACC_HAND)
    assert s.miou == pytest.approx(1.6 / 3)
    assert s.macc == pytest.approx(25 / 36)
    assert s.aacc == pytest.approx(0.7)
    assert s.num_pixels == 10
    assert s.class_names == ("bg", "cat", "dog")


def test_absent_class_is_nan_and_left_out_of_the_mean() -> None:
    # Same arrays with C = 5: classes 3 and 4 appear in neither prediction nor gt.
    s = ConfusionAccumulator(5).update(PRED, GT).summary()
    np.testing.assert_allclose(s.iou[:3], IOU_HAND)
    assert np.isnan(s.iou[3]) and np.isnan(s.iou[4])
    assert np.isnan(s.acc[3]) and np.isnan(s.acc[4])
    assert s.miou == pytest.approx(1.6 / 3)  # not (1.6 + 0 + 0) / 5
    assert s.macc == pytest.approx(25 / 36)
    assert s.class_names == ("0", "1", "2", "3", "4")


def test_class_predicted_but_absent_from_gt() -> None:
    gt = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 3], [1, 1]])
    # C = 4: M = [[1,0,0,1],[0,2,0,0],[0,0,0,0],[0,0,0,0]]
    # I = [1,2,0,0], G = [2,2,0,0], P = [1,2,0,1], union = [2,2,0,1]
    # IoU = [1/2, 1, nan, 0] -> mIoU = 1.5/3 = 0.5 ; Acc = [1/2, 1, nan, nan] -> mAcc = 0.75
    s = ConfusionAccumulator(4).update(pred, gt).summary()
    np.testing.assert_allclose(s.iou, [0.5, 1.0, np.nan, 0.0])
    np.testing.assert_allclose(s.acc, [0.5, 1.0, np.nan, np.nan])
    assert s.miou == pytest.approx(0.5)
    assert s.macc == pytest.approx(0.75)
    assert s.aacc == pytest.approx(0.75)


def test_ignore_pixels_are_dropped_whatever_the_prediction() -> None:
    gt = np.full((3, 4), 255)
    gt[0, 0] = 1
    pred = np.full((3, 4), 7)  # out of range, but only on ignored pixels
    pred[0, 0] = 1
    m = confusion_matrix(pred, gt, num_classes=2)
    np.testing.assert_array_equal(m, [[0, 0], [0, 1]])
    # A custom ignore index; 255 is then an (invalid) label.
    gt2 = np.array([[0, 9], [1, 1]])
    pred2 = np.array([[0, 0], [1, 0]])
    np.testing.assert_array_equal(confusion_matrix(pred2, gt2, 2, ignore_index=9), [[1, 0], [1, 1]])


def test_all_ignored_gives_nan_scores_without_warnings() -> None:
    with np.errstate(all="raise"):
        s = ConfusionAccumulator(3).update(np.zeros((2, 2), int), np.full((2, 2), 255)).summary()
    assert s.num_pixels == 0
    assert math.isnan(s.miou) and math.isnan(s.aacc) and math.isnan(s.macc)
    assert s.to_dict()["mIoU"] is None


def test_accumulating_two_images_equals_one_concatenated_image() -> None:
    rng = np.random.default_rng(0)
    gt_a, gt_b = rng.integers(0, 4, (3, 4)), rng.integers(0, 4, (5, 4))
    pr_a, pr_b = rng.integers(0, 4, (3, 4)), rng.integers(0, 4, (5, 4))
    gt_a[0, 0] = gt_b[1, 1] = 255
    acc = ConfusionAccumulator(4).update(pr_a, gt_a).update(pr_b, gt_b)
    one = ConfusionAccumulator(4).update(np.vstack([pr_a, pr_b]), np.vstack([gt_a, gt_b]))
    np.testing.assert_array_equal(acc.matrix, one.matrix)
    assert acc.num_images == 2
    sa, so = acc.summary(), one.summary()
    np.testing.assert_allclose(sa.iou, so.iou)
    assert sa.miou == so.miou and sa.aacc == so.aacc
    # Averaging per-image mIoUs is NOT the dataset mIoU in general; accumulation is.
    assert acc.matrix.sum() == 3 * 4 + 5 * 4 - 2


def test_merge_and_add() -> None:
    a = ConfusionAccumulator(3).update(PRED, GT)
    b = ConfusionAccumulator(3).update(GT.clip(0, 2), GT)  # perfect on the 10 kept pixels
    c = a + b
    np.testing.assert_array_equal(c.matrix, M_HAND + np.diag([3, 4, 3]))
    np.testing.assert_array_equal(a.matrix, M_HAND)  # + leaves operands alone
    assert c.num_images == 2
    a.merge(b)
    np.testing.assert_array_equal(a.matrix, c.matrix)
    a += b
    np.testing.assert_array_equal(a.matrix, M_HAND + 2 * np.diag([3, 4, 3]))
    with pytest.raises(ValueError, match="num_classes"):
        a.merge(ConfusionAccumulator(4))
    with pytest.raises(ValueError, match="ignore_index"):
        a.merge(ConfusionAccumulator(3, ignore_index=0))
    with pytest.raises(TypeError):
        a.merge(M_HAND)  # type: ignore[arg-type]
    a.reset()
    assert a.matrix.sum() == 0 and a.num_images == 0


def test_matrix_is_read_only() -> None:
    a = ConfusionAccumulator(3).update(PRED, GT)
    with pytest.raises(ValueError):
        a.matrix[0, 0] = 5


def test_torch_tensors_accepted() -> None:
    torch = pytest.importorskip("torch")
    m = confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(GT).to(torch.uint8), 3)
    np.testing.assert_array_equal(m, M_HAND)


def test_uint8_inputs_do_not_overflow() -> None:
    # gt * C + pred would overflow uint8 for C = 21.
    gt = np.array([[20, 20], [255, 0]], dtype=np.uint8)
    pred = np.array([[20, 3], [0, 0]], dtype=np.uint8)
    m = confusion_matrix(pred, gt, 21)
    assert m[20, 20] == 1 and m[20, 3] == 1 and m[0, 0] == 1 and m.sum() == 3


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(3, 4\).*\(4, 3\)"):
        confusion_matrix(PRED, GT.T, 3)


def test_out_of_range_labels_raise() -> None:
    bad_pred = PRED.copy()
    bad_pred[0, 0] = 3
    with pytest.raises(ValueError, match=r"pred has labels outside \[0, 3\).*value\(s\) 3"):
        confusion_matrix(bad_pred, GT, 3)
    neg = PRED.copy()
    neg[2, 3] = -1
    with pytest.raises(ValueError, match="pred has labels outside"):
        ConfusionAccumulator(3).update(neg, GT)
    bad_gt = GT.copy()
    bad_gt[0, 0] = 254
    with pytest.raises(ValueError, match=r"gt has labels outside \[0, 3\).*254"):
        confusion_matrix(PRED, bad_gt, 3)


def test_non_integer_input_raises() -> None:
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(PRED.astype(np.float32), GT, 3)


def test_bad_class_names_raise() -> None:
    acc = ConfusionAccumulator(3).update(PRED, GT)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        acc.summary(["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        acc.summary(["a", "b", "a"])


def test_to_dict_is_percent_and_json_friendly() -> None:
    d = ConfusionAccumulator(4).update(PRED, GT).summary(["bg", "cat", "dog", "cow"]).to_dict()
    assert d["units"] == "percent"
    assert d["mIoU"] == 53.33  # 1.6 / 3 = 0.5333...
    assert d["aAcc"] == 70.0
    assert d["mAcc"] == 69.44  # 25 / 36 = 0.69444...
    assert d["num_pixels"] == 10
    assert d["per_class"]["cat"] == {"IoU": 60.0, "Acc": 75.0}
    assert d["per_class"]["cow"] == {"IoU": None, "Acc": None}
    assert list(d["per_class"]) == ["bg", "cat", "dog", "cow"]
    json.dumps(d, allow_nan=False)
    raw = ConfusionAccumulator(3).update(PRED, GT).summary().to_dict(decimals=None)
    assert raw["mIoU"] == pytest.approx(160 / 3)


def test_table_is_aligned_and_in_percent() -> None:
    s = ConfusionAccumulator(4).update(PRED, GT).summary(["background", "cat", "dog", "cow"])
    text = s.table()
    lines = text.splitlines()
    assert "IoU (%)" in lines[0] and "Acc (%)" in lines[0]
    rows = lines[2:6]
    assert len({len(r) for r in rows}) == 1  # aligned
    assert len({r.index("|") for r in [lines[0], *rows]}) == 1
    assert rows[1].split("|")[1].strip() == "60.00"
    assert rows[3].split("|")[1].strip() == "nan"
    assert "mIoU 53.33" in lines[-1] and "aAcc 70.00" in lines[-1]
    assert str(s) == text


def test_from_confusion_matches_accumulator() -> None:
    s = SegMetrics.from_confusion(M_HAND)
    np.testing.assert_allclose(s.iou, IOU_HAND)
    assert s.num_classes == 3
    with pytest.raises(ValueError, match="square"):
        SegMetrics.from_confusion(np.zeros((2, 3), int))


def _mmseg_reference(preds, gts, num_classes, ignore_index=255):
    """mmseg IoUMetric's arithmetic (intersect_and_union + total_area_to_metrics), in torch."""
    torch = pytest.importorskip("torch")

    def hist(x):
        return torch.histc(x.double(), bins=num_classes, min=0, max=num_classes - 1)

    tot_i = tot_u = tot_p = tot_l = torch.zeros(num_classes, dtype=torch.float64)
    for pred, label in zip(preds, gts, strict=True):
        pred, label = torch.from_numpy(pred), torch.from_numpy(label)
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        inter = pred[pred == label]
        a_i, a_p, a_l = hist(inter), hist(pred), hist(label)
        tot_i, tot_p, tot_l = tot_i + a_i, tot_p + a_p, tot_l + a_l
        tot_u = tot_u + a_p + a_l - a_i
    iou = (tot_i / tot_u).numpy()
    acc = (tot_i / tot_l).numpy()
    aacc = float(tot_i.sum() / tot_l.sum())
    return iou, acc, float(np.nanmean(iou)), aacc, float(np.nanmean(acc))


def test_matches_mmseg_arithmetic_on_random_data() -> None:
    rng = np.random.default_rng(3)
    c = 6
    gts, preds = [], []
    for shape in [(7, 9), (4, 5), (10, 3)]:
        gt = rng.integers(0, c - 1, shape)  # class 5 never in gt
        gt[rng.random(shape) < 0.2] = 255
        pred = rng.integers(0, c - 2, shape)  # classes 4, 5 never predicted
        gts.append(gt)
        preds.append(pred)
    acc = ConfusionAccumulator(c)
    for p, g in zip(preds, gts, strict=True):
        acc.update(p, g)
    s = acc.summary()
    iou, cls_acc, miou, aacc, macc = _mmseg_reference(preds, gts, c)
    np.testing.assert_allclose(s.iou, iou)
    np.testing.assert_allclose(s.acc, cls_acc)
    assert np.isnan(s.iou[5]) and s.iou[4] == 0.0
    assert s.miou == pytest.approx(miou)
    assert s.aacc == pytest.approx(aacc)
    assert s.macc == pytest.approx(macc)
