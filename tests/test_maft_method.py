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


def test_aggregation_and_dense_fill(clip, voc, tmp_path):
    """GT regions as proposals: each region takes its proposal's argmax; uncovered background takes the fill's."""
    image, gt, _ = voc
    regions = [c for c in np.unique(gt) if c not in (0, 255)]
    ids = np.where(np.isin(gt, regions), gt, 0).astype(np.uint8)
    Image.fromarray(ids).save(tmp_path / "gt.png")
    classes = ["aeroplane", "bottle", "person", "sofa", "dog"]
    seg = Segmenter("maft", models={"clip": clip}, text_cache=False, proposals="file",
                    proposal_file=str(tmp_path / "gt.png"), input_size=96, short_side=0, crop=0)
    result = seg.segment(image, classes, background=False)
    spec = seg.class_spec(classes, background=False)
    classifier = seg.classifier(spec)
    masks = torch.stack([torch.from_numpy(ids == r).float() for r in regions])
    _, probs = seg.method.proposal_scores(seg.models, torch.from_numpy(image), masks, classifier)
    for region, p in zip(regions, probs, strict=True):
        inside = ids == region
        assert (result.labels[inside] == int(p.argmax())).all()
        np.testing.assert_allclose(result.scores[:, inside][:, 0], p.numpy(), atol=1e-5)
    fill = Segmenter("sclip", models={"clip": clip}, text_cache=False, short_side=0, crop=0)
    dense = fill.segment(image, classes, background=False)
    uncovered = ids == 0
    assert np.array_equal(result.labels[uncovered], dense.labels[uncovered])
    assert len(np.unique(result.labels)) >= 2


