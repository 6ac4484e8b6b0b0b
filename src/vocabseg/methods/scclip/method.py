"""SC-CLIP (Bai et al., 2024, arXiv 2411.15869): self-calibrated CLIP, as its official code computes it.

Notation: blocks are numbered from 1; ``X_b`` (``B,1+N,D``) is the output of block ``b`` (class token first), ``L`` the
number of blocks (12 for ViT-B/16). The official indices ``pre_adjust_idx = 8``, ``post_adjust_idx = 3`` and
``multi_start_idx .. multi_end_idx = 3 .. 10`` index the list of block outputs ``X_1 .. X_{L-1}`` from 0.

1. Blocks ``1 .. L-1`` run unchanged. Anomaly tokens of ``X_{L-1}``: the ``contamination`` share (5%) of patch
   tokens with the highest local outlier factor (:func:`lof_scores`, 30 neighbours), strictly above the
   ``1 - contamination`` quantile.
2. Anomalies of ``X_{L-1}`` and of ``X_9`` are replaced by the mean of their non-anomalous 3x3 neighbours
   (:func:`fill_from_neighbours`). From here on there is **no class token**: every step works on the ``N`` patch
   tokens.
3. ``S_9`` = cosine similarity of the repaired ``X_9`` patch tokens. The patch tokens are aggregated with
   ``S_9`` thresholded at ``beta = 0.4`` (:func:`aggregate`: row-normalised affinity times tokens).
4. Last block, attention only (no residual, no FFN): ``A_h = (softmax(3 (S_9 - mean S_9)), entries below the mean
   excluded) + softmax(s K_h K_h^T)) / 2`` on the block's own V and ``out_proj``; then ``+ res_cls * CLS_{L-1}``
   (0.3 times the class token of ``X_{L-1}``, before anything is replaced) and aggregation with ``S_4`` (cosine
   similarity of the raw ``X_4`` patch tokens, thresholded at ``beta``).
5. Multi-level fusion: ``Z = X_4 + ... + X_10`` (raw sums); its patch tokens go through the same last-block
   attention (``ln_1`` of the sum), ``+ res_cls * CLS(Z)``, aggregated with ``S_4`` and added to step 4's output.
6. Features: ``normalize(ln_post(.) @ proj)`` of the ``N`` tokens.

Quirks of the official code kept here (see ``../shared/oracle/scclip/README.md``):

* The LOF is not the textbook one: squared Euclidean distances, and the reachability distance uses the k-distance
  of the query token itself, so it always equals that k-distance.
* Anomalies are detected once (on ``X_{L-1}``) and the same positions repair ``X_9``; ``S_4`` is not repaired.
* A flagged token at flat index ``i`` is placed at row ``i // gh``, column ``i % gh`` (``gh`` = grid height): right
  on the square grids of every preset (224 windows), wrong or out of range on other grids. Option
  ``exact_outlier_positions=true`` uses row-major positions on any grid; with the default, a flagged position
  outside the grid raises a clear error (the official code fails with an index error there).
* With fewer than 31 patch tokens the official LOF fails; here the neighbour count is clipped to ``N - 1``.

Differences from the official harness: whole-image mode (``crop=none``) upsamples the grid logits in the harness's
two steps (the official code goes straight to the original size), and PAMR follows the ``pamr`` knob in both modes
(the official code applies it only in the sliding-window path; no SC-CLIP config enables it).

Presets: the official ``configs/cfg_*.py`` (short side 336, Cityscapes 560; crop 224 / stride 112; τ 50 on VOC21,
55 on COCO-Object, else 40; ``prob_thd`` 0.15 on VOC21 and PC60, 0.35 on COCO-Object; ``area_thd`` 0.1 on VOC21)
with SCLIP's name lists, in this package's ``presets.toml``.

SC-CLIP and SFP read the image encoder's class token and refuse an encoder without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import Method, Preset
from vocabseg.methods.registry import register
from vocabseg.models.encoder import DenseEncoder
from vocabseg.pipeline.protocol import Protocol

# --- anomaly tokens ---------------------------------------------------------------------------------------------

def lof_scores(tokens: torch.Tensor, n_neighbors: int = 30) -> torch.Tensor:
    """SC-CLIP's local outlier factor of every token: ``B,N,C -> B,N``.

    Distances are squared Euclidean; the reachability distance of a neighbour is the k-distance of the query
    token itself (the official code's choice), so the local density is ``k / k-distance`` and the score of token
    ``i`` is the mean over its k nearest neighbours ``o`` of ``density(o) / density(i)``. ``k`` is clipped to
    ``N - 1``.
    """
    b, n, _ = tokens.shape
    k = min(n_neighbors, n - 1)
    exact = tokens.double()  # |a|^2 + |b|^2 - 2ab in float64: as exact as float32 differences, 10x faster on a CPU
    norms = exact.square().sum(dim=-1)
    distances = (norms[:, :, None] + norms[:, None, :] - 2 * exact @ exact.transpose(1, 2)).clamp_min(0)
    distances = distances.to(tokens.dtype)
    knn_distances, knn_index = distances.topk(k + 1, dim=-1, largest=False)
    knn_distances, knn_index = knn_distances[..., 1:], knn_index[..., 1:]  # drop the token itself
    reach = torch.maximum(knn_distances, knn_distances[..., -1:])
    density = k / reach.mean(dim=-1)
    neighbour_density = density.gather(1, knn_index.reshape(b, -1)).reshape(b, n, k)
    return (neighbour_density / density[..., None]).mean(dim=-1)


def top_outliers(scores: torch.Tensor, contamination: float = 0.05) -> torch.Tensor:
    """Tokens whose score is strictly above the ``1 - contamination`` quantile (linear): ``B,N -> B,N`` bool."""
    return scores > torch.quantile(scores.float(), 1 - contamination, dim=-1, keepdim=True)


def official_positions(flagged: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Where SC-CLIP's and SFP's code put flagged tokens: flat index ``i`` -> row ``i // gh``, column ``i % gh``.

    ``flagged`` ``B,N`` (row-major flat indices on a ``gh x gw`` grid) -> ``B,N`` mask of the positions actually
    repaired. The identity on square grids; elsewhere a position outside the grid is an error (as in the official
    code).
    """
    gh, gw = grid
    if gh == gw:
        return flagged
    batch, index = flagged.nonzero(as_tuple=True)
    rows, cols = index // gh, index % gh
    if bool((rows >= gh).any() or (cols >= gw).any()):
        raise UsageError(f"the official outlier positions (row = index // {gh}) fall outside this {gh}x{gw} token "
                         "grid; use square crops or the option exact_outlier_positions=true")
    positions = torch.zeros_like(flagged)
    positions[batch, rows * gw + cols] = True
    return positions


def fill_from_neighbours(tokens: torch.Tensor, anomalous: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Replace anomalous tokens by the mean of their non-anomalous 3x3 neighbours.

    ``tokens`` ``B,N,C`` on a ``gh x gw`` grid (row-major), ``anomalous`` ``B,N`` bool. Neighbours outside the grid
    do not count; an anomaly without a valid neighbour keeps its value.
    """
    b, n, c = tokens.shape
    maps = tokens.transpose(1, 2).reshape(b * c, 1, *grid)
    keep = (~anomalous).to(tokens.dtype).reshape(b, 1, *grid)
    ring = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    ring[..., 1, 1] = 0
    sums = F.conv2d(maps * keep.repeat_interleave(c, dim=0), ring, padding=1).reshape(b, c, n)
    counts = F.conv2d(keep, ring, padding=1).reshape(b, 1, n)
    means = sums / counts.clamp(min=1)
    update = anomalous[:, None, :] & (counts > 0)
    return torch.where(update, means, tokens.transpose(1, 2)).transpose(1, 2)


# --- similarity-guided aggregation and attention ----------------------------------------------------------------

def cosine_similarity_matrix(tokens: torch.Tensor) -> torch.Tensor:
    """``B,N,C -> B,N,N`` cosine similarities."""
    unit = F.normalize(tokens, dim=-1)
    return unit @ unit.transpose(1, 2)


def threshold(similarity: torch.Tensor, beta: float) -> torch.Tensor:
    """Entries below ``beta`` set to 0."""
    return similarity.masked_fill(similarity < beta, 0.0)


def aggregate(tokens: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """``B,N,C`` tokens averaged with the row-normalised ``B,N,N`` affinity (``row / (row sum + 1e-6)``)."""
    return (affinity / (affinity.sum(dim=-1, keepdim=True) + 1e-6)) @ tokens


def similarity_attention(similarity: torch.Tensor, scale: float = 3.0) -> torch.Tensor:
    """``softmax(scale * (S - mean S))`` over rows, entries below the mean excluded: ``B,N,N -> B,N,N``.

    The mean is over the whole matrix of each batch item.
    """
    centred = (similarity - similarity.mean(dim=(-2, -1), keepdim=True)) * scale
    return centred.masked_fill(centred < 0, float("-inf")).softmax(dim=-1)


def self_attention(x: torch.Tensor) -> torch.Tensor:
    """``softmax(s X X^T)`` per head of ``B,heads,N,hd`` (``s = hd ** -0.5``) -> ``B,heads,N,N``."""
    return torch.softmax((x @ x.transpose(-1, -2)) * x.shape[-1] ** -0.5, dim=-1)


def scclip_attention(guide: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """SC-CLIP's recalibrated last-block attention ``(guide + softmax(s K K^T)) / 2``: ``guide`` ``B,N,N`` (from
    :func:`similarity_attention`, shared by the heads), ``k`` ``B,heads,N,hd`` -> ``B,heads,N,N``."""
    return (guide[:, None] + self_attention(k)) / 2


def attention_only_block(encoder: DenseEncoder, index: int, x: torch.Tensor, weights) -> torch.Tensor:
    """Block ``index`` reduced to its attention: ``out_proj(concat_h A_h V_h)`` with ``A = weights(q, k)``
    (``B,heads,N,N``), q/k/v from ``ln_1(x)``; no residual, no FFN. ``x`` ``B,N,D`` -> ``B,N,D``."""
    q, k, v = encoder.qkv(index, x)
    return encoder.attention_out(index, weights(q, k) @ v)


@dataclass
class OutlierRepairMethod(Method):
    """Options and steps shared by SC-CLIP and SFP (SFP is built on SC-CLIP's code).

    ``pre_adjust_idx`` / ``post_adjust_idx`` index the list of block outputs (0 = block 1): the block whose repaired
    patch similarity guides the last block, and the block whose raw similarity aggregates its output. Both recipes
    add the class token of a block output (its first token) to the patch tokens, so they need an encoder with one.
    """

    needs_class_token: ClassVar[bool] = True

    pre_adjust_idx: int = 8
    post_adjust_idx: int = 3
    res_cls: float = 0.3
    beta: float = 0.4
    exact_outlier_positions: bool = False

    def positions(self, flagged: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return flagged if self.exact_outlier_positions else official_positions(flagged, grid)

    def check_indices(self, count: int, span: tuple[int, int]) -> None:
        """``pre_adjust_idx``, ``post_adjust_idx`` and the fused ``span`` (start, end) must fit a list of ``count``
        block outputs."""
        start, end = span
        indices = (self.pre_adjust_idx, self.post_adjust_idx)
        if not (all(0 <= i < count for i in indices) and 0 <= start < end <= count):
            raise UsageError(f"block-output indices (0 = block 1) must lie in 0..{count - 1} for this model; got "
                             f"pre/post adjust {indices} and fused blocks {span}")

    @staticmethod
    def run_recorded(encoder: DenseEncoder, x: torch.Tensor, blocks: int) -> list[torch.Tensor]:
        """Outputs of the first ``blocks`` blocks (``B,T,D`` each) from embedded tokens ``x``."""
        outputs = []
        for index in range(blocks):
            x = encoder.block(index, x)
            outputs.append(x)
        return outputs


@register
@dataclass
class SCCLIP(OutlierRepairMethod):
    """SC-CLIP: LOF anomaly repair, similarity-recalibrated last-block attention, multi-level fusion."""

    name: ClassVar[str] = "scclip"
    summary: ClassVar[str] = ("LOF anomaly-token repair, similarity-recalibrated last attention, multi-level fusion "
                              "(Bai et al. 2024)")
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "scclip")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "scclip")

    multi_start_idx: int = 3
    multi_end_idx: int = 10
    lof_neighbors: int = 30
    lof_contamination: float = 0.05

    def patch_features(self, encoder, crops):
        grid = encoder.grid(*crops.shape[-2:])
        prefix = encoder.prefix_tokens
        outputs = self.run_recorded(encoder, encoder.embed(crops), encoder.num_blocks - 1)
        self.check_indices(len(outputs), (self.multi_start_idx, self.multi_end_idx))
        last_input = outputs[-1]
        anomalous = self.positions(top_outliers(lof_scores(last_input[:, prefix:], self.lof_neighbors),
                                                self.lof_contamination), grid)
        x = fill_from_neighbours(last_input[:, prefix:], anomalous, grid)
        mid_similarity = cosine_similarity_matrix(
            fill_from_neighbours(outputs[self.pre_adjust_idx][:, prefix:], anomalous, grid))
        x = aggregate(x, threshold(mid_similarity, self.beta))

        guide = similarity_attention(mid_similarity)
        last = encoder.num_blocks - 1
        x = attention_only_block(encoder, last, x, lambda q, k: scclip_attention(guide, k))
        x = x + self.res_cls * last_input[:, :1]
        post_similarity = threshold(cosine_similarity_matrix(outputs[self.post_adjust_idx][:, prefix:]), self.beta)
        x = aggregate(x, post_similarity)

        fused = sum(outputs[self.multi_start_idx:self.multi_end_idx])  # in order, as the official loop
        fused_patches = attention_only_block(encoder, last, fused[:, prefix:],
                                             lambda q, k: scclip_attention(guide, k))
        fused_patches = fused_patches + self.res_cls * fused[:, :1]
        x = x + aggregate(fused_patches, post_similarity)
        return F.normalize(encoder.head(x), dim=-1), grid
