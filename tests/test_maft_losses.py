"""MAFT losses on hand-made cases (spec A.4, A.11.3 item 6)."""

from __future__ import annotations

import pytest
import torch

from vocabseg.methods.maft.losses import mask_aware_loss, minmax_norm, self_distill_loss, soft_iou


def _square(y0, y1, x0, x1, size=4):
    m = torch.zeros(size, size)
    m[y0:y1, x0:x1] = 1
    return m


def test_soft_iou_hand_made():
    gt = torch.stack([_square(0, 2, 0, 2), _square(0, 4, 0, 4)])  # 4 pixels, 16 pixels
    proposals = torch.stack([_square(0, 2, 0, 2), _square(0, 2, 0, 4), torch.full((4, 4), 0.5)])
    iou = soft_iou(proposals, gt)
    expected = torch.tensor([[4 / 4, 4 / 16],
                             [4 / 8, 8 / 16],
                             [2 / (4 + 8 - 2), 8 / (16 + 8 - 8)]])
    torch.testing.assert_close(iou, expected, atol=1e-6, rtol=0)
    # proposals at another resolution are resized to the GT size
    big = torch.nn.functional.interpolate(proposals[None], size=(8, 8), mode="nearest")[0]
    torch.testing.assert_close(soft_iou(big, gt), expected, atol=1e-6, rtol=0)


def test_minmax_norm():
    torch.testing.assert_close(minmax_norm(torch.tensor([[1.0], [3.0], [2.0]])),
                               torch.tensor([[0.0], [1.0], [0.5]]), atol=1e-6, rtol=0)
    constant = minmax_norm(torch.full((4, 1), 0.3))
    assert torch.isfinite(constant).all() and (constant == 0).all()


def test_mask_aware_loss_cases():
    gt_masks = torch.stack([_square(0, 2, 0, 2), _square(2, 4, 0, 4)])
    labels = torch.tensor([2, 0])
    proposals = torch.stack([_square(0, 2, 0, 2), _square(2, 4, 0, 4), _square(0, 4, 0, 4)])
    target = minmax_norm(soft_iou(proposals, gt_masks))  # N,K
    probs = torch.zeros(3, 3)
    probs[:, 2] = target[:, 0]
    probs[:, 0] = target[:, 1]
    # perfect scores: zero loss
    assert mask_aware_loss([probs], [proposals], [gt_masks], [labels]) == 0
    # perfect proposals 0/1 targets; all-zero scores: mean of 0.5 * t^2 over the 6 (class, proposal) pairs
    loss = mask_aware_loss([torch.zeros(3, 3)], [proposals], [gt_masks], [labels])
    torch.testing.assert_close(loss, 0.5 * (target ** 2).mean())
    # one proposal: min-max gives 0 target, so the loss is SmoothL1 of the scores themselves
    one = mask_aware_loss([torch.full((1, 3), 0.4)], [proposals[:1]], [gt_masks], [labels])
    torch.testing.assert_close(one, torch.tensor(0.5 * 0.4 ** 2))
    # empty ground truth contributes nothing, and alone gives a differentiable zero
    p = torch.full((3, 3), 0.7, requires_grad=True)
    empty = mask_aware_loss([p], [proposals], [torch.zeros(0, 4, 4)], [torch.zeros(0, dtype=torch.long)])
    assert empty == 0
    empty.backward()
    both = mask_aware_loss([probs, p], [proposals, proposals], [gt_masks, torch.zeros(0, 4, 4)],
                           [labels, torch.zeros(0, dtype=torch.long)])
    assert both == 0


def test_self_distill_loss():
    p = torch.softmax(torch.randn(2, 5), -1)
    for kind in ("smoothl1", "mse", "kl"):
        assert self_distill_loss(p, p.clone(), kind).abs() < 1e-7
    q = torch.softmax(torch.randn(2, 5), -1)
    torch.testing.assert_close(self_distill_loss(p, q), (0.5 * (p - q) ** 2).mean())
    with pytest.raises(ValueError, match="unknown distillation"):
        self_distill_loss(p, q, "l3")
