"""CASS (Kim et al., CVPR 2025): DINO's attention graph distilled into CLIP's last block head by head, and an
object-presence prior on the text (official code ``MICV-yonsei/CASS`` @ 228ecdd; helper: DINO ViT-B/8).

Per window (NACLIP's harness: short side 336, whole image or windows 224 / stride 112; ``x`` the tokens entering
CLIP's last block, class token dropped from q, k, v):

1. DINO keys (:func:`cass_dino_images`, :func:`dino_keys_on_clip_grid`): the window is un-normalised with ImageNet
   statistics (blue std written 0.255), cast to uint8 (truncation), resized by PIL to a *square* of its short side,
   ImageNet-normalised; the last DINO block's keys (class token dropped) are cast to fp16, resized bilinearly to
   CLIP's grid (per CLIP head: DINO's width must equal CLIP's) and mapped linearly onto the range of CLIP's keys.
2. :func:`spectral_attention`: per head, CLIP's ``s K Kᵀ`` and DINO's ``s K_d K_dᵀ`` (fp16); the top-20 eigenvalues
   of each, L2- then L1-normalised; cost ``1 - W1`` between DINO head ``i`` and CLIP head ``j``; the Hungarian
   assignment *minimises* it (pairs the most dissimilar spectra) and pair ``(i, j)`` then feeds DINO head ``j`` into
   CLIP head ``i`` with weight ``w = W1``: a rank-10 approximation of DINO's graph (randomised SVD; singular values
   rescaled to ``[0.5 min, 1.5 max]`` except for VOC20/Cityscapes), diagonal zeroed, mapped onto the range of CLIP's
   graph, combined as ``(10 w D + C) / (10 w + 1)``.
3. Last block: ``softmax(combined + Ω)`` (NACLIP's Gaussian prior, std 5, no class token) over the values,
   ``out_proj``, no residual, no FFN; ``ln_post`` and ``proj`` of the patch tokens.
4. :func:`hierarchical_prompt`: text embeddings clustered by Ward linkage on cosine distances, cut at
   ``h_threshold``; in each cluster the class most similar to the image's global CLIP embedding (class token of the
   unmodified model on the whole image) is moved toward the mean of its two most similar patch features. Logits:
   ``(1 - g) cos(patch, adjusted text) + g cos(global, text)``.

Quirks kept from the official code: the randomised SVD (``torch.svd_lowrank``, q = 10: the code's search for the
rank always stops at its first step) makes the output depend on the random generator; here it is re-seeded with
``svd_seed`` before each image (inside a forked generator state, so the caller's random state is untouched), which
reproduces the official run seeded the same way; ``svd="exact"`` uses an exact truncated SVD instead
(seed-independent). The PIL round trip, the 0.255 typo, the fp16 DINO keys and the square DINO input (aspect ratio
distorted in whole-image mode) are reproduced. The Cityscapes preset takes the global embedding per window.
The head assignment is often a tie: the cost is additively separable (``c[i, j] = a_i + b_j``) whenever every DINO
spectrum lies on one side of every CLIP spectrum, so all pairings cost the same and float rounding decides (in the
official code as here); results can then differ between machines, precisions and implementations in the windows
where it happens (2 of 6 windows of the oracle's slide run).
The official evaluation script runs with PAMR off (``--pamr off``), as the presets here; the class default had it on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import CLIP_SLOT, Method, ModelSlot, Preset
from vocabseg.methods.last_block.method import gaussian_prior
from vocabseg.methods.registry import register
from vocabseg.models.encoder import IMAGENET_TORCHVISION_NORMALIZATION, DenseEncoder, Models
from vocabseg.pipeline import timing, windows
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.run import Dense, Prepared
from vocabseg.text.classifier import TextClassifier

#: The official un-normalisation of the CLIP-normalised window before DINO (ImageNet statistics, blue std 0.255).
INVERSE_MEAN = (-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.255)
INVERSE_STD = (1 / 0.229, 1 / 0.224, 1 / 0.255)


# --- DINO keys --------------------------------------------------------------------------------------------------

def cass_dino_pixels(crop: torch.Tensor) -> np.ndarray:
    """The image the official code hands to DINO for one CLIP-normalised crop ``3,h,w``: un-normalised with ImageNet
    statistics (blue std 0.255), ``* 255`` cast to uint8 (numpy's truncation), resized by PIL (bicubic, its default)
    to a square of the short side: uint8 ``s,s,3``."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    side = min(crop.shape[-2:])
    pixels = TF.normalize(crop.float().cpu(), INVERSE_MEAN, INVERSE_STD).permute(1, 2, 0).numpy() * 255
    return np.array(Image.fromarray(pixels.astype("uint8")).resize((side, side)))


def cass_dino_images(crops: torch.Tensor, patch_size: int) -> torch.Tensor:
    """DINO's input for CLIP-normalised crops ``B,3,h,w``: :func:`cass_dino_pixels`, ``ToTensor``, ImageNet
    normalisation, cut to a multiple of ``patch_size`` -> ``B,3,s,s``."""
    from torchvision.transforms import functional as TF

    statistics = IMAGENET_TORCHVISION_NORMALIZATION
    images = torch.stack([TF.normalize(TF.to_tensor(cass_dino_pixels(crop)), statistics.mean, statistics.std)
                          for crop in crops])
    side = images.shape[-1] - images.shape[-1] % patch_size
    return images[:, :, :side, :side].to(crops.device)


def dino_last_keys(dino: DenseEncoder, images: torch.Tensor) -> torch.Tensor:
    """Keys of DINO's last block ``B,heads,N,hd`` (prefix tokens dropped), cast to fp16 as the official code."""
    last = dino.num_blocks - 1
    _, keys, _ = dino.qkv(last, dino.run_blocks(dino.embed(images), 0, last))
    return keys[:, :, dino.prefix_tokens:].half()


def dino_keys_on_clip_grid(dino_keys: torch.Tensor, dino_grid: tuple[int, int], clip_keys: torch.Tensor,
                           clip_grid: tuple[int, int]) -> torch.Tensor:
    """One window's DINO keys ``heads,N_d,hd`` (fp16) -> ``H,N,d`` (fp16) for CLIP's keys ``H,N,d`` (fp32) on
    ``clip_grid``: channels regrouped into CLIP's heads (DINO's width must equal CLIP's), each map resized bilinearly
    (align_corners=False), then mapped linearly onto the range of CLIP's keys (min/max over all heads); computed in
    fp16 as the official code does."""
    heads, _, dim = clip_keys.shape
    maps = dino_keys.permute(0, 2, 1).reshape(heads, dim, *dino_grid)
    maps = F.interpolate(maps, size=clip_grid, mode="bilinear", align_corners=False)
    keys = maps.reshape(heads, dim, -1).permute(0, 2, 1)
    return match_range(keys, clip_keys)


def match_range(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``source`` mapped linearly onto ``[target.min(), target.max()]`` (in ``source``'s dtype)."""
    low, high = target.min(), target.max()
    return (source - source.min()) / (source.max() - source.min()) * (high - low) + low


# --- spectral attention -----------------------------------------------------------------------------------------

def top_eigenvalues(graphs: torch.Tensor, count: int = 20) -> torch.Tensor:
    """The ``count`` largest eigenvalues (descending, float64) of each symmetric matrix of ``H,N,N``."""
    return torch.linalg.eigvalsh(graphs.double()).flip(-1)[:, :count]


def spectral_cost(dino_graphs: torch.Tensor, clip_graphs: torch.Tensor, count: int = 20) -> torch.Tensor:
    """``H,H`` float32: ``1 - W1`` between the L2- then L1-normalised top eigenvalues of DINO head ``i`` (rows) and
    CLIP head ``j`` (columns); ``W1`` = sum of the absolute differences of the sorted values."""
    dino = F.normalize(top_eigenvalues(dino_graphs, count), p=2, dim=1)
    clip = F.normalize(top_eigenvalues(clip_graphs, count), p=2, dim=1)
    heads = dino.shape[0]
    cost = torch.zeros(heads, heads, device=clip_graphs.device)
    for i in range(heads):
        for j in range(heads):
            u = F.normalize(dino[i][None], p=1, dim=-1).sort().values
            v = F.normalize(clip[j][None], p=1, dim=-1).sort().values
            cost[i, j] = 1 - (u - v).abs().sum()
    return cost


def low_rank(adjacency: torch.Tensor, rank: int, exact: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, V`` (float64) of a rank-``rank`` approximation ``U diag(S) Vᵀ`` of an ``N,N`` matrix:
    ``torch.svd_lowrank`` (randomised, draws from the global generator) or the exact SVD truncated."""
    matrix = adjacency.double()
    if exact:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    return torch.svd_lowrank(matrix, q=rank)


def energy_rank(singular_values: torch.Tensor, threshold: float = 0.95) -> int:
    """The official ``optimal_q``'s rank: the first ``q`` whose cumulative share of the (unsquared) singular values
    reaches ``threshold``; computed, then discarded by the official code (the rank used is always 10)."""
    share = singular_values.cumsum(0) / singular_values.sum()
    return int(torch.searchsorted(share, threshold)) + 1


def rescale_singular_values(s: torch.Tensor) -> torch.Tensor:
    """The official stretch of the kept singular values from ``[min, max]`` to ``[0.5 min, 1.5 max]``."""
    low, high = s.min(), s.max()
    return (s - low) / (high - low) * (1.5 * high - 0.5 * low) + 0.5 * low


def spectral_attention(clip_keys: torch.Tensor, dino_keys: torch.Tensor, rescale: bool = True, exact: bool = False,
                       rank: int = 10, weight_scale: float = 10.0, eigenvalues: int = 20
                       ) -> tuple[torch.Tensor, dict]:
    """CASS's combined key-key logits ``H,N,N`` (float32, before the prior and the softmax) of one window.

    ``clip_keys`` ``H,N,d`` (fp32) and ``dino_keys`` ``H,N,d`` (fp16, :func:`dino_keys_on_clip_grid`); the graphs
    are ``s K Kᵀ`` (``s = d^-1/2``). Heads are paired by ``linear_sum_assignment`` on :func:`spectral_cost`; pair
    ``(i, j)`` gives CLIP head ``i`` the rank-``rank`` DINO graph of head ``j`` (diagonal zeroed, singular values
    optionally rescaled, range matched to CLIP's graph ``C_i``) with ``w = 1 - cost[i, j]``:
    ``(10 w D + C_i) / (10 w + 1)``. Also returns the cost matrix, the assignment and the energy ranks.
    """
    from scipy.optimize import linear_sum_assignment

    scale = clip_keys.shape[-1] ** -0.5
    clip_graphs = torch.bmm(clip_keys, clip_keys.transpose(1, 2)) * scale
    dino_graphs = torch.bmm(dino_keys, dino_keys.transpose(1, 2)) * scale
    cost = spectral_cost(dino_graphs, clip_graphs, eigenvalues)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    combined = torch.zeros_like(clip_graphs)
    ranks = []
    for index, (i, j) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        weight = (1 - cost[i, j]) * weight_scale
        u, s, v = low_rank(dino_graphs[j], min(rank, *dino_graphs.shape[-2:]), exact)
        ranks.append(energy_rank(s))
        if rescale:
            s = rescale_singular_values(s)
        approximation = u @ torch.diag(s) @ v.T
        approximation.fill_diagonal_(0)
        approximation = match_range(approximation, clip_graphs[i])
        combined[index] = (weight * approximation + clip_graphs[i]) / (weight + 1)
    return combined, {"cost": cost, "columns": torch.from_numpy(cols), "ranks": torch.tensor(ranks)}


# --- text side --------------------------------------------------------------------------------------------------

def hierarchical_clusters(text: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cluster of each text embedding ``Q,E`` (0-based): Ward linkage on cosine distances, cut at ``threshold``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    from sklearn.metrics.pairwise import cosine_distances

    if text.shape[0] < 2:
        return torch.zeros(text.shape[0], dtype=torch.long)
    distances = cosine_distances(text.detach().float().cpu().numpy())
    tree = linkage(squareform(distances, checks=False), method="ward")
    return torch.from_numpy(fcluster(tree, t=threshold, criterion="distance") - 1).long()


def hierarchical_prompt(text: torch.Tensor, clusters: torch.Tensor, features: torch.Tensor,
                        global_similarity: torch.Tensor, weight: float) -> torch.Tensor:
    """CASS's object-presence prior: in each cluster the query most similar to the global image embedding
    (``global_similarity`` ``Q``) becomes ``normalize((1 - weight) t + weight m)``, ``m`` the normalised mean of its
    two most similar patch features (``features`` ``N,E``, normalised); the other queries keep their embedding."""
    adjusted = text.clone()
    unit = F.normalize(features, dim=1)
    clusters = clusters.to(text.device)
    for cluster in range(int(clusters.max()) + 1):
        members = (clusters == cluster).nonzero().flatten()
        chosen = int(members[global_similarity[members].argmax()])
        embedding = F.normalize(text[chosen][None], dim=1)[0]
        nearest = (unit @ embedding).topk(min(2, len(unit))).indices
        mean = F.normalize(features[nearest].mean(dim=0), dim=0)
        adjusted[chosen] = F.normalize((1 - weight) * embedding + weight * mean, dim=0)
    return adjusted


@contextlib.contextmanager
def seeded_generator(seed: int, device: torch.device):
    """Run the block with the global generator(s) seeded with ``seed``, restoring their state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@register
@dataclass
class CASS(Method):
    """CASS: spectral DINO-to-CLIP attention in the last block and an object-presence prior on the text."""

    name: ClassVar[str] = "cass"
    summary: ClassVar[str] = ("DINO attention graphs distilled into CLIP's last block by spectral matching, "
                              "object-presence text prior (Kim et al. 2025; helper: DINO)")
    models: ClassVar = {"clip": CLIP_SLOT, "dino": ModelSlot(
        "dino", "dino_vitb8", "the DINO whose last-block key graphs are distilled into CLIP's (as wide as CLIP)")}
    needs_class_token: ClassVar[bool] = True
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "cass")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "cass")
    # defaults for custom images: the PASCAL-Context coefficients (the widest vocabulary among the slide configs)
    global_semantics_weight: float = 0.25
    mean_vector_weight: float = 0.04
    h_threshold: float = 0.09
    rescale_singular_values: bool = True
    global_per_window: bool = False
    gaussian_std: float = 5.0
    svd: Literal["lowrank", "exact"] = "lowrank"
    svd_seed: int = 0

    def check_models(self, models: Models) -> None:
        super().check_models(models)
        if models.dino.width != models.clip.image.width:
            raise UsageError(f"cass regroups DINO's keys into CLIP's heads: DINO's width ({models.dino.width}) must "
                             f"equal CLIP's ({models.clip.image.width}), e.g. DINO ViT-B with CLIP ViT-B")

    def window_tokens(self, models: Models, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per crop ``B,3,h,w``: CLIP's last-block keys and values ``B,H,N,d`` (prefix tokens dropped), the class
        token of the unmodified model ``B,E`` and DINO's keys on CLIP's grid (``B`` tensors ``H,N,d``, fp16)."""
        encoder, dino = models.clip.image, models.dino
        last = encoder.num_blocks - 1
        x = encoder.run_blocks(encoder.embed(crops), 0, last)
        cls = encoder.head(encoder.block(last, x)[:, :1])[:, 0]
        _, keys, values = encoder.qkv(last, x)
        keys, values = keys[:, :, encoder.prefix_tokens:], values[:, :, encoder.prefix_tokens:]
        with timing.stage("dino"):
            dino_images = cass_dino_images(crops, dino.patch_size)
            dino_keys = dino_last_keys(dino, dino_images)
        dino_grid, clip_grid = dino.grid(*dino_images.shape[-2:]), encoder.grid(*crops.shape[-2:])
        # a list, not a stacked tensor: the fp16 products downstream round differently on a contiguous copy than
        # on the transposed layout the official code (and this one) produces
        dino_keys = [dino_keys_on_clip_grid(k, dino_grid, ck, clip_grid) for k, ck in zip(dino_keys, keys, strict=True)]
        return {"keys": keys, "values": values, "cls": cls, "dino_keys": dino_keys}

    def patch_tokens(self, encoder: DenseEncoder, keys: torch.Tensor, values: torch.Tensor, dino_keys: torch.Tensor,
                     grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One window's features ``N,E`` (not normalised) from its keys and values ``H,N,d``, and the attention."""
        with timing.stage("recipe"):
            combined, _ = spectral_attention(keys, dino_keys, self.rescale_singular_values, self.svd == "exact")
        attention = (combined + gaussian_prior(grid, self.gaussian_std, 0, combined.device)).softmax(dim=-1)
        last = encoder.num_blocks - 1
        return encoder.head(encoder.attention_out(last, (attention @ values)[None]))[0], attention

    def token_logits(self, encoder: DenseEncoder, tokens: dict[str, torch.Tensor], index: int,
                     grid: tuple[int, int], text: torch.Tensor, clusters: torch.Tensor,
                     global_similarity: torch.Tensor | None) -> torch.Tensor:
        """Logits ``N,Q`` of window ``index`` of :meth:`window_tokens`: spectral last block, object-presence prior
        over the text ``Q,E`` and its ``clusters`` ``Q``, ``(1 - g) cos(patch, adjusted text) + g cos(global,
        text)``; ``global_similarity`` ``Q`` (the image's), or None to use the window's own class token."""
        g = self.global_semantics_weight
        features, _ = self.patch_tokens(encoder, tokens["keys"][index], tokens["values"][index],
                                        tokens["dino_keys"][index], grid)
        features = F.normalize(features, dim=-1)
        similarity = global_similarity
        if similarity is None:
            similarity = F.normalize(tokens["cls"][index], dim=-1) @ text.T
        with timing.stage("recipe"):
            adjusted = hierarchical_prompt(text, clusters, features, similarity, self.mean_vector_weight)
        return (features @ adjusted.T) * (1 - g) + similarity * g

    def window_logits(self, models: Models, text: torch.Tensor, clusters: torch.Tensor,
                      global_similarity: torch.Tensor | None) -> windows.CropLogits:
        """Crops ``B,3,h,w`` -> logits ``B,Q,h,w`` (:meth:`token_logits` of each window, in order)."""
        encoder = models.clip.image

        def crop_logits(crops: torch.Tensor) -> torch.Tensor:
            grid = encoder.grid(*crops.shape[-2:])
            tokens = self.window_tokens(models, crops)
            logits = [self.token_logits(encoder, tokens, b, grid, text, clusters, global_similarity)
                      for b in range(len(crops))]
            return windows.grid_logits_to_crop(torch.stack(logits).float(), grid, crops.shape[-2:])

        return crop_logits

    def global_similarity(self, models: Models, inputs: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine ``Q`` between the text and the class token of the unmodified CLIP on the whole input."""
        encoder = models.clip.image
        cls = encoder.head(encoder.run_blocks(encoder.embed(inputs)))[0, 0]
        return F.normalize(cls, dim=-1) @ text.T

    def dense(self, models: Models, inputs: list[Prepared], classifier: TextClassifier, protocol: Protocol
              ) -> list[Dense]:
        """Image by image (the randomised SVD's generator is re-seeded for each, so windows of different images
        cannot share passes): the global embedding of the whole image (unless per window), then the windows in
        order, ``windows_per_pass`` at a time."""
        text = classifier.embeddings
        with timing.stage("recipe"):
            clusters = hierarchical_clusters(text, self.h_threshold)
        batch = self.windows_per_pass(models, protocol, max(max(p.input.shape[-2:]) for p in inputs))
        results = []
        for prepared in inputs:
            image = prepared.input
            with timing.stage("vit"):
                similarity = None
                if protocol.crop and not self.global_per_window:
                    similarity = self.global_similarity(models, image, text)
                crop_logits = self.window_logits(models, text, clusters, similarity)
                with seeded_generator(self.svd_seed, image.device), windows.autocast(protocol.precision, image.device):
                    logits = windows.dense_logits(crop_logits, image, protocol.crop, protocol.stride, batch)
            results.append(Dense(logits.float()))
        return results
