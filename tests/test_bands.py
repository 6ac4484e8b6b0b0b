"""The common tail in row bands (bounded memory) computes what the whole-image tail computes."""

from __future__ import annotations

import pytest
import torch

from vocabseg.pipeline import run
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.windows import upsample, upsample_rows
from vocabseg.text.classes import parse_classes
from vocabseg.text.classifier import TextClassifier


@pytest.mark.parametrize("shape", [(21, 28, 188, 250), (100, 133, 401, 533), (30, 40, 15, 20), (6, 6, 6, 6)])
def test_upsampled_rows_equal_the_whole_resize(shape):
    h, w, big_h, big_w = shape
    maps = torch.randn(3, h, w, generator=torch.Generator().manual_seed(0))
    whole = upsample(maps, (big_h, big_w))
    for start, stop in [(0, big_h), (0, 1), (big_h - 1, big_h), (big_h // 3, big_h // 2 + 1)]:
        torch.testing.assert_close(upsample_rows(maps, (big_h, big_w), start, stop), whole[:, start:stop],
                                   rtol=0, atol=1e-6)


def _classifier(classes, background) -> TextClassifier:
    spec = parse_classes(classes, background)
    embeddings = torch.nn.functional.normalize(torch.randn(len(spec.query_class), 8), dim=-1)
    return TextClassifier(spec, embeddings, torch.tensor(spec.query_class))


@pytest.mark.parametrize("protocol", [
    Protocol(logit_scale=50),
    Protocol(logit_scale=50, prob_thd=0.4, area_thd=0.2),
    Protocol(logit_scale=50, pamr=True, pamr_steps=3, pamr_dilations=(1, 2)),
    Protocol(logit_scale=50, prob_thd=0.3, area_thd=0.15, pamr=True, pamr_steps=2, pamr_dilations=(2, 4)),
], ids=["plain", "thresholds", "pamr", "pamr-thresholds"])
@pytest.mark.parametrize("kept_bytes", [0, 2**30], ids=["recomputed", "kept"])
def test_banded_labels_equal_the_whole_image_labels(monkeypatch, protocol, kept_bytes):
    generator = torch.Generator().manual_seed(1)
    classifier = _classifier(["cat|kitten", "dog", "tree", "sky"], ["wall", "floor"])
    queries = len(classifier.spec.query_class)
    logits = torch.randn(queries, 9, 12, generator=generator) * 0.1
    tree = classifier.spec.labels.index("tree")
    sky = classifier.spec.labels.index("sky")
    logits[classifier.query_class == sky, :, 5:] += 0.3  # most of the foreground
    logits[classifier.query_class == tree, 2:4, 1:3] += 0.5  # a small "tree" region, dropped by the area rule
    guide = torch.randn(3, 30, 40, generator=generator)
    size = (61, 83)
    whole_logits = upsample(logits, size)
    _, expected = run.scores_and_labels(whole_logits, guide, classifier, protocol)
    monkeypatch.setattr(run, "BAND_BYTES", 1)  # bands of 8 rows (or the PAMR context)
    monkeypatch.setattr(run, "KEPT_SCORES_BYTES", kept_bytes)  # the area rule's bands computed again, or kept
    banded = run.banded_labels(logits, guide, size, classifier, protocol)
    assert banded.shape == expected.shape
    assert (banded == expected).float().mean() >= 0.999
    if protocol.area_thd:  # the rule is exercised: the region wins without it and is dropped with it
        _, unruled = run.scores_and_labels(whole_logits, guide, classifier, protocol.replace(area_thd=None))
        assert (unruled == tree).any() and not (banded == tree).any()