def test_generator_scores_are_ensembled(clip, chelsea, tmp_path):
    height, width = chelsea.shape[:2]
    masks = np.zeros((2, height, width), dtype=bool)
    masks[0, :, : width // 2] = True
    masks[1, :, width // 2:] = True
    scores = np.array([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1]], dtype=np.float32)
    np.savez(tmp_path / "p.npz", masks=masks, scores=scores)
    classes = ["aeroplane", "bicycle", "bird"]  # all seen in the VOC-20 split: with λ = 1, A = A^p
    seg = Segmenter("maft", models={"clip": clip}, text_cache=False, proposals="file",
                    proposal_file=str(tmp_path / "p.npz"),
                    input_size=96, ensemble=1.0, seen_split="voc20")
    labels = seg.segment(chelsea, classes, background=False).labels
    assert (labels[:, : width // 2] == 2).all() and (labels[:, width // 2:] == 0).all()
    bad = tmp_path / "bad.npz"
    np.savez(bad, masks=masks, scores=scores[:, :2])
    seg = Segmenter("maft", models={"clip": clip}, text_cache=False, proposals="file", proposal_file=str(bad),
                    input_size=96)
    with pytest.raises(ValueError, match="2 classes"):
        seg.segment(chelsea, classes, background=False)


@pytest.mark.parametrize("source", ["kmeans", "slic"])
def test_segment_photo_with_sources(clip, chelsea, source):
    seg = Segmenter("maft", models={"clip": clip}, text_cache=False, proposals=source, input_size=96)
    result = seg.segment(chelsea, ["cat", "grass", "wall"], background=False)
    assert result.labels.shape == chelsea.shape[:2] and result.labels.max() < 3
    assert result.scores.shape == (3, *chelsea.shape[:2]) and np.isfinite(result.scores).all()
    assert result.meta["method"] == "maft" and result.meta["method_options"]["proposals"] == source


def test_generator_only_sum_and_mean_aggregation_and_no_fill(clip, chelsea, tmp_path):
    """Overlapping soft masks with generator scores: ``S = sum_i A_i M_i`` (or its mean), uncovered pixels kept."""
    height, width = chelsea.shape[:2]
    masks = np.zeros((2, height, width), dtype=np.float32)
    masks[0, :, : width // 2] = 0.9
    masks[1, :, width // 4: 3 * width // 4] = 0.6
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    np.savez(tmp_path / "p.npz", masks=masks, scores=scores)
    common = dict(models={"clip": clip}, text_cache=False, proposals="file", proposal_file=str(tmp_path / "p.npz"),
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


def test_test_size_resizes_input_and_maps_back(clip, chelsea):
    """With ``test_size`` the score maps are computed on the resized photo and resized back (bilinear)."""
    common = dict(models={"clip": clip}, text_cache=False, proposals="slic", input_size=96)
    classes = ["cat", "grass", "wall"]
    result = Segmenter("maft", test_size=150, **common).segment(chelsea, classes, background=False)
    assert result.labels.shape == chelsea.shape[:2] and result.scores.shape == (3, *chelsea.shape[:2])
    resized = resize_shortest_edge(torch.from_numpy(chelsea), 150)
    assert min(resized.shape[:2]) == 150
    at_test_size = Segmenter("maft", **common).results([resized.numpy()], classes, background=False)[0]
    assert at_test_size.scores.shape == (3, *resized.shape[:2])
    expected = torch.nn.functional.interpolate(at_test_size.scores[None], size=chelsea.shape[:2], mode="bilinear")[0]
    np.testing.assert_allclose(result.scores, expected.numpy(), atol=1e-6)


def test_fill_classifier_uses_the_segmenters_text_cache_only(clip, chelsea, tmp_path, monkeypatch):
    """MAFT's classifier and the fill's are built through the segmenter's cache: nothing on disk without one."""
    default = tmp_path / "default-cache"
    monkeypatch.setenv("VOCABSEG_CACHE", str(default))
    common = dict(models={"clip": clip}, proposals="slic", input_size=64)
    classes = ["cat", "grass", "wall"]
    seg = Segmenter("maft", text_cache=False, **common)
    classifier = seg.classifier(seg.class_spec(classes, background=False))
    assert classifier.fill is not None and classifier.fill.embeddings.shape == classifier.embeddings.shape
    assert not torch.allclose(classifier.fill.embeddings, classifier.embeddings)  # ImageNet vs ViLD templates
    seg.segment(chelsea, classes, background=False)
    assert not default.exists()
    own = tmp_path / "own-cache"
    Segmenter("maft", text_cache=own, **common).segment(chelsea, classes, background=False)
    assert len(list(own.iterdir())) == 2 and not default.exists()  # one file per template set
    assert Segmenter("maft", text_cache=False, fill="none", **common).classifier(
        seg.class_spec(classes, background=False)).fill is None


def test_every_clip_pass_runs_at_the_protocol_precision(clip, chelsea, monkeypatch, tmp_path):
    """CLIPtrase proposals, IP-CLIP and the fill: each image-encoder pass under bf16 autocast."""
    seen = []
    embed = type(clip.image).embed

    def spy(self, images, resize=None):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return embed(self, images, resize)

    monkeypatch.setattr(type(clip.image), "embed", spy)
    common = dict(models={"clip": clip}, text_cache=False, input_size=64, precision="bf16", window_batch=1)
    seg = Segmenter("maft", proposals="cliptrase", **common)
    assert np.isfinite(seg.segment(chelsea, ["cat", "grass"], background=False).scores).all()
    assert seen == [torch.bfloat16] * 2  # the clusters (they cover every pixel: no fill) and IP-CLIP
    ids = np.zeros(chelsea.shape[:2], dtype=np.uint8)
    ids[:, :200] = 1
    Image.fromarray(ids).save(tmp_path / "left.png")
    seen.clear()
    seg = Segmenter("maft", proposals="file", proposal_file=str(tmp_path / "left.png"), **common)
    seg.segment(chelsea, ["cat", "grass"], background=False)
    fill_passes = seg.method._fill.forward_passes(*chelsea.shape[:2], seg.protocol)
    assert fill_passes > 1 and seen == [torch.bfloat16] * (1 + fill_passes)  # IP-CLIP, the fill's windows


def test_images_share_passes_and_give_the_single_image_results(clip, chelsea, voc):
    common = dict(models={"clip": clip}, text_cache=False, proposals="kmeans", input_size=64)
    classes = ["cat", "grass", "wall"]
    photos = [chelsea, voc[0]]
    single = [Segmenter("maft", window_batch=1, **common).segment(p, classes, background=False) for p in photos]
    batch = Segmenter("maft", window_batch=2, **common).segment_batch(photos, classes, background=False)
    for one, both in zip(single, batch, strict=True):
        np.testing.assert_allclose(both.scores, one.scores, atol=1e-5)
        assert (both.labels == one.labels).mean() > 0.999


def test_refused_settings(clip):
    with pytest.raises(ValueError, match="itself"):
        Segmenter("maft", models={"clip": clip}, fill="maft")
    with pytest.raises(ValueError, match="unknown method"):
        Segmenter("maft", models={"clip": clip}, fill="nonsense")
    with pytest.raises(ValueError, match="proposals must be one of"):
        Segmenter("maft", models={"clip": clip}, proposals="felzenszwalb")
    method = Segmenter("maft", models={"clip": clip}, proposals="slic").method
    assert method.forward_passes(188, 250, method.default_protocol) == 1
    method = Segmenter("maft", models={"clip": clip}).method  # kmeans: one more CLIP pass
    assert method.forward_passes(188, 250, method.default_protocol) == 2
