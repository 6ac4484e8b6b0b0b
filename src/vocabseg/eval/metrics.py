"""Confusion-matrix metrics over a whole split: per-class IoU and accuracy, mIoU, mAcc, pAcc, fwIoU, seen/unseen/hIoU.

The matrix has one row per ground-truth class and one column per predicted class, plus a last column,
``UNLABELLED``, for pixels whose prediction is no class (255 where there is no background and no class is
confident enough, or any value outside the class range). Those pixels count against the ground-truth class
(in its area, never in any class's intersection), exactly as mmseg's ``IoUMetric`` counts a prediction of 255;
dropping them instead would inflate the scores of a method that abstains.

Ground-truth pixels equal to the ignore index (255; 65535 for the datasets with more than 255 classes) or outside
the class range are skipped.

Definitions (mmseg ``IoUMetric`` and detectron2 ``SemSegEvaluator``):

* ``IoU_c = TP_c / (GT_c + P_c - TP_c)``; a class with zero union (absent from the ground truth and from the
  predictions) has no IoU and is left out of every mean (NaN in the per-class table).
* ``Acc_c = TP_c / GT_c``; a class absent from the ground truth has no accuracy.
* ``mIoU`` and ``mAcc``: means over the classes that have a value; ``pAcc = sum TP / sum GT``;
  ``fwIoU = sum_c (GT_c / sum GT) IoU_c`` over the classes with an IoU.
* Zero-shot splits (one matrix over all classes, all classes candidates: the GZSS protocol of ZegFormer, MAFT,
  FreeSeg): ``mIoU(seen)`` and ``mIoU(unseen)`` average the IoUs of each group;
  ``hIoU = 2 s u / (s + u)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255


def _as_int64(array) -> np.ndarray:
    try:
        import torch

        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.asarray(array).astype(np.int64, copy=False)


class ConfusionMatrix:
    """Accumulates ``counts[gt, pred]`` (``int64``, ``C x (C + 1)``; the last column: no class predicted)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, counts: np.ndarray | None = None):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        if counts is None:
            counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        counts = np.asarray(counts)
        if counts.shape != (num_classes, num_classes + 1):
            raise ValueError(f"counts must have shape {(num_classes, num_classes + 1)}, got {counts.shape}")
        self.counts = counts.astype(np.int64, copy=False)

    def update(self, pred, gt) -> None:
        """Add one image: ``pred`` and ``gt`` are label maps of the same shape (any integer dtype, numpy or torch)."""
        pred, gt = _as_int64(pred), _as_int64(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        c = self.num_classes
        valid = (gt >= 0) & (gt < c) & (gt != self.ignore_index)
        gt = gt[valid]
        pred = pred[valid]
        pred = np.where((pred >= 0) & (pred < c), pred, c)
        self.counts += np.bincount(gt * (c + 1) + pred, minlength=c * (c + 1)).reshape(c, c + 1)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.counts.shape != self.counts.shape:
            raise ValueError("cannot merge confusion matrices of different sizes")
        self.counts += other.counts
        return self

    @property
    def square(self) -> np.ndarray:
        """The ``C x C`` part (predictions of a class), without the no-class column."""
        return self.counts[:, : self.num_classes]

    def compute(self, class_names: Sequence[str] | None = None, unseen: Sequence[int] | None = None) -> Metrics:
        return compute_metrics(self.counts, class_names, unseen)


@dataclass
class Metrics:
    """Scores in [0, 1]; per-class values are NaN where undefined (see the module doc)."""

    iou: np.ndarray
    acc: np.ndarray
    gt_pixels: np.ndarray
    pred_pixels: np.ndarray
    miou: float
    macc: float
    pacc: float
    fwiou: float
    class_names: tuple[str, ...] = ()
    miou_seen: float | None = None
    miou_unseen: float | None = None
    hiou: float | None = None
    unseen: tuple[int, ...] = field(default_factory=tuple)

    def summary(self) -> dict[str, float]:
        """The headline numbers in percent (rounded to 0.01)."""
        out = {"mIoU": self.miou, "mAcc": self.macc, "pAcc": self.pacc, "fwIoU": self.fwiou}
        if self.hiou is not None:
            out.update({"mIoU(seen)": self.miou_seen, "mIoU(unseen)": self.miou_unseen, "hIoU": self.hiou})
        return {k: _percent(v) for k, v in out.items()}

    def per_class(self) -> list[dict]:
        rows = []
        unseen = set(self.unseen)
        for index in range(len(self.iou)):
            row = {
                "id": index,
                "class": self.class_names[index] if index < len(self.class_names) else str(index),
                "IoU": _percent(self.iou[index]),
                "Acc": _percent(self.acc[index]),
                "gt_pixels": int(self.gt_pixels[index]),
                "pred_pixels": int(self.pred_pixels[index]),
            }
            if self.unseen:
                row["split"] = "unseen" if index in unseen else "seen"
            rows.append(row)
        return rows


def _percent(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or np.isnan(value):
        return None
    return round(float(value) * 100, 2)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def compute_metrics(counts: np.ndarray, class_names: Sequence[str] | None = None,
                    unseen: Sequence[int] | None = None) -> Metrics:
    """All metrics of a ``C x (C + 1)`` (or plain ``C x C``) confusion matrix; ``unseen`` class ids enable hIoU."""
    counts = np.asarray(counts, dtype=np.int64)
    c = counts.shape[0]
    if counts.shape not in ((c, c), (c, c + 1)):
        raise ValueError(f"expected a C x C or C x (C + 1) matrix, got {counts.shape}")
    tp = np.diag(counts[:, :c]).astype(np.float64)
    gt = counts.sum(axis=1).astype(np.float64)  # includes pixels predicted as no class
    pred = counts[:, :c].sum(axis=0).astype(np.float64)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = gt.sum()
    pacc = float(tp.sum() / total) if total > 0 else float("nan")
    valid = ~np.isnan(iou)
    fwiou = float((iou[valid] * gt[valid]).sum() / total) if total > 0 else float("nan")
    metrics = Metrics(iou=iou, acc=acc, gt_pixels=gt.astype(np.int64), pred_pixels=pred.astype(np.int64),
                      miou=_nanmean(iou), macc=_nanmean(acc), pacc=pacc, fwiou=fwiou,
                      class_names=tuple(class_names or ()))
    if unseen is not None:
        unseen = tuple(sorted(int(i) for i in unseen))
        if any(i < 0 or i >= c for i in unseen):
            raise ValueError(f"unseen class ids must lie in [0, {c})")
        mask = np.zeros(c, dtype=bool)
        mask[list(unseen)] = True
        s, u = _nanmean(iou[~mask]), _nanmean(iou[mask])
        metrics.miou_seen, metrics.miou_unseen, metrics.unseen = s, u, unseen
        metrics.hiou = 2 * s * u / (s + u) if s + u > 0 else (0.0 if s + u == 0 else float("nan"))
    return metrics
