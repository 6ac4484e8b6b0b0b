"""Training-free dense CLIP baselines that differ only in the last vision block (spec sections 2.1-2.4).

Each recipe runs blocks ``0 .. L-2`` unchanged and rewrites block ``L-1`` as
``x' = [x +] out_proj(concat_h A_h V_h)`` and ``x'' = [x' + FFN(LN2(x'))]``; features are
``normalize(ln_post(x'') @ proj)`` of the patch tokens. ``A_h`` uses the scale ``s = head_dim ** -0.5``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from vocabseg.config import setting
from vocabseg.errors import UsageError
from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import Method, Preset
from vocabseg.methods.registry import register
from vocabseg.models.encoder import IMAGENET_NORMALIZATION, TO_SIZE, DenseEncoder, PositionResize
from vocabseg.pipeline.protocol import Protocol
from vocabseg.text.classifier import TextClassifier
from vocabseg.text.templates import IMAGENET_TEMPLATES, MASKCLIP_TEMPLATES


@dataclass
class LastBlockMethod(Method):
    """A method defined by its last-block attention and whether that block keeps its residual and FFN."""

    keep_residual: ClassVar[bool] = True
    keep_ffn: ClassVar[bool] = True

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Head outputs ``A_h V_h`` (``B,heads,T,hd``) of the last block."""
        raise NotImplementedError

    def attention_logits(self, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor] | None:
        """The last-block attention as pre-softmax logit maps ``B,heads,T,T``: ``A = sum_i softmax(L_i + bias)``
        (bias: :meth:`attention_bias`). ``None`` when the attention is not of that form (MaskCLIP's identity).
        Plug-ins that edit the attention (ResCLIP) work through this."""
        return None

    def attention_bias(self, grid: tuple[int, int], prefix: int, device: torch.device) -> torch.Tensor | None:
        """An additive ``(T, T)`` term of every attention logit map (NACLIP's neighbourhood prior), or ``None``;
        ``prefix``: the tokens before the patches."""
        return None

    def last_block(self, encoder: DenseEncoder, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        last = encoder.num_blocks - 1
        q, k, v = encoder.qkv(last, x)
        out = encoder.attention_out(last, self.attention(q, k, v, grid))
        x = x + out if self.keep_residual else out
        return encoder.ffn(last, x) if self.keep_ffn else x

    def patch_features(self, encoder: DenseEncoder, crops: torch.Tensor, resize: PositionResize | None = None):
        grid = encoder.grid(*crops.shape[-2:])
        x = encoder.run_blocks(encoder.embed(crops, resize), 0, encoder.num_blocks - 1)
        x = self.last_block(encoder, x, grid)
        return F.normalize(encoder.head(x)[:, encoder.prefix_tokens:], dim=-1), grid


@register
@dataclass
class VanillaCLIP(LastBlockMethod):
    """Plain CLIP patch tokens (q-k attention everywhere)."""

    name: ClassVar[str] = "clip"
    summary: ClassVar[str] = "plain CLIP patch tokens (q-k attention, residual and FFN)"
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "clip")

    def attention(self, q, k, v, grid):
        return F.scaled_dot_product_attention(q, k, v)

    def attention_logits(self, q, k):
        return [(q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)]


