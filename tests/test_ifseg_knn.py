"""kNN probability smoothing: hand-computed case, fixed points, identity, chunked/batched equals direct."""

import pytest
import torch
import torch.nn.functional as F

from vocabseg.methods.ifseg.knn import knn_indices, knn_smooth


def _direct(probs, features, k, iters):
    """Reference: full similarity matrix, explicit per-token averaging, one image at a time."""
    out = []
    for p, f in zip(probs, features, strict=True):
        f = F.normalize(f, dim=-1)
        neighbours = (f @ f.T).topk(k, dim=-1).indices
        for _ in range(iters):
            p = torch.stack([p[neighbours[i]].mean(0) for i in range(len(p))])
        out.append(p)
    return torch.stack(out)


def test_hand_computed_two_pairs():
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 90.0, 100.0]))
    features = torch.stack([angles.cos(), angles.sin()], dim=1)[None]
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.2, 0.8], [0.6, 0.4]]])
    assert knn_indices(features, 2)[0].sort(dim=-1).values.tolist() == [[0, 1], [0, 1], [2, 3], [2, 3]]
    out = knn_smooth(probs, features, k=2, iters=1)
    assert torch.allclose(out, torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.4, 0.6], [0.4, 0.6]]]))


def _clusters(seed=0, per=6, dim=16):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:3] * 5
    labels = torch.arange(3).repeat_interleave(per)
    features = centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=gen)
    perm = torch.randperm(len(labels), generator=gen)
    return features[perm], labels[perm]


def test_map_constant_on_feature_clusters_is_a_fixed_point():
    features, labels = _clusters()
    per_cluster = torch.softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(1)), dim=-1)
    probs = per_cluster[labels][None]
    out = knn_smooth(probs, features[None], k=3, iters=25)
    assert torch.allclose(out, probs, atol=1e-6)
    # a map that is not constant on the clusters does change
    noisy = torch.softmax(torch.randn(1, len(labels), 5), dim=-1)
    assert not torch.allclose(knn_smooth(noisy, features[None], k=3, iters=1), noisy)


def test_k1_zero_iterations_is_identity():
    probs = torch.softmax(torch.randn(2, 10, 4), dim=-1)
    features = torch.randn(2, 10, 8)
    assert torch.equal(knn_smooth(probs, features, k=1, iters=0), probs)
    assert torch.equal(knn_smooth(probs, features, k=3, iters=0), probs)
    assert torch.equal(knn_smooth(probs, features, k=1, iters=5), probs)  # each token's nearest is itself


def test_chunked_and_batched_equal_direct():
    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(3, 37, 6, generator=gen), dim=-1)
    features = torch.randn(3, 37, 12, generator=gen)
    expected = _direct(probs, features, k=3, iters=4)
    for chunk in (1, 5, 37, 1024):
        assert torch.allclose(knn_smooth(probs, features, k=3, iters=4, chunk=chunk), expected, atol=1e-6)
    single = torch.cat([knn_smooth(probs[i:i + 1], features[i:i + 1], k=3, iters=4, chunk=8) for i in range(3)])
    assert torch.allclose(single, expected, atol=1e-6)
    assert torch.allclose(expected.sum(-1), torch.ones(3, 37))  # rows stay distributions


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must lie"):
        knn_smooth(torch.ones(1, 4, 2), torch.randn(1, 4, 3), k=5)
    with pytest.raises(ValueError, match="iters"):
        knn_smooth(torch.ones(1, 4, 2), torch.randn(1, 4, 3), iters=-1)
