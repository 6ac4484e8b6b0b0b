"""Confusion-matrix metrics against hand-computed values: absent classes, ignore pixels, no-class predictions."""

import math

import numpy as np
import pytest

from vocabseg.eval.metrics import ConfusionMatrix, compute_metrics


def test_confusion_counts_and_ignore():
    cm = ConfusionMatrix(3)
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])  # the ignored pixel's prediction does not count
    cm.update(pred, gt)
    expected = np.zeros((3, 4), dtype=np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 2] = 1
    np.testing.assert_array_equal(cm.counts, expected)
    assert cm.counts.dtype == np.int64


def test_hand_computed_metrics_with_absent_class_and_unlabelled_predictions():
    # classes: 0, 1, 2 (never in the ground truth, predicted once), 3 (absent everywhere)
    gt = np.array([0, 0, 0, 0, 1, 1, 1, 1, 255, 255])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 255, 0, 3])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    m = cm.compute(["a", "b", "c", "d"])
    # class 0: TP 3, GT 4, P 3 -> IoU 3/4; class 1: TP 2, GT 4 (one pixel predicted as no class), P 3 -> 2/5
    # class 2: TP 0, GT 0, P 1 -> IoU 0 (counts: union > 0), no accuracy; class 3: no union -> excluded
    assert m.iou[0] == pytest.approx(3 / 4)
    assert m.iou[1] == pytest.approx(2 / 5)
    assert m.iou[2] == 0.0
    assert math.isnan(m.iou[3])
    assert m.miou == pytest.approx((3 / 4 + 2 / 5 + 0) / 3)
    assert m.acc[0] == pytest.approx(3 / 4) and m.acc[1] == pytest.approx(2 / 4)
    assert math.isnan(m.acc[2]) and math.isnan(m.acc[3])
    assert m.macc == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert m.pacc == pytest.approx(5 / 8)
    assert m.fwiou == pytest.approx((4 * 3 / 4 + 4 * 2 / 5) / 8)
    summary = m.summary()
    assert summary["mIoU"] == pytest.approx(round(100 * (3 / 4 + 2 / 5) / 3, 2))
    rows = m.per_class()
    assert rows[3]["IoU"] is None and rows[2]["Acc"] is None and rows[0]["class"] == "a"
    assert rows[1]["gt_pixels"] == 4 and rows[2]["pred_pixels"] == 1


def test_square_matrix_input_and_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (2, 30, 40))
    gt[:, :3] = 255
    pred = rng.integers(0, 5, (2, 30, 40))
    one = ConfusionMatrix(5)
    one.update(pred, gt)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred[0], gt[0])
    b.update(pred[1], gt[1])
    np.testing.assert_array_equal(a.merge(b).counts, one.counts)
    # with no no-class predictions the C x C square gives the same metrics
    square = compute_metrics(one.square)
    assert square.miou == pytest.approx(one.compute().miou)
    # reference from a direct per-class computation
    valid = gt != 255
    ious = []
    for c in range(5):
        inter = ((pred == c) & (gt == c) & valid).sum()
        union = (((pred == c) | (gt == c)) & valid).sum()
        ious.append(inter / union)
    assert one.compute().miou == pytest.approx(np.mean(ious))


def test_torch_inputs_and_shape_mismatch():
    import torch

    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1]], dtype=torch.uint8), torch.tensor([[0, 0]]))
    assert cm.counts[0, 0] == 1 and cm.counts[0, 1] == 1
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_large_ignore_index_for_many_classes():
    cm = ConfusionMatrix(300, ignore_index=65535)
    gt = np.array([255, 299, 65535])
    pred = np.array([255, 0, 7])
    cm.update(pred, gt)
    assert cm.counts[255, 255] == 1 and cm.counts[299, 0] == 1 and cm.counts.sum() == 2


def test_seen_unseen_and_harmonic_iou():
    # 4 classes; class 2 and 3 unseen. IoUs: 1.0, 0.5, 0.5, 0.0
    counts = np.zeros((4, 4), dtype=np.int64)
    counts[0, 0] = 10
    counts[1, 1] = 2
    counts[1, 2] = 2  # class 1: TP 2, GT 4, P 2 -> 0.5 ; class 2: TP 2, GT 2, P 2 + 2 -> 0.5
    counts[2, 2] = 2
    counts[3, 0] = 3  # class 3: TP 0 -> 0 ; class 0: P 13 -> 10 / 13
    m = compute_metrics(counts, unseen=[2, 3])
    iou0 = 10 / 13
    assert m.iou[0] == pytest.approx(iou0)
    assert m.miou_seen == pytest.approx((iou0 + 0.5) / 2)
    assert m.miou_unseen == pytest.approx((0.5 + 0.0) / 2)
    s, u = m.miou_seen, m.miou_unseen
    assert m.hiou == pytest.approx(2 * s * u / (s + u))
    assert set(m.summary()) == {"mIoU", "mAcc", "pAcc", "fwIoU", "mIoU(seen)", "mIoU(unseen)", "hIoU"}
    assert m.per_class()[3]["split"] == "unseen"
    with pytest.raises(ValueError):
        compute_metrics(counts, unseen=[4])


def test_empty_matrix_gives_nan_not_errors():
    m = ConfusionMatrix(3).compute()
    assert math.isnan(m.miou) and math.isnan(m.pacc)
    assert m.summary()["mIoU"] is None