@register
@dataclass
class MaskCLIP(LastBlockMethod):
    """MaskCLIP: the last block's attention replaced by the identity (value path), residual and FFN kept.

    ``protocol_mode="harness"`` (default) runs it in the SCLIP-lineage harness with OpenAI CLIP's numerics, as the
    SCLIP/NACLIP comparison tables do. ``protocol_mode="official"`` is the MaskCLIP repository's own code (the
    ``<dataset>-official`` presets, whole image at short side 512): its mmseg ViT (exact GELU, LayerNorm eps 1e-6)
    over the same weights, ImageNet normalisation, position embeddings resized straight to the grid, the input
    zero-padded at the bottom and right to whole patches with the grid logits stretched back over the unpadded size,
    and the 85 prompt templates. The label map is a plain argmax (``logit_scale`` only shapes the scores).
    """

    name: ClassVar[str] = "maskclip"
    summary: ClassVar[str] = "value path in the last block, residual and FFN kept (Zhou et al. 2022)"
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "maskclip")

    protocol_mode: Literal["harness", "official"] = "harness"

    @property
    def official(self) -> bool:
        return self.protocol_mode == "official"

    def normalization(self, models):
        return IMAGENET_NORMALIZATION if self.official else super().normalization(models)

    def text_classifier(self, models, spec, cache):
        templates = MASKCLIP_TEMPLATES if self.official else IMAGENET_TEMPLATES
        return TextClassifier.build(models.clip.text, spec, templates, cache)

    def attention(self, q, k, v, grid):
        return v

    def patch_features(self, encoder, crops, resize=None):
        if not self.official:
            return super().patch_features(encoder, crops, resize)
        if not hasattr(encoder, "variant"):
            raise UsageError("MaskCLIP's official protocol rebuilds an open_clip ViT with mmseg's numerics; "
                             f"{encoder.name or type(encoder).__name__} is not one")
        encoder = encoder.variant(layer_norm_eps=1e-6, exact_gelu=True)
        height, width = crops.shape[-2:]
        crops = F.pad(crops, (0, -width % encoder.patch_size, 0, -height % encoder.patch_size))
        return super().patch_features(encoder, crops, TO_SIZE)


@register
@dataclass
class SCLIP(LastBlockMethod):
    """SCLIP correlative self-attention: ``softmax(s QQ^T) + softmax(s KK^T)``, residual and FFN kept."""

    name: ClassVar[str] = "sclip"
    summary: ClassVar[str] = "q-q + k-k attention, residual and FFN kept (Wang et al. 2024)"
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "sclip")

    def attention(self, q, k, v, grid):
        return F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)

    def attention_logits(self, q, k):
        return [_self_logits(q), _self_logits(k)]


@register
@dataclass
class ClearCLIP(LastBlockMethod):
    """ClearCLIP: ``softmax(s QQ^T)`` with the residual and FFN removed."""

    name: ClassVar[str] = "clearclip"
    summary: ClassVar[str] = "q-q attention, residual and FFN removed (Lan et al. 2024)"
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "clearclip")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "clearclip")
    keep_residual: ClassVar[bool] = False
    keep_ffn: ClassVar[bool] = False
    crop_multiple: ClassVar[int] = 16  # the official code pads every crop to whole patches

    def attention(self, q, k, v, grid):
        return F.scaled_dot_product_attention(q, q, v)

    def attention_logits(self, q, k):
        return [_self_logits(q)]


def _self_logits(x: torch.Tensor) -> torch.Tensor:
    """``s x x^T`` per head (``B,heads,T,T``), the product taken before the scale."""
    return (x @ x.transpose(-1, -2)) * x.shape[-1] ** -0.5


@functools.lru_cache(maxsize=16)
def gaussian_prior(grid: tuple[int, int], std: float, prefix: int = 1, device: torch.device | None = None
                   ) -> torch.Tensor:
    """NACLIP's neighbourhood prior ``(P+N, P+N)``: ``exp(-|p_i - p_j|^2 / (2 std^2))`` over patch positions,
    zero on the rows and columns of the ``prefix`` tokens (the class token). Memoised per grid and device."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    points = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    prior = torch.exp(-torch.cdist(points, points).square() / (2 * std**2))
    return F.pad(prior, (prefix, 0, prefix, 0)).float().to(device)


@register
@dataclass
class NACLIP(LastBlockMethod):
    """NACLIP: ``softmax(s KK^T + Omega)`` with a Gaussian neighbourhood prior, residual and FFN removed."""

    name: ClassVar[str] = "naclip"
    summary: ClassVar[str] = "k-k attention + Gaussian neighbourhood prior, no residual/FFN (Hajimiri et al. 2025)"
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "naclip")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "naclip")
    keep_residual: ClassVar[bool] = False
    keep_ffn: ClassVar[bool] = False
    gaussian_std: float = setting(5.0, "standard deviation of the neighbourhood prior, in patches", above=0)

    def attention(self, q, k, v, grid):
        bias = self.attention_bias(grid, k.shape[-2] - grid[0] * grid[1], k.device)
        return F.scaled_dot_product_attention(k, k, v, attn_mask=bias.to(k.dtype))

    def attention_logits(self, q, k):
        return [_self_logits(k)]

    def attention_bias(self, grid, prefix, device):
        return gaussian_prior(grid, float(self.gaussian_std), prefix, device)
