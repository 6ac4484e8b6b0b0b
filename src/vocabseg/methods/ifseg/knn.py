"""kNN probability smoothing (IFSeg section 2.3, spec B.7): average each token's class probabilities over its K
nearest tokens by cosine similarity of image features, and repeat.

``N(p)`` are the K tokens with the highest cosine to ``p`` (``p`` itself included, its cosine being 1);
``P^t[p] = mean_{q in N(p)} P^{t-1}[q]``. Similarities are computed ``chunk`` rows at a time, so memory stays at
``B * chunk * P`` similarities plus ``B * chunk * K * C`` gathered probabilities, whatever the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError

DEFAULT_K = 3
DEFAULT_ITERS = 25


def knn_indices(features: torch.Tensor, k: int = DEFAULT_K, chunk: int = 1024) -> torch.Tensor:
    """Indices ``B,P,k`` of each token's ``k`` most cosine-similar tokens (``features`` ``B,P,D``)."""
    b, p, _ = features.shape
    if not 1 <= k <= p:
        raise UsageError(f"k must lie in 1..{p} (the number of tokens); got {k}")
    unit = F.normalize(features.float(), dim=-1)
    out = torch.empty(b, p, k, dtype=torch.long, device=features.device)
    for start in range(0, p, chunk):
        sim = unit[:, start:start + chunk] @ unit.transpose(1, 2)
        out[:, start:start + chunk] = sim.topk(k, dim=-1).indices
    return out


def knn_smooth(probs: torch.Tensor, features: torch.Tensor, k: int = DEFAULT_K, iters: int = DEFAULT_ITERS,
               chunk: int = 1024) -> torch.Tensor:
    """Smoothed probabilities ``B,P,C`` after ``iters`` rounds of averaging over ``k`` feature neighbours."""
    if iters < 0:
        raise UsageError(f"iters must be >= 0 (got {iters})")
    if iters == 0:
        return probs
    return smooth_over_neighbours(probs, knn_indices(features, k, chunk), iters, chunk)


def smooth_over_neighbours(probs: torch.Tensor, neighbours: torch.Tensor, iters: int = DEFAULT_ITERS,
                           chunk: int = 1024) -> torch.Tensor:
    """``iters`` rounds of ``P[p] <- mean_k P[neighbours[p, k]]`` on probabilities ``B,P,C`` (``neighbours``
    ``B,P,K``)."""
    batch = torch.arange(probs.shape[0], device=probs.device)[:, None, None]
    for _ in range(iters):
        smoothed = torch.empty_like(probs)
        for start in range(0, probs.shape[1], chunk):
            smoothed[:, start:start + chunk] = probs[batch, neighbours[:, start:start + chunk]].mean(dim=2)
        probs = smoothed
    return probs
