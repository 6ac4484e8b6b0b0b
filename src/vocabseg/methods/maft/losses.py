"""MAFT's losses (spec A.4): the mask-aware loss and the self-distillation loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError


def soft_iou(proposals: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU ``N,K`` of soft proposals ``N,H,W`` with binary ground-truth masks ``K,H,W`` (proposals resized to GT).

    ``IoU = sum(M G) / (sum G + sum M - sum(M G) + 1e-7)``, detached.
    """
    proposals = proposals.detach().float()
    gt = gt.detach().float()
    if proposals.shape[-2:] != gt.shape[-2:]:
        proposals = F.interpolate(proposals[None], size=gt.shape[-2:], mode="bilinear", align_corners=False)[0]
    m = proposals.flatten(1)
    g = gt.flatten(1)
    inter = m @ g.T
    return inter / (g.sum(1)[None] + m.sum(1)[:, None] - inter + 1e-7)


def minmax_norm(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``(x - min) / (max - min + 1e-8)`` along ``dim``; a constant vector becomes 0."""
    low = x.amin(dim, keepdim=True)
    return (x - low) / (x.amax(dim, keepdim=True) - low + 1e-8)


def mask_aware_loss(probs: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
                    gt_masks: Sequence[torch.Tensor], gt_labels: Sequence[torch.Tensor], beta: float = 1.0
                    ) -> torch.Tensor:
    """SmoothL1 between class probabilities and min-max normalised IoUs, averaged over all (image, class, proposal).

    Per image: ``probs`` ``N,C`` (softmax over the training classes), ``proposals`` ``N,H,W``, ``gt_masks``
    ``K,H,W`` (one binary mask per class present) and ``gt_labels`` ``K`` (their class indices). For GT class
    ``k`` the scores ``probs[:, label_k]`` across proposals are pulled towards ``minmax_norm(IoU[:, k])``.
    Images without ground-truth classes contribute nothing; a batch without any gives 0.
    """
    predicted, targets = [], []
    for p, m, g, labels in zip(probs, proposals, gt_masks, gt_labels, strict=True):
        if len(labels) == 0 or p.shape[0] == 0:
            continue
        targets.append(minmax_norm(soft_iou(m, g), dim=0).flatten())
        predicted.append(p[:, labels].flatten())
    if not predicted:
        return sum(p.sum() for p in probs) * 0.0
    return F.smooth_l1_loss(torch.cat(predicted).float(), torch.cat(targets).to(predicted[0].device), beta=beta)


def self_distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "smoothl1") -> torch.Tensor:
    """Distance between image-level class probabilities ``B,C`` of the student and the frozen teacher.

    ``smoothl1`` (the code and the paper), ``mse``, or ``kl`` (``KL(teacher || student)``).
    """
    teacher = teacher.detach()
    if kind == "smoothl1":
        return F.smooth_l1_loss(student, teacher)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "kl":
        return F.kl_div(student.clamp_min(1e-12).log(), teacher, reduction="batchmean")
    raise UsageError(f"unknown distillation loss {kind!r}; use smoothl1, mse or kl")
