import itertools

import numpy as np
import pytest
import torch

from vocabseg.pipeline import postprocess as pp


def test_max_over_names_and_class_scores():
    logits = torch.tensor([[[0.1]], [[0.3]], [[0.2]], [[0.25]]])  # queries: bg, bg, cat, dog
    query_class = torch.tensor([0, 0, 1, 2])
    scores = pp.class_scores(logits, query_class, 3, logit_scale=10.0)
    probs = torch.softmax(logits[:, 0, 0] * 10, dim=0)
    torch.testing.assert_close(scores[:, 0, 0], torch.stack([probs[:2].max(), probs[2], probs[3]]))


def test_prob_thd_sets_background_or_ignore():
    scores = torch.tensor([[[0.3, 0.1]], [[0.6, 0.45]], [[0.1, 0.45]]])
    assert pp.labels_from_scores(scores, prob_thd=0.5).tolist() == [[1, 0]]
    assert pp.labels_from_scores(scores, prob_thd=0.5, has_background=False).tolist() == [[1, pp.IGNORE_LABEL]]
    assert pp.labels_from_scores(scores, prob_thd=0.0).tolist() == [[1, 1]]


def _labels_direct(scores, prob_thd, area_thd, has_background):
    """SCLIP's rule written out: argmax areas, zero the small classes' scores, argmax again, then prob_thd."""
    first = 1 if has_background else 0
    scores = scores.clone()
    area = torch.bincount(scores.argmax(0).flatten(), minlength=scores.shape[0])[first:].float()
    scores[first:] *= (area > area_thd * area.sum()).float()[:, None, None]
    best, labels = scores.max(0)
    labels[best < prob_thd] = 0 if has_background else 255
    return labels


@pytest.mark.parametrize("has_background", [True, False])
def test_thresholds_equal_the_direct_rule(has_background):
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(6, 30, 40, generator=generator) * (1 + trial % 4)
        logits[trial % 6] += 2 * torch.rand(30, 40, generator=generator)  # one class covers more area
        scores = torch.softmax(logits, dim=0)
        for area_thd in (0.0, 0.05, 0.15, 0.3):
            for prob_thd in (0.0, 0.4):
                expected = _labels_direct(scores, prob_thd, area_thd, has_background)
                assert torch.equal(pp.labels_from_scores(scores, prob_thd, area_thd, has_background), expected)


def test_area_thd_drops_small_foreground_classes():
    # 10 pixels: class 1 wins 8, class 2 wins 1, background 1; class 2's area 1 <= 0.2 * 9 is dropped
    scores = torch.zeros(3, 1, 10)
    scores[0, 0, 0] = 0.9
    scores[1, 0, 1:9] = 0.8
    scores[2, 0, 9] = 0.7
    scores[1, 0, 9] = 0.2
    scores[0, 0, 9] = 0.1
    labels = pp.labels_from_scores(scores, area_thd=0.2)
    assert labels[0, 9] == 1 and labels[0, 0] == 0
    # the zeroed class is gone before prob_thd: pixel 9's best score is now 0.2 < 0.5 -> background
    assert pp.labels_from_scores(scores, prob_thd=0.5, area_thd=0.2)[0, 9] == 0
    # area exactly at the threshold is dropped too ("not greater than")
    assert pp.labels_from_scores(scores, area_thd=1 / 9)[0, 9] == 1
    assert pp.labels_from_scores(scores, area_thd=0.11)[0, 9] == 2


def _pamr_reference(image, mask, iterations, dilations):
    """Pixel-by-pixel PAMR straight from the spec (slow, tiny inputs only)."""
    h, w = image.shape[-2:]
    img = image[0].double()
    m = mask[0].double()

    def at(t, y, x):
        return t[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in itertools.product((-1, 0, 1), repeat=2)
               if (dy, dx) != (0, 0)]
    weights = torch.zeros(len(offsets), h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            stencil = torch.stack([at(img, y + dy * d, x + dx * d) for d in dilations
                                   for dy, dx in itertools.product((-1, 0, 1), repeat=2)], dim=1)
            sigma = stencil.std(dim=1)  # unbiased
            a = torch.stack([(-(img[:, y, x] - at(img, y + oy, x + ox)).abs() / (1e-8 + 0.1 * sigma)).mean()
                             for oy, ox in offsets])
            weights[:, y, x] = torch.softmax(a, dim=0)
    for _ in range(iterations):
        new = torch.zeros_like(m)
        for y in range(h):
            for x in range(w):
                new[:, y, x] = sum(weights[n, y, x] * at(m, y + oy, x + ox) for n, (oy, ox) in enumerate(offsets))
        m = new
    return m[None].float()


def test_pamr_equals_pixelwise_reference():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 9, 11, generator=g)
    image[:, :, :, 6:] += 1.5  # an edge the refinement should respect
    mask = torch.rand(1, 2, 9, 11, generator=g)
    ours = pp.pamr(image, mask, iterations=3, dilations=(1, 2))
    torch.testing.assert_close(ours, _pamr_reference(image, mask, 3, (1, 2)), atol=1e-5, rtol=1e-4)


def test_pamr_channel_chunks_are_exact_and_constant_maps_are_fixed_points():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 40, 50, generator=g)
    mask = torch.rand(1, 7, 40, 50, generator=g)
    whole = pp.pamr(image, mask, 10, (8, 16), channel_chunk=64)
    chunked = pp.pamr(image, mask, 10, (8, 16), channel_chunk=3)
    torch.testing.assert_close(whole, chunked)
    constant = torch.full((1, 2, 40, 50), 0.7)
    torch.testing.assert_close(pp.pamr(image, constant, 10), constant)


def test_pamr_resizes_logits_with_align_corners_true():
    image = torch.rand(1, 3, 7, 7)
    mask = torch.rand(1, 1, 4, 4)
    out = pp.pamr(image, mask, iterations=0)
    assert out.shape == (1, 1, 7, 7)
    torch.testing.assert_close(out[0, 0, 0, 0], mask[0, 0, 0, 0])  # corners are kept exactly
    torch.testing.assert_close(out[0, 0, -1, -1], mask[0, 0, -1, -1])


def test_pamr_sharpens_towards_image_edges():
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, :, 16:] = 1.0
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 14:] = 1.0  # boundary misplaced by two pixels
    refined = pp.pamr(image, mask, 10, (1, 2))[0, 0]
    # flat regions are smoothed, but nothing flows across the image edge: the step moves to column 16
    assert refined[:, 16:].min() > 0.99
    assert (refined[:, 16] - refined[:, 15]).min() > 0.7
    assert (mask[0, 0, :, 16] - mask[0, 0, :, 15]).max() == 0


def test_morphological_closing_hand_computed():
    labels = torch.tensor(np.array([
        [1, 1, 1, 1, 1],
        [1, 1, 0, 1, 1],
        [1, 1, 1, 1, 1],
        [2, 2, 2, 2, 2],
    ]))
    closed = pp.morphological_closing(labels)
    assert closed[1, 2] == 1  # the one-pixel hole is filled
    assert closed[3].tolist() == [2, 2, 2, 2, 2]
    assert closed[0].tolist() == [1, 1, 1, 1, 1]
