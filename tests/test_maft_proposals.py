"""MAFT proposal sources on real photos (spec A.11.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vocabseg.methods import registry
from vocabseg.methods.base import Method
from vocabseg.methods.maft import proposals as P
from vocabseg.methods.maft.losses import soft_iou
from vocabseg.models.encoder import Models
from vocabseg.pipeline.run import Dense, Prepared
from vocabseg.text.classes import parse_classes
from vocabseg.text.classifier import TextClassifier


def test_perturb_gt_spreads_iou(voc):
    _, gt, _ = voc
    masks = P.perturb_gt(gt, np.random.default_rng(0), max_proposals=64)
    again = P.perturb_gt(gt, np.random.default_rng(0), max_proposals=64)
    assert masks.dtype == bool and masks.shape[1:] == gt.shape and np.array_equal(masks, again)
    classes = [c for c in np.unique(gt) if c != 255]
    iou = soft_iou(torch.from_numpy(masks).float(), torch.stack([torch.from_numpy(gt == c) for c in classes]))
    assert torch.allclose(iou.amax(0), torch.ones(len(classes)), atol=1e-6)  # each GT mask itself is a proposal
    middling = ((iou > 0.05) & (iou < 0.95)).sum(0)
    assert (middling >= 2).all()  # and several imperfect ones per class
    assert len(P.perturb_gt(gt, np.random.default_rng(1), max_proposals=5)) == 5
    assert P.perturb_gt(np.full((8, 8), 255), np.random.default_rng(0)).shape[1:] == (8, 8)


def test_proposal_files(tmp_path):
    masks = np.zeros((2, 4, 6), dtype=bool)
    masks[0, :2] = True
    masks[1, :, 3:] = True
    np.savez(tmp_path / "p.npz", masks=masks, scores=np.eye(2, 3, dtype=np.float32))
    loaded = P.read_proposal_file(tmp_path / "p.npz")
    assert torch.equal(loaded.masks, torch.from_numpy(masks).float()) and loaded.scores.shape == (2, 3)
    assert P.read_proposal_file(tmp_path / "p.npz", (8, 12)).masks.shape == (2, 8, 12)
    ids = np.array([[0, 0, 7, 7], [3, 3, 7, 7]], dtype=np.uint8)
    Image.fromarray(ids).save(tmp_path / "i.png")
    png = P.read_proposal_file(tmp_path / "i.png", (4, 8))
    assert png.scores is None and png.masks.shape == (2, 4, 8)
    assert png.masks[0].tolist() == [[0] * 8, [0] * 8, [1] * 4 + [0] * 4, [1] * 4 + [0] * 4]  # id 3, nearest
    np.savez(tmp_path / "bad.npz", other=masks)
    with pytest.raises(ValueError, match="'masks'"):
        P.read_proposal_file(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="not found"):
        P.read_proposal_file(tmp_path / "missing.npz")


def test_generator_output_files(tmp_path):
    """Raw Mask2Former outputs: mask logits over the padded input (``align_corners=True``), void-last class logits."""
    logits = torch.tensor([[[-4.0, 0.0, 4.0], [2.0, 2.0, 2.0], [-8.0, -8.0, 6.0]],
                           [[-12.0] * 3] * 3])
    class_logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    np.savez(tmp_path / "g.npz", mask_logits=logits.numpy(), class_logits=class_logits.numpy())
    props = P.read_proposal_file(tmp_path / "g.npz", (4, 5), canvas=(5, 5))
    assert props.padded.shape == (2, 5, 5) and props.masks.shape == (2, 4, 5)
    torch.testing.assert_close(props.padded[:, ::2, ::2], logits.sigmoid())  # grid points land on pixels 0, 2, 4
    torch.testing.assert_close(props.padded[0, 1, 2], torch.tensor((0.0 + 2.0) / 2).sigmoid())  # midway
    assert torch.equal(props.masks, props.padded[:, :4])
    probs = class_logits.softmax(-1)
    torch.testing.assert_close(props.scores, probs[:, :2])  # void dropped, rows not renormalised
    assert props.scores.sum(1)[1] < 0.2
    assert torch.equal(P.read_proposal_file(tmp_path / "g.npz", (5, 5)).padded, props.padded)  # canvas = size
    with pytest.raises(ValueError, match="image size"):
        P.read_proposal_file(tmp_path / "g.npz")
    with pytest.raises(ValueError, match="smaller than the image"):
        P.read_proposal_file(tmp_path / "g.npz", (6, 5), canvas=(5, 5))


def test_kmeans_separates_clusters():
    x = torch.cat([torch.randn(20, 3) * 0.1, torch.randn(30, 3) * 0.1 + 4, torch.randn(10, 3) * 0.1 - 4])
    assignment = P.kmeans(x, 3)
    groups = [set(assignment[s].tolist()) for s in (slice(0, 20), slice(20, 50), slice(50, 60))]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3


def test_kmeans_proposals_on_photo(clip, chelsea):
    image = torch.from_numpy(chelsea)
    props, again = P.kmeans_proposals(Models({"clip": clip}), [image, image], ks=(2, 3, 4))
    masks = props.masks
    assert props.source == "kmeans" and masks.shape[1:] == chelsea.shape[:2] and 3 <= len(masks) <= 64
    assert masks.min() >= 0 and masks.max() <= 1
    binary = masks >= 0.5
    assert binary.any(0).float().mean() > 0.9  # clusters of k = 2 cover the photo (up to tiny components)
    assert len({tuple(m.flatten()[::97].tolist()) for m in binary}) == len(binary)  # no duplicates
    assert torch.equal(again.masks, masks)  # the two images shared a forward pass


def test_slic_proposals_on_photo(chelsea):
    props = P.slic_proposals(torch.from_numpy(chelsea), n_segments=(4, 12))
    per_pixel = props.masks.sum(0)
    assert props.masks.shape[1:] == chelsea.shape[:2]
    assert per_pixel.min() >= 1 and per_pixel.max() <= 2  # each scale partitions the image
    assert 6 <= len(props.masks) <= 30


class _FakeTrase(Method):
    name = "cliptrase"

    def prepare(self, models, image, protocol, image_id=None):
        return Prepared(image, image.new_zeros(1, 3, 1, 1, dtype=torch.float32), image_id)

    def dense(self, models, inputs, classifier, protocol):
        out = []
        for prepared in inputs:
            ids = torch.zeros(prepared.size, dtype=torch.long)
            ids[:, prepared.size[1] // 2:] = 4
            out.append(Dense(ids.float()[None], masks=torch.stack([ids == 0, ids == 4])))
        return out


def test_cliptrase_source(monkeypatch, clip, chelsea):
    image = torch.from_numpy(chelsea)
    models = Models({"clip": clip})
    spec = parse_classes(["cat", "grass"], background=False)
    classifier = TextClassifier.build(clip.text, spec)
    real = P.generate_proposals("cliptrase", models, [image], classifier)[0]  # the method's own clusters
    assert real.source == "cliptrase" and real.masks.shape[1:] == chelsea.shape[:2] and len(real.masks)
    assert (real.masks.sum(0) == 1).all()  # every pixel belongs to exactly one cluster
    monkeypatch.setitem(registry.available(), "cliptrase", _FakeTrase)
    props = P.generate_proposals("cliptrase", models, [image], classifier)[0]
    assert props.masks.shape == (2, *chelsea.shape[:2])
    assert props.masks[0, :, :225].all() and not props.masks[0, :, 226:].any()


def test_sam_and_unknown_sources(clip, chelsea):
    image = torch.from_numpy(chelsea)
    models = Models({"clip": clip})
    with pytest.raises(ValueError, match=r"transformers|sam_weights"):
        P.generate_proposals("sam", models, [image])
    with pytest.raises(ValueError, match="unknown proposal source"):
        P.generate_proposals("felzenszwalb", models, [image])
    with pytest.raises(ValueError, match="proposal_file"):
        P.generate_proposals("file", models, [image])
