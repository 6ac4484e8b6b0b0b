"""Training-free dense CLIP baselines that differ only in the last vision block (spec sections 2.1-2.4).

Each recipe runs blocks ``0 .. L-2`` unchanged and rewrites block ``L-1`` as
``x' = [x +] out_proj(concat_h A_h V_h)`` and ``x'' = [x' + FFN(LN2(x'))]``; features are
``normalize(ln_post(x'') @ proj)`` of the patch tokens. ``A_h`` uses the scale ``s = head_dim ** -0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vocabseg.methods.base import Method, Preset, Protocol, register
from vocabseg.pipeline import inference
from vocabseg.text.classifier import IMAGENET_TEMPLATES, MASKCLIP_TEMPLATES, ClassSpec, TextCache, TextClassifier

#: Datasets with published protocols, and their short sides in the SCLIP harness.
_SCLIP_TABLE = {
    # dataset: (short side, logit scale, prob_thd, area_thd)
    "voc21": (336, 65.0, 0.1, 0.1),
    "voc20": (336, 40.0, 0.0, None),
    "pc60": (336, 50.0, 0.1, None),
    "pc59": (336, 40.0, 0.0, None),
    "coco-object": (336, 50.0, 0.1, None),
    "coco-stuff": (448, 40.0, 0.0, None),
    "cityscapes": (560, 40.0, 0.0, None),
    "ade150": (336, 40.0, 0.0, None),
}


def _sclip_presets() -> dict[str, Preset]:
    return {
        dataset: Preset(Protocol(short_side=s, logit_scale=tau, prob_thd=thd, area_thd=area), dataset, "sclip")
        for dataset, (s, tau, thd, area) in _SCLIP_TABLE.items()
    }


def _naclip_presets() -> dict[str, Preset]:
    presets = {}
    for dataset in _SCLIP_TABLE:
        protocol = Protocol(
            short_side=560 if dataset == "cityscapes" else 336,
            crop=None if dataset in ("voc21", "voc20") else 224,
            logit_scale=40.0,
            prob_thd=0.1 if dataset in ("voc21", "pc60", "coco-object") else 0.0,
            pamr=True,
        )
        presets[dataset] = Preset(protocol, dataset, "sclip")
    return presets


def _clearclip_presets() -> dict[str, Preset]:
    thresholds = {"voc21": 0.5, "pc60": 0.15, "coco-object": 0.4}
    return {
        dataset: Preset(
            Protocol(short_side=448, crop=224 if dataset == "cityscapes" else 448, stride=224, logit_scale=50.0,
                     prob_thd=thresholds.get(dataset, 0.0)),
            dataset, "clearclip")
        for dataset in _SCLIP_TABLE
    }


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

    def attention_bias(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """An additive ``(T, T)`` term of every attention logit map (NACLIP's neighbourhood prior), or ``None``."""
        return None

    def last_block(self, backbone, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        last = backbone.num_blocks - 1
        q, k, v = backbone.qkv(last, x)
        out = backbone.attention_out(last, self.attention(q, k, v, grid))
        x = x + out if self.keep_residual else out
        return backbone.ffn(last, x) if self.keep_ffn else x

    def patch_features(self, backbone, crops, pos_mode: str = "dino"):
        grid = backbone.grid(*crops.shape[-2:])
        x = backbone.run_blocks(backbone.embed(crops, pos_mode), 0, backbone.num_blocks - 1)
        x = self.last_block(backbone, x, grid)
        return F.normalize(backbone.head(x)[:, 1:], dim=-1), grid


@register
@dataclass
class VanillaCLIP(LastBlockMethod):
    """Plain CLIP patch tokens (q-k attention everywhere)."""

    name: ClassVar[str] = "clip"
    summary: ClassVar[str] = "plain CLIP patch tokens (q-k attention, residual and FFN)"
    presets: ClassVar[dict[str, Preset]] = _sclip_presets()

    def attention(self, q, k, v, grid):
        return F.scaled_dot_product_attention(q, k, v)

    def attention_logits(self, q, k):
        return [(q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)]


#: MaskCLIP's own test scales (mmseg 0.x ``img_scale``, keep ratio): dataset -> (short side, long-side cap).
_MASKCLIP_SCALES = {"voc20": (512, 2048), "pc59": (520, 520), "coco-stuff": (512, 2048), "cityscapes": (512, 1024)}


def _maskclip_presets() -> dict[str, Preset]:
    official = {
        f"{dataset}-official": Preset(
            Protocol(short_side=short, max_long_side=cap, crop=None, logit_scale=100.0, prob_thd=0.0),
            dataset, "maskclip", {"protocol_mode": "official"})
        for dataset, (short, cap) in _MASKCLIP_SCALES.items()
    }
    return {**_sclip_presets(), **official}


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
    presets: ClassVar[dict[str, Preset]] = _maskclip_presets()

    protocol_mode: str = "harness"

    def __post_init__(self):
        if self.protocol_mode not in ("harness", "official"):
            raise ValueError(f"protocol_mode must be 'harness' or 'official' (got {self.protocol_mode!r})")

    @property
    def official(self) -> bool:
        return self.protocol_mode == "official"

    @property
    def normalization(self) -> inference.Normalization:  # type: ignore[override]
        return inference.IMAGENET_NORMALIZATION if self.official else inference.CLIP_NORMALIZATION

    def build_classifier(self, backbone, spec: ClassSpec, cache: TextCache | None) -> TextClassifier:
        templates = MASKCLIP_TEMPLATES if self.official else IMAGENET_TEMPLATES
        return TextClassifier.build(backbone, spec, templates, cache)

    def attention(self, q, k, v, grid):
        return v

    def patch_features(self, backbone, crops):
        if not self.official:
            return super().patch_features(backbone, crops)
        backbone = backbone.variant(layer_norm_eps=1e-6, exact_gelu=True)
        height, width = crops.shape[-2:]
        crops = F.pad(crops, (0, -width % backbone.patch_size, 0, -height % backbone.patch_size))
        return super().patch_features(backbone, crops, pos_mode="size")


@register
@dataclass
class SCLIP(LastBlockMethod):
    """SCLIP correlative self-attention: ``softmax(s QQ^T) + softmax(s KK^T)``, residual and FFN kept."""

    name: ClassVar[str] = "sclip"
    summary: ClassVar[str] = "q-q + k-k attention, residual and FFN kept (Wang et al. 2024)"
    presets: ClassVar[dict[str, Preset]] = _sclip_presets()

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
    default_protocol: ClassVar[Protocol] = Protocol(logit_scale=50.0)
    presets: ClassVar[dict[str, Preset]] = _clearclip_presets()
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


def gaussian_prior(grid: tuple[int, int], std: float) -> torch.Tensor:
    """NACLIP's neighbourhood prior ``(1+N, 1+N)``: ``exp(-|p_i - p_j|^2 / (2 std^2))`` over patch positions,
    zero on the class-token row and column."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    points = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    prior = torch.exp(-torch.cdist(points, points).square() / (2 * std**2))
    return F.pad(prior, (1, 0, 1, 0)).float()


@register
@dataclass
class NACLIP(LastBlockMethod):
    """NACLIP: ``softmax(s KK^T + Omega)`` with a Gaussian neighbourhood prior, residual and FFN removed."""

    name: ClassVar[str] = "naclip"
    summary: ClassVar[str] = "k-k attention + Gaussian neighbourhood prior, no residual/FFN (Hajimiri et al. 2025)"
    default_protocol: ClassVar[Protocol] = Protocol(pamr=True)
    presets: ClassVar[dict[str, Preset]] = _naclip_presets()
    keep_residual: ClassVar[bool] = False
    keep_ffn: ClassVar[bool] = False
    gaussian_std: float = 5.0

    def attention(self, q, k, v, grid):
        return F.scaled_dot_product_attention(k, k, v, attn_mask=self.attention_bias(grid, k.device).to(k.dtype))

    def attention_logits(self, q, k):
        return [_self_logits(k)]

    def attention_bias(self, grid, device):
        key = ("prior", grid, self.gaussian_std, device)
        if key not in self._cache:
            self._cache[key] = gaussian_prior(grid, self.gaussian_std).to(device)
        return self._cache[key]
