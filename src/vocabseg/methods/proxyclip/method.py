"""ProxyCLIP (Lan et al., ECCV 2024): CLIP's last-block values aggregated by a proxy attention built from a vision
foundation model's features (spec 2.7; official code ``mc-lan/ProxyCLIP`` @ e7b767f).

Per crop (CLIP-normalised ``B,3,h,w``, zero-padded symmetrically to a multiple of 56 by the harness):

1. DINO input: the crop un-normalised with CLIP's statistics and normalised with ImageNet's (two steps, as the
   official code; :func:`vocabseg.models.dino.renormalise`). Proxy features ``G``: DINO's last-block output tokens
   after its final norm, patch tokens only (``B,n,C`` on the DINO grid, e.g. 42x42 for 336 px at patch 8).
2. :func:`proxy_attention`: ``S = Ĝ Ĝᵀ`` (cosine), ``S' = γ (S - β mean(S))`` with entries below 0 set to
   ``-inf``, ``A = softmax(S')`` over each row, the same matrix for every head.
3. :func:`proxy_image_features`: CLIP blocks ``0 .. L-2`` unchanged; the last block contributes only its value
   projection of ``ln_1(x)`` (class token dropped, each head's grid resized bilinearly to the DINO grid) and
   ``out_proj(A V)`` (:func:`proxy_block_output`; no residual, no FFN); then ``ln_post`` and ``proj``.
4. Logits on the DINO grid, upsampled bilinearly to the crop (the harness merges windows and upsamples).

Quirks of the official code kept here: name files split on ``"; "`` (the ``proxyclip`` name style); logits at the
DINO resolution. Differences: ``mean(S)`` is taken per crop (the official code averages over its batch, which is
always one crop); non-square windows (an image side shorter than the crop) use their real DINO grid, where the
official code takes both grid sides from the height and fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vocabseg.methods.base import Preset, Protocol, register
from vocabseg.methods.dino_helper import DinoMethod
from vocabseg.models.dino import CLIP_MEAN, CLIP_STD, renormalise
from vocabseg.pipeline import timing

# dataset: (short side, crop, stride, prob_thd) of the official configs (logit scale 40 everywhere)
_PROXYCLIP_TABLE = {
    "voc21": (336, 336, 112, 0.2),
    "voc20": (336, 336, 112, 0.0),
    "pc60": (336, 336, 112, 0.15),
    "pc59": (336, 336, 112, 0.0),
    "coco-object": (336, 336, 112, 0.25),
    "coco-stuff": (336, 336, 112, 0.0),
    "cityscapes": (448, 224, 112, 0.0),
    "ade150": (448, 336, 112, 0.0),
}


def proxyclip_presets(style: str = "proxyclip") -> dict[str, Preset]:
    """ProxyCLIP's per-dataset protocols (shared by the methods built on its harness)."""
    return {
        dataset: Preset(Protocol(short_side=s, crop=crop, stride=stride, logit_scale=40.0, prob_thd=thd), dataset,
                        style)
        for dataset, (s, crop, stride, thd) in _PROXYCLIP_TABLE.items()
    }


def proxy_similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine between proxy tokens: ``B,N,C -> B,N,N``."""
    unit = F.normalize(features, dim=-1)
    return unit @ unit.transpose(1, 2)


def proxy_attention(features: torch.Tensor, beta: float = 1.2, gamma: float = 3.0,
                    mean: torch.Tensor | None = None) -> torch.Tensor:
    """ProxyCLIP's attention ``B,N,N`` from proxy features ``B,N,C``.

    ``S`` = cosine between tokens (:func:`proxy_similarity`); ``S' = gamma * (S - beta * mean(S))`` (mean over each
    ``N x N`` matrix, diagonal included, unless ``mean`` gives another, e.g. over a batch of windows); entries
    ``< 0`` become ``-inf``; softmax over each row. Every row keeps at least its diagonal.
    """
    similarity = proxy_similarity(features)
    if mean is None:
        mean = similarity.mean(dim=(1, 2), keepdim=True)
    similarity = (similarity - mean * beta) * gamma
    similarity = similarity.masked_fill(similarity < 0, float("-inf"))
    return similarity.softmax(dim=-1)


def resize_token_grid(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Per-head patch tokens ``B,heads,gh*gw,hd`` on ``grid`` -> ``B,heads,h*w,hd`` on ``size`` (bilinear,
    align_corners=False)."""
    b, heads, _, dim = tokens.shape
    maps = tokens.reshape(b * heads, *grid, dim).permute(0, 3, 1, 2)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.permute(0, 2, 3, 1).reshape(b, heads, size[0] * size[1], dim)


def proxy_block_output(backbone, x: torch.Tensor, attention: torch.Tensor, clip_grid: tuple[int, int],
                       grid: tuple[int, int]) -> torch.Tensor:
    """The last block's ``out_proj(A V)`` ``B,n,D`` for tokens ``x`` ``B,1+N,D`` entering it (CLIP grid
    ``clip_grid``): its values of ``ln_1(x)``, class token dropped, resized per head to the proxy ``grid``,
    aggregated by ``attention`` ``B,n,n`` (no residual, no FFN)."""
    last = backbone.num_blocks - 1
    _, _, values = backbone.qkv(last, x)
    values = resize_token_grid(values[:, :, 1:], clip_grid, grid)
    return backbone.attention_out(last, attention[:, None].to(values.dtype) @ values)


def proxy_image_features(backbone, crops: torch.Tensor, attention: torch.Tensor, grid: tuple[int, int]
                         ) -> torch.Tensor:
    """CLIP features ``B,n,E`` (not normalised) of crops ``B,3,h,w``: blocks ``0 .. L-2`` unchanged, then
    :func:`proxy_block_output`, ``ln_post`` and ``proj`` (``n = grid[0] * grid[1]``)."""
    x = backbone.run_blocks(backbone.embed(crops), 0, backbone.num_blocks - 1)
    return backbone.head(proxy_block_output(backbone, x, attention, backbone.grid(*crops.shape[-2:]), grid))


@register
@dataclass
class ProxyCLIP(DinoMethod):
    """ProxyCLIP: DINO proxy attention over CLIP's last-block values (no residual, no FFN)."""

    name: ClassVar[str] = "proxyclip"
    summary: ClassVar[str] = "DINO proxy attention over CLIP's last-block values (Lan et al. 2024; helper: DINO)"
    default_protocol: ClassVar[Protocol] = Protocol(short_side=336, crop=336, stride=112, logit_scale=40.0)
    presets: ClassVar[dict[str, Preset]] = proxyclip_presets()
    crop_multiple: ClassVar[int] = 56  # the official code pads every window to a multiple of 56 pixels
    beta: float = 1.2
    gamma: float = 3.0

    def proxy_features(self, backbone, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """DINO's normalised last-block patch tokens ``B,n,C`` of CLIP-normalised crops, and their grid."""
        with timing.stage("dino"):
            return self.dino_encoder(backbone).patch_tokens(renormalise(crops, CLIP_MEAN, CLIP_STD))

    def patch_features(self, backbone, crops):
        proxy, grid = self.proxy_features(backbone, crops)
        with timing.stage("recipe"):
            attention = proxy_attention(proxy, self.beta, self.gamma)
        return F.normalize(proxy_image_features(backbone, crops, attention, grid), dim=-1), grid
