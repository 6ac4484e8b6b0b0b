"""The `maft` method: aggregation of proposal scores, dense fill, ensemble (spec A.6, A.11.3 item 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vocabseg.api import Segmenter
from vocabseg.methods.maft.ipclip import resize_shortest_edge
from vocabseg.methods.maft.method import ensemble_scores, seen_classes


def test_ensemble_formula_toy_numbers():
    ap = torch.tensor([[0.64, 0.25]])
    ac = torch.tensor([[0.04, 0.81]])
    seen = torch.tensor([True, False])
    code = ensemble_scores(ap, ac, seen, 0.5)
    torch.testing.assert_close(code, torch.tensor([[0.8 * 0.2, 0.5 * 0.9]]))
    lam = 0.75  # seen: Ap^λ Ac^(1-λ); unseen (code): Ap^(1-λ) Ac^λ; unseen (paper): Ac^λ
    torch.testing.assert_close(ensemble_scores(ap, ac, seen, lam),
                               torch.tensor([[0.64 ** lam * 0.04 ** 0.25, 0.25 ** 0.25 * 0.81 ** lam]]))
    torch.testing.assert_close(ensemble_scores(ap, ac, seen, lam, "paper"),
                               torch.tensor([[0.64 ** lam * 0.04 ** 0.25, 0.81 ** lam]]))
    assert torch.equal(ensemble_scores(ap, ac, seen, 0.0), ac)  # the released configs' λ = 0
    # the code gives proposals with an empty mask A^c = 1 (the paper's formula has no such rule)
    empty = torch.tensor([False])
    torch.testing.assert_close(ensemble_scores(ap, ac, seen, lam, valid=empty),
                               torch.tensor([[0.64 ** lam, 0.25 ** 0.25]]))
    torch.testing.assert_close(ensemble_scores(ap, ac, seen, lam, "paper", empty),
                               ensemble_scores(ap, ac, seen, lam, "paper"))
    assert torch.equal(ensemble_scores(ap, ac, seen, 0.0, valid=empty), ac)
    with pytest.raises(ValueError, match="ensemble_formula"):
        ensemble_scores(ap, ac, seen, 0.5, "other")


def test_seen_classes():
    assert seen_classes(("road", "person", "tree", "unknown thing"), "coco-stuff").tolist() == [
        False, True, False, False]
    assert not seen_classes(("person",), "").any()
    assert seen_classes(("road", "my cat", "tree"), "coco-stuff", ("my cat",)).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="not in the class list"):
        seen_classes(("road",), "", ("cat",))
    with pytest.raises(ValueError, match="zero-shot split"):
        seen_classes(("person",), "pc59")


def test_aggregation_and_dense_fill(backbone, voc, tmp_path):
    """GT regions as proposals: each region takes its proposal's argmax; uncovered background takes the fill's."""
    image, gt, _ = voc
    regions = [c for c in np.unique(gt) if c not in (0, 255)]
    ids = np.where(np.isin(gt, regions), gt, 0).astype(np.uint8)
    Image.fromarray(ids).save(tmp_path / "gt.png")
    classes = ["aeroplane", "bottle", "person", "sofa", "dog"]
    seg = Segmenter("maft", backbone=backbone, text_cache=False, proposals="file",
                    proposal_file=str(tmp_path / "gt.png"), input_size=96, short_side=0, crop=0)
    result = seg.segment(image, classes, background=False)
    spec = seg.class_spec(classes, background=False)
    classifier = seg.classifier(spec)
    masks = torch.stack([torch.from_numpy(ids == r).float() for r in regions])
    _, probs = seg.method.proposal_scores(backbone, torch.from_numpy(image), masks, classifier)
    for region, p in zip(regions, probs, strict=True):
        inside = ids == region
        assert (result.labels[inside] == int(p.argmax())).all()
        np.testing.assert_allclose(result.scores[:, inside][:, 0], p.numpy(), atol=1e-5)
    fill = Segmenter("sclip", backbone=backbone, text_cache=False, short_side=0, crop=0)
    dense = fill.segment(image, classes, background=False)
    uncovered = ids == 0
    assert np.array_equal(result.labels[uncovered], dense.labels[uncovered])
    assert len(np.unique(result.labels)) >= 2


def test_generator_scores_are_ensembled(backbone, chelsea, tmp_path):
    height, width = chelsea.shape[:2]
    masks = np.zeros((2, height, width), dtype=bool)
    masks[0, :, : width // 2] = True
    masks[1, :, width // 2:] = True
    scores = np.array([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1]], dtype=np.float32)
    np.savez(tmp_path / "p.npz", masks=masks, scores=scores)
    classes = ["aeroplane", "bicycle", "bird"]  # all seen in the VOC-20 split: with λ = 1, A = A^p
    seg = Segmenter("maft", backbone=backbone, text_cache=False, proposals="file",
                    proposal_file=str(tmp_path / "p.npz"),
                    input_size=96, ensemble=1.0, seen_split="voc20")
    labels = seg.segment(chelsea, classes, background=False).labels
    assert (labels[:, : width // 2] == 2).all() and (labels[:, width // 2:] == 0).all()
    bad = tmp_path / "bad.npz"
    np.savez(bad, masks=masks, scores=scores[:, :2])
    seg = Segmenter("maft", backbone=backbone, text_cache=False, proposals="file", proposal_file=str(bad),
                    input_size=96)
    with pytest.raises(ValueError, match="2 classes"):
        seg.segment(chelsea, classes, background=False)


@pytest.mark.parametrize("source", ["kmeans", "slic"])
def test_segment_photo_with_sources(backbone, chelsea, source):
    seg = Segmenter("maft", backbone=backbone, text_cache=False, proposals=source, input_size=96)
    result = seg.segment(chelsea, ["cat", "grass", "wall"], background=False)
    assert result.labels.shape == chelsea.shape[:2] and result.labels.max() < 3
    assert result.scores.shape == (3, *chelsea.shape[:2]) and np.isfinite(result.scores).all()
    assert result.meta["method"] == "maft" and result.meta["method_options"]["proposals"] == source


def test_generator_only_sum_and_mean_aggregation_and_no_fill(backbone, chelsea, tmp_path):
    """Overlapping soft masks with generator scores: ``S = sum_i A_i M_i`` (or its mean), uncovered pixels kept."""
    height, width = chelsea.shape[:2]
    masks = np.zeros((2, height, width), dtype=np.float32)
    masks[0, :, : width // 2] = 0.9
    masks[1, :, width // 4: 3 * width // 4] = 0.6
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    np.savez(tmp_path / "p.npz", masks=masks, scores=scores)
    common = dict(backbone=backbone, text_cache=False, proposals="file", proposal_file=str(tmp_path / "p.npz"),
                  input_size=96, clip_ensemble="false", fill="none")
    classes = ["cat", "grass", "wall"]
    summed = Segmenter("maft", **common).segment(chelsea, classes, background=False)
    expected = np.einsum("nc,nhw->chw", scores, masks)
    np.testing.assert_allclose(summed.scores, expected, atol=1e-6)
    assert (summed.labels[:, width // 4: width // 2] == 0).all()  # 0.63 + 0.06 beats 0.09 + 0.36 and 0.36
    assert (summed.labels[:, 3 * width // 4:] == 0).all() and (summed.scores[:, :, -1] == 0).all()  # no fill
    mean = Segmenter("maft", aggregate="mean", **common).segment(chelsea, classes, background=False)
    np.testing.assert_allclose(mean.scores, expected / np.maximum(masks.sum(0), 1e-6), atol=1e-6)
    filled = Segmenter("maft", **{**common, "fill": "sclip"}).segment(chelsea, classes, background=False)
    assert np.array_equal(filled.scores[:, :, : 3 * width // 4], summed.scores[:, :, : 3 * width // 4])
    assert filled.scores[:, :, -1].sum() > 0
    with pytest.raises(ValueError, match="aggregate"):
        Segmenter("maft", aggregate="max", **common)
    np.savez(tmp_path / "p.npz", masks=masks)
    with pytest.raises(ValueError, match="generator's scores"):
        Segmenter("maft", **common).segment(chelsea, classes, background=False)


def test_test_size_resizes_input_and_maps_back(backbone, chelsea):
    """With ``test_size`` the score maps are computed on the resized photo and resized back (bilinear)."""
    seg = Segmenter("maft", backbone=backbone, text_cache=False, proposals="slic", input_size=96, test_size=150)
    classes = ["cat", "grass", "wall"]
    result = seg.segment(chelsea, classes, background=False)
    assert result.labels.shape == chelsea.shape[:2] and result.scores.shape == (3, *chelsea.shape[:2])
    resized = resize_shortest_edge(torch.from_numpy(chelsea), 150)
    assert min(resized.shape[:2]) == 150
    scores, _ = seg.method.score_maps(backbone, resized, seg.classifier(seg.class_spec(classes, False)),
                                      seg.protocol)
    expected = torch.nn.functional.interpolate(scores[None], size=chelsea.shape[:2], mode="bilinear")[0]
    np.testing.assert_allclose(result.scores, expected.numpy(), atol=1e-6)
