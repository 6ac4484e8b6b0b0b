"""ProxyCLIP (Lan et al., ECCV 2024): CLIP's last-block values aggregated by a proxy attention built from a vision
foundation model's features (spec 2.7; official code ``mc-lan/ProxyCLIP`` @ e7b767f).

Per crop (CLIP-normalised ``B,3,h,w``, zero-padded symmetrically to a multiple of 56 by the harness):

1. DINO input (:func:`dino_input`): the crop un-normalised with CLIP's statistics and normalised with ImageNet's
   (two steps, as the official code). Proxy features ``G`` (:func:`dino_patch_tokens`): DINO's last-block output
   tokens after its final norm, patch tokens only (``B,n,C`` on the DINO grid, e.g. 42x42 for 336 px at patch 8).
2. :func:`proxy_attention`: ``S = Ĝ Ĝᵀ`` (cosine), ``S' = γ (S - β mean(S))`` with entries below 0 set to
   ``-inf``, ``A = softmax(S')`` over each row, the same matrix for every head.
3. :func:`proxy_image_features`: CLIP blocks ``0 .. L-2`` unchanged; the last block contributes only its value
   projection of ``ln_1(x)`` (class token dropped, each head's grid resized bilinearly to the DINO grid) and
   ``out_proj(A V)`` (:func:`proxy_block_output`; no residual, no FFN); then ``ln_post`` and ``proj``.
4. Logits on the DINO grid, upsampled bilinearly to the crop (the harness merges windows and upsamples).

The DINO is the ``dino`` model (default ``dino_vitb8``; ``models={"dino": TAG_OR_PATH}``, ``--model dino=...``).

Quirks of the official code kept here: name files split on ``"; "`` (the ``*.proxyclip`` name lists); logits at the
DINO resolution. Differences: ``mean(S)`` is taken per crop (the official code averages over its batch, which is
always one crop); non-square windows (an image side shorter than the crop) use their real DINO grid, where the
official code takes both grid sides from the height and fails.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import CLIP_SLOT, Method, ModelSlot, Preset
from vocabseg.methods.registry import register
from vocabseg.models.encoder import OPENAI_NORMALIZATION, DenseEncoder
from vocabseg.pipeline import timing
from vocabseg.pipeline.protocol import Protocol

#: The DINO of ProxyCLIP, CorrCLIP and Trident (the official configs' ViT-B/8; any DINO/DINOv2 tag or file works).
DINO_SLOT = ModelSlot("dino", "dino_vitb8", "the vision foundation model whose tokens build the proxy attention")


def dino_input(crops: torch.Tensor, dino: DenseEncoder) -> torch.Tensor:
    """CLIP-normalised crops ``B,3,h,w`` -> ``dino``'s input, in two steps as the official code: un-normalised with
    OpenAI CLIP's statistics (0..1 units, whatever the CLIP), then normalised with the DINO's (same units)."""
    pixels = OPENAI_NORMALIZATION.invert(crops)
    return dataclasses.replace(dino.normalization, unit=1.0)(pixels)


def dino_patch_tokens(dino: DenseEncoder, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The proxy features of CLIP-normalised crops ``B,3,h,w``: DINO's last-block tokens after its final norm
    (``get_intermediate_layers(x, n=1)``), prefix tokens dropped, ``B,n,C``, and their grid."""
    images = dino_input(crops, dino)
    tokens = dino.head(dino.run_blocks(dino.embed(images)))
    return tokens[:, dino.prefix_tokens:], dino.grid(*images.shape[-2:])


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


def proxy_block_output(encoder: DenseEncoder, x: torch.Tensor, attention: torch.Tensor, clip_grid: tuple[int, int],
                       grid: tuple[int, int]) -> torch.Tensor:
    """The last block's ``out_proj(A V)`` ``B,n,D`` for tokens ``x`` ``B,T,D`` entering it (CLIP grid
    ``clip_grid``): its values of ``ln_1(x)``, prefix tokens dropped, resized per head to the proxy ``grid``,
    aggregated by ``attention`` ``B,n,n`` (no residual, no FFN)."""
    last = encoder.num_blocks - 1
    _, _, values = encoder.qkv(last, x)
    values = resize_token_grid(values[:, :, encoder.prefix_tokens:], clip_grid, grid)
    return encoder.attention_out(last, attention[:, None].to(values.dtype) @ values)


def proxy_image_features(encoder: DenseEncoder, crops: torch.Tensor, attention: torch.Tensor,
                         grid: tuple[int, int]) -> torch.Tensor:
    """CLIP features ``B,n,E`` (not normalised) of crops ``B,3,h,w``: blocks ``0 .. L-2`` unchanged, then
    :func:`proxy_block_output`, ``ln_post`` and ``proj`` (``n = grid[0] * grid[1]``)."""
    x = encoder.run_blocks(encoder.embed(crops), 0, encoder.num_blocks - 1)
    return encoder.head(proxy_block_output(encoder, x, attention, encoder.grid(*crops.shape[-2:]), grid))


@register
@dataclass
class ProxyCLIP(Method):
    """ProxyCLIP: DINO proxy attention over CLIP's last-block values (no residual, no FFN)."""

    name: ClassVar[str] = "proxyclip"
    summary: ClassVar[str] = "DINO proxy attention over CLIP's last-block values (Lan et al. 2024; helper: DINO)"
    models: ClassVar = {"clip": CLIP_SLOT, "dino": DINO_SLOT}
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "proxyclip")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "proxyclip")
    crop_multiple: ClassVar[int] = 56  # the official code pads every window to a multiple of 56 pixels
    beta: float = 1.2
    gamma: float = 3.0

    def text_patch_features(self, models, crops, text):
        with timing.stage("dino"):
            proxy, grid = dino_patch_tokens(models.dino, crops)
        with timing.stage("recipe"):
            attention = proxy_attention(proxy, self.beta, self.gamma)
        return F.normalize(proxy_image_features(models.clip.image, crops, attention, grid), dim=-1), grid
