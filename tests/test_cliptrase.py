"""CLIPtrase against direct computations on the tiny random CLIP, and its clustering on hand-made cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import embed, heads, softmax_rows

from vocabseg.methods import registry
from vocabseg.methods.base import Method
from vocabseg.methods.cliptrase.method import (
    CLIPTRASE_DATASETS,
    cluster_assignment,
    cluster_maps,
    dbscan_labels,
    denoised_correlation,
    majority_vote,
    median_filter,
    paper_resize,
)
from vocabseg.models.encoder import Models
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.run import Dense, Prepared, finish, run
from vocabseg.text.classes import ClassSpec
from vocabseg.text.classifier import TextClassifier


@pytest.mark.parametrize("which", ["peaked", "spread"])
def test_correlation_matrix_equals_head_by_head_cosines(which, request):
    model = request.getfixturevalue("tiny_model" if which == "peaked" else "spread_model")
    clip = request.getfixturevalue("clip" if which == "peaked" else "spread_clip")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, grid, ours = registry.create("cliptrase").encode(clip.image, images, correlation=True)
        blocks = model.visual.transformer.resblocks
        x = blocks[0](embed(model, images))  # blocks 1 .. L-2 unchanged; L-1 = 2nd block of 3
        q, k, v = heads(blocks[1], x)
        reference = torch.zeros(2, 17, 17)
        for b in range(2):
            for h in range(len(q)):
                for t in (q, k, v):
                    vectors = t[h][b]
                    cos = torch.cosine_similarity(vectors[:, None], vectors[None], dim=-1)
                    reference[b] += cos / 3 / len(q)
    assert grid == (4, 4) and ours.shape == (2, 17, 17)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.diagonal(dim1=-2, dim2=-1), torch.ones(2, 17), atol=1e-5, rtol=0)


def test_last_block_is_qq_kk_vv_with_residual_and_ffn(spread_clip, spread_model):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, _, _ = registry.create("cliptrase").encode(spread_clip.image, images)
        blocks = spread_model.visual.transformer.resblocks
        x = blocks[1](blocks[0](embed(spread_model, images)))  # block L-1 runs normally
        last = blocks[2]
        q, k, v = heads(last, x)
        s = 1 / math.sqrt(q[0].shape[-1])
        outs = [sum(softmax_rows(s * t[h] @ t[h].transpose(-1, -2)) for t in (q, k, v)) @ v[h]
                for h in range(len(q))]
        x = x + last.attn.out_proj(torch.cat(outs, dim=-1))
        x = x + last.mlp(last.ln_2(x))
        reference = F.normalize(spread_model.visual.ln_post(x) @ spread_model.visual.proj, dim=-1)
    torch.testing.assert_close(features, reference, atol=2e-5, rtol=1e-4)
    patch, grid = registry.create("cliptrase").patch_features(spread_clip.image, images)
    torch.testing.assert_close(patch, features[:, 1:])
    assert grid == (4, 4)


def test_denoised_correlation_subtracts_the_class_token_row():
    w = torch.tensor([[1.0, 0.5, 0.2, 0.9],
                      [0.5, 1.0, 0.1, 0.3],
                      [0.2, 0.1, 1.0, 0.7],
                      [0.9, 0.3, 0.7, 1.0]])
    expected = torch.tensor([[0.5, 0.0, 0.0],   # 1.0-0.5, 0.1-0.2 < 0, 0.3-0.9 < 0
                             [0.0, 0.8, 0.0],
                             [0.0, 0.5, 0.1]])
    torch.testing.assert_close(denoised_correlation(w), expected)


def _two_region_rows(grid=(4, 6), noise_row=None):
    """Correlation rows of a grid whose left half and right half are two clear groups (an optional outlier)."""
    gh, gw = grid
    left = torch.zeros(gh, gw)
    left[:, : gw // 2] = 1.0
    right = 1.0 - left
    rows = torch.stack([left.flatten() if j < gw // 2 else right.flatten()
                        for i in range(gh) for j in range(gw)])
    rows = rows + 0.01 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(0))
    if noise_row is not None:
        rows[noise_row] = torch.linspace(0, 3, rows.shape[1])
    return rows.clamp(min=0)


def test_dbscan_clusters_and_majority_vote_on_a_hand_made_case():
    grid = (4, 6)
    rows = _two_region_rows(grid, noise_row=5)
    labels = dbscan_labels(rows, eps=0.5, min_samples=3)
    from sklearn.cluster import DBSCAN

    assert np.array_equal(labels, DBSCAN(eps=0.5, min_samples=3).fit_predict(rows.numpy()))
    assert labels[5] == -1 and set(labels) == {-1, 0, 1}
    maps = cluster_maps(rows, labels, grid)
    members0 = torch.as_tensor(labels == 0)
    torch.testing.assert_close(maps[0].flatten(), rows[members0].mean(dim=0))
    assignment = cluster_assignment(maps, (32, 48), ratio=4, median=7)
    left_cluster = int(labels[0])
    assert (assignment[:, :20] == left_cluster).all() and (assignment[:, 28:] == 1 - left_cluster).all()

    # Predictions: the left half mostly 2 (some 1), the right half mostly 3 (some 0 and 255).
    preds = torch.full((32, 48), 2, dtype=torch.long)
    preds[:, 24:] = 3
    preds[:5, :5] = 1
    preds[10:14, 30:40] = 0
    preds[20:22, 40:44] = 255
    voted = majority_vote(preds, assignment, 2)
    expected = torch.where(assignment == left_cluster, 2, 3)
    assert torch.equal(voted, expected)
    # Ties go to the smallest label.
    tie = torch.tensor([[4, 7], [7, 4]])
    assert torch.equal(majority_vote(tie, torch.zeros(2, 2, dtype=torch.long), 1), torch.full((2, 2), 4))


def test_majority_vote_ties_take_the_smallest_label():
    labels = torch.tensor([[7, 2, 2, 0], [7, 255, 255, 0]])
    assignment = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1]])  # cluster 0: two 7s, two 2s, two 255s
    assert majority_vote(labels, assignment, 3).tolist() == [[2, 2, 2, 0], [2, 2, 2, 0]]


@pytest.mark.parametrize("size", [2, 3, 4, 7])
@pytest.mark.parametrize("shape", [(3, 56, 84), (2, 5, 9), (1, 3, 2)])
def test_median_filter_equals_scipy(size, shape):
    from scipy.ndimage import median_filter as scipy_median

    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(size))
    maps[0, :2, :2] = 0.5  # ties
    expected = np.stack([scipy_median(m, size=size) for m in maps.numpy()])
    np.testing.assert_array_equal(median_filter(maps, size).numpy(), expected)


def test_method_clusters_vote_and_no_cluster_keeps_the_argmax():
    grid = (4, 6)
    rows = _two_region_rows(grid)
    corr = torch.zeros(25, 25)
    corr[1:, 1:] = rows  # class-token row zero: R = rows
    method = registry.create("cliptrase", eps=0.5, min_samples=3)
    assignment, count = method.clusters(corr, grid, (32, 48))
    assert count == 2 and assignment.shape == (32, 48)
    none, zero = registry.create("cliptrase", eps=1e-6, min_samples=2).clusters(corr, grid, (32, 48))
    assert none is None and zero == 0
    # Through the pipeline's tail: logits that favour class 1 left and class 2 right, with a few pixels flipped.
    spec = ClassSpec(labels=("a", "b", "c"), names=(("a",), ("b",), ("c",)), has_background=False)
    classifier = TextClassifier(spec=spec, embeddings=torch.eye(3), query_class=torch.arange(3))
    logits = torch.zeros(3, 32, 48)
    logits[1, :, :24] = 1
    logits[2, :, 24:] = 1
    logits[0, :3, :3] = 5
    protocol = Protocol(short_side=None, crop=None, logit_scale=100.0)
    prepared = Prepared(torch.zeros(32, 48, 3, dtype=torch.uint8), torch.zeros(1, 3, 32, 48))
    out = finish(method, prepared, Dense(logits, masks=method.cluster_masks(corr, grid, (32, 48))), classifier,
                 protocol)
    assert (out.labels[:, :20] == 1).all() and (out.labels[:, 28:] == 2).all()
    assert out.masks.shape == (2, 32, 48) and out.masks.sum(0).eq(1).all()
    unclustered = registry.create("cliptrase", eps=1e-6, min_samples=2)
    raw = finish(unclustered, prepared, Dense(logits, masks=unclustered.cluster_masks(corr, grid, (32, 48))),
                 classifier, protocol)
    assert torch.equal(raw.labels, logits.argmax(0)) and raw.masks.shape == (0, 32, 48)


def test_paper_resize_matches_torchvision(chelsea):
    import torchvision.transforms as T
    from PIL import Image

    image = torch.from_numpy(chelsea)  # 300 x 451
    for size, crop in ((224, True), (336, True), (224, False)):
        ours, box = paper_resize(image, size, crop)
        transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
                              + ([T.CenterCrop(size)] if crop else []))
        reference = np.asarray(transform(Image.fromarray(chelsea)))
        assert np.array_equal(ours.numpy(), reference)
        if crop:
            (top, bottom, left, right), resized = box
            assert bottom - top == right - left == size and resized == (size, int(size * 451 / 300))
        else:
            assert box is None


def _classifier(clip, names=("cat", "dog", "sofa")):
    spec = ClassSpec(labels=tuple(names), names=tuple((n,) for n in names), has_background=False)
    return TextClassifier.build(clip.text, spec)


def _predict(method, clip, image, classifier, protocol):
    return run(method, Models({"clip": clip}), [image], classifier, protocol)[0]


def test_paper_protocol_maps_the_centre_crop_back(clip):
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    clf = _classifier(clip)
    protocol = Protocol(short_side=64, crop=None, logit_scale=100.0)
    # eps large, min_samples 1: one cluster of every patch, so the crop takes its majority class.
    method = registry.create("cliptrase", center_crop=True, eps=100.0, min_samples=1)
    out = _predict(method, clip, image, clf, protocol)
    y1, y2, x1, x2 = out.meta["crop_box"]
    assert (y1, y2) == (0, 80) and (x1, x2) == (20, 100)  # 64 x 96 resized, crop columns 16..80 -> 20..100
    labels = out.labels
    assert labels.shape == (80, 120) and (labels[:, :x1] == 255).all() and (labels[:, x2:] == 255).all()
    inside = labels[y1:y2, x1:x2]
    assert inside.unique().numel() == 1 and int(inside[0, 0]) < 3
    assert out.masks.shape == (1, 80, 120) and out.masks[0, :, x1:x2].all() and not out.masks[0, :, :x1].any()
    assert out.logits.shape == (3, 80, 120) and out.scores.shape == (3, 80, 120)
    # Without clustering the crop keeps the argmax of the logits.
    raw = _predict(registry.create("cliptrase", center_crop=True, clustering=False), clip, image, clf, protocol)
    torch.testing.assert_close(raw.logits, out.logits)
    # (labels are computed on the crop and resampled nearest; logits bilinearly: they agree but at edges)
    agree = (raw.labels[:, x1:x2] == raw.logits[:, :, x1:x2].argmax(0)).float().mean()
    assert agree > 0.9
    # Whole image (the default for custom images): the result covers every pixel.
    whole = _predict(registry.create("cliptrase"), clip, image, clf, protocol)
    assert whole.labels.shape == (80, 120) and (whole.labels < 3).all() and "crop_box" not in whole.meta


def test_cls_prior_has_the_argmax_of_the_official_product(clip):
    method = registry.create("cliptrase", cls_prior=True)
    logits = torch.randn(4, 5, 6)
    cls_feature = F.normalize(torch.randn(8), dim=0)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    ours = method._cls_prior(logits, cls_feature, text)
    official = (100 * logits) * (100 * (cls_feature @ text.T))[:, None, None]
    assert torch.equal(ours.argmax(0), official.argmax(0))


def test_harness_protocol_equals_the_common_harness_without_clustering(clip):
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    clf = _classifier(clip)
    protocol = Protocol(short_side=64, crop=64, stride=32, logit_scale=40.0, pamr=True)
    method = registry.create("cliptrase", protocol_mode="harness", clustering=False)
    ours = _predict(method, clip, image, clf, protocol)
    models = Models({"clip": clip})
    with torch.inference_mode():
        prepared = Method.prepare(method, models, image, protocol)
        common = finish(method, prepared, Method.dense(method, models, [prepared], clf, protocol)[0], clf, protocol)
    torch.testing.assert_close(ours.logits, common.logits)
    assert torch.equal(ours.labels, common.labels)
    whole = _predict(registry.create("cliptrase", protocol_mode="harness", eps=100.0, min_samples=1), clip, image,
                     clf, protocol.replace(crop=None))
    assert whole.masks.shape == (1, 80, 120) and whole.labels.unique().numel() == 1


def test_forward_passes():
    paper = registry.create("cliptrase")
    assert paper.forward_passes(375, 500, paper.default_protocol) == 1
    harness = registry.create("cliptrase", protocol_mode="harness")
    protocol = Protocol(short_side=336, crop=224, stride=112)
    assert harness.forward_passes(375, 500, protocol) == 6 + 1  # windows + the whole-image clustering pass
    without = registry.create("cliptrase", protocol_mode="harness", clustering=False)
    assert without.forward_passes(375, 500, protocol) == 6


def test_presets_and_dbscan_defaults():
    presets = registry.method_class("cliptrase").presets
    assert len(presets) == 18 and len(CLIPTRASE_DATASETS) == 9
    for dataset in CLIPTRASE_DATASETS:
        for size, eps, min_samples in ((224, 0.7, 3), (336, 1.1, 7)):
            p = presets[f"{dataset}-{size}"]
            assert p.protocol.short_side == size and not p.protocol.crop and not p.protocol.pamr
            assert p.names == f"{dataset}.cliptrase" and p.dataset == dataset
            assert p.options["eps"] == eps and p.options["min_samples"] == min_samples
            assert p.options["center_crop"] and p.options["protocol_mode"] == "paper"
            assert p.options["cls_prior"] == (dataset == "voc20")
    spec = presets["voc21-224"].class_spec()
    assert spec.has_background and "beachhill" in spec.names[0] and spec.names[20] == ("tv",)
    method = registry.create("cliptrase")
    assert method.dbscan_params(196) == (0.7, 3) and method.dbscan_params(441) == (1.1, 7)
    assert method.dbscan_params(588) == (1.1, 7)
    assert registry.create("cliptrase", eps=0.9).dbscan_params(196) == (0.9, 3)
    with pytest.raises(ValueError, match="protocol_mode"):
        registry.create("cliptrase", protocol_mode="slide")


def test_segmenter_returns_the_clusters_as_masks(clip):
    from vocabseg import Segmenter

    seg = Segmenter("cliptrase", models={"clip": clip}, text_cache=False, short_side=64, eps=100.0, min_samples=1)
    out = seg.segment(np.random.default_rng(2).integers(0, 255, (64, 80, 3), dtype=np.uint8), ["cat", "dog"])
    assert isinstance(out.masks, np.ndarray) and out.masks.dtype == bool and out.masks.shape == (1, 64, 80)
    seg = Segmenter("cliptrase", models={"clip": clip}, text_cache=False, preset="voc20-224")
    assert seg.method.cls_prior and seg.method.center_crop and seg.method.eps == 0.7
    out = seg.segment(np.random.default_rng(2).integers(0, 255, (100, 150, 3), dtype=np.uint8))
    assert out.labels.shape == (100, 150) and out.meta["crop_box"] == [0, 100, 25, 125]
