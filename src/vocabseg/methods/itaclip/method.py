"""ITACLIP (Aydın et al., CVPRW 2025): Image, Text and Architecture enhancements of CLIP (spec section 2.5).

* Architecture. Blocks run unchanged; at the inputs of the intermediate blocks (1-indexed, default 7, 8, 10) the
  self-self maps ``softmax(s QQ^T) + softmax(s KK^T)`` (per head, from that block's ``ln_1`` input) are recorded.
  The last block uses ``0.5 * A_last + 0.5 * mean(A_intermediate)`` on its own V, keeps the residual and drops the
  FFN: ``x' = x + out_proj(concat_h A_h V_h)``, features ``normalize(ln_post(x') @ proj)``.
* Image engineering, per crop: the original, its grayscale (luma of the *normalised* channels, replicated) and a
  Gaussian blur (11 taps, sigma 5, reflect padding) give per-view normalised features that are averaged (not
  renormalised) -> ``L_main``; the vertical and horizontal flips give logits that are upsampled, flipped back and
  averaged -> ``L_flip``; the crop logits are ``λ L_main + (1 - λ) L_flip``. All views of all crops of a window batch
  run as one backbone batch.
* Text. With auxiliary texts (definitions or synonyms, :mod:`.auxtexts`), every name embedding of a
  non-background class becomes ``(1 - α) e_name + α e_aux`` (same 80 templates, no renormalisation).
* Post-processing. The common harness (sliding window, PAMR, thresholds), then a 3x3 grey-level closing of the
  label map.

The published presets use α only with the auxiliary texts of the paper, which come from Llama 3 and are not
shipped here: pass your own (``aux_texts=``, ``--aux-texts F``). ``vocabseg aux-texts --dataset voc21 --kind
definition --out voc21.txt`` generates them with the paper's prompts (definitions for voc21, pc60 and coco-stuff,
synonyms for coco-object and cityscapes: :data:`PRESET_AUX_KIND`). Without aux texts the presets run with α = 0 (no
text mixing). For custom images the defaults are short side 336, crop 224 / stride 28 (``stride=56`` is about as
good and 3x cheaper, paper Table 7), PAMR on, λ = 0.75 and α = 0.2 (the official code's default) once aux texts are
given.

Differences from the official code: PAMR follows the ``pamr`` knob in whole-image mode too (the official code applies
it only in the sliding-window path; every preset slides), and whole-image logits are upsampled in two steps as in the
common harness.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import Method, Preset
from vocabseg.methods.itaclip.auxtexts import AuxTexts
from vocabseg.methods.registry import register
from vocabseg.pipeline import postprocess
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.windows import grid_logits_to_crop
from vocabseg.text.classifier import TextClassifier, embed_names
from vocabseg.text.templates import IMAGENET_TEMPLATES

#: Luma weights of torchvision's ``rgb_to_grayscale``.
LUMA = (0.2989, 0.587, 0.114)

#: The kind of auxiliary text each published preset was tuned with (``vocabseg aux-texts --kind``).
PRESET_AUX_KIND = {"voc21": "definition", "pc60": "definition", "coco-object": "synonym", "coco-stuff": "definition",
                   "cityscapes": "synonym"}


# --- image engineering ------------------------------------------------------------------------------------------

def grayscale(images: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale`` of ``B,3,H,W`` (applied to normalised values), replicated to 3 channels."""
    r, g, b = images.unbind(dim=1)
    gray = LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
    return gray.unsqueeze(1).expand(-1, 3, -1, -1)


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """torchvision's 1-D Gaussian: ``exp(-x^2 / 2 sigma^2)`` at ``x = -(k-1)/2 .. (k-1)/2``, normalised to sum 1."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(dtype=dtype, device=device)


def gaussian_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """torchvision's ``GaussianBlur(kernel_size, sigma)`` of ``B,C,H,W``: separable, reflect padding."""
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive (got {kernel_size})")
    pad = kernel_size // 2
    channels = images.shape[1]
    kernel = gaussian_kernel1d(kernel_size, sigma, images.dtype, images.device)
    x = F.pad(images, (pad, pad, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size), groups=channels)
    x = F.pad(x, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1), groups=channels)


def self_self_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``softmax(s QQ^T) + softmax(s KK^T)`` per head (``B,heads,T,T``), ``s = head_dim ** -0.5``."""
    scale = q.shape[-1] ** -0.5
    return (torch.softmax(scale * q @ q.transpose(-1, -2), dim=-1)
            + torch.softmax(scale * k @ k.transpose(-1, -2), dim=-1))


def mix_aux_embeddings(embeddings: torch.Tensor, query_class: torch.Tensor, aux: torch.Tensor, alpha: float,
                       has_background: bool) -> torch.Tensor:
    """``(1 - α) e_q + α e_aux(class(q))`` for the queries of non-background classes (no renormalisation).

    ``aux`` holds one embedding per non-background class, in class order.
    """
    first = 1 if has_background else 0
    mixed = embeddings.clone()
    rows = query_class >= first
    mixed[rows] = (1 - alpha) * embeddings[rows] + alpha * aux[query_class[rows] - first].to(embeddings.dtype)
    return mixed


@register
@dataclass
class ITACLIP(Method):
    """ITACLIP: intermediate self-self maps, FFN-free last block, image engineering, auxiliary texts, closing."""

    name: ClassVar[str] = "itaclip"
    summary: ClassVar[str] = ("q-q + k-k attention mixed with intermediate maps, no FFN, 5-view image engineering, "
                              "aux texts, closing (Aydın et al. 2025)")
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "itaclip")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "itaclip")

    intermediate_layers: tuple[int, ...] = (7, 8, 10)
    image_engineering: bool = True
    flips: bool = True
    img_eng_coefficient: float = 0.75
    aux_texts: str | os.PathLike | Mapping[str, Any] | AuxTexts | None = None
    aux_coefficient: float = 0.2
    closing: bool = True
    blur_kernel: int = 11
    blur_sigma: float = 5.0

    def __post_init__(self):
        if isinstance(self.intermediate_layers, int):
            self.intermediate_layers = (self.intermediate_layers,)
        for name in ("img_eng_coefficient", "aux_coefficient"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise UsageError(f"{name} must lie in [0, 1] (got {getattr(self, name)})")
        # Read the aux-text file now, so a bad path fails before any image is processed.
        self._aux = AuxTexts.from_any(self.aux_texts) if self.aux_texts not in (None, "") else None

    # --- views --------------------------------------------------------------------------------------------------

    @property
    def main_views(self) -> int:
        return 3 if self.image_engineering else 1

    @property
    def flip_views(self) -> int:
        return 2 if self.flips else 0

    @property
    def views_per_crop(self) -> int:  # type: ignore[override]
        return self.main_views + self.flip_views

    # --- architecture -------------------------------------------------------------------------------------------

    def _block_indices(self, encoder) -> list[int]:
        last = encoder.num_blocks
        bad = [layer for layer in self.intermediate_layers if not 1 <= layer <= last - 1]
        if bad:
            raise UsageError(f"intermediate_layers are 1-indexed blocks before the last one (1..{last - 1} for this "
                             f"{last}-block model); got {bad}")
        return sorted({layer - 1 for layer in self.intermediate_layers})

    def patch_features(self, encoder, crops):
        grid = encoder.grid(*crops.shape[-2:])
        indices = set(self._block_indices(encoder))
        last = encoder.num_blocks - 1
        x = encoder.embed(crops)
        total = None
        for index in range(last):
            if index not in indices:
                x = encoder.block(index, x)
                continue
            q, k, v = encoder.qkv(index, x)  # one projection serves the recorded map and the unchanged block
            attn = self_self_map(q, k)
            total = attn if total is None else total + attn
            x = encoder.ffn(index, x + encoder.attention_out(index, F.scaled_dot_product_attention(q, k, v)))
        q, k, v = encoder.qkv(last, x)
        attn = self_self_map(q, k)
        if total is not None:
            attn = 0.5 * attn + 0.5 * (total / len(indices))
        x = x + encoder.attention_out(last, attn @ v)  # residual kept, FFN removed
        return F.normalize(encoder.head(x)[:, encoder.prefix_tokens:], dim=-1), grid

    # --- image engineering --------------------------------------------------------------------------------------

    def views(self, crops: torch.Tensor) -> torch.Tensor:
        """All views of ``B`` crops stacked view-major: original, [gray, blur], [vflip, hflip] -> ``V*B,3,h,w``."""
        views = [crops]
        if self.image_engineering:
            views += [grayscale(crops), gaussian_blur(crops, self.blur_kernel, self.blur_sigma)]
        if self.flips:
            views += [crops.flip(-2), crops.flip(-1)]
        return torch.cat(views)

    def crop_logits(self, models, crops, text):
        b = crops.shape[0]
        size = crops.shape[-2:]
        features, grid = self.patch_features(models.clip.image, self.views(crops))
        features = features.reshape(self.views_per_crop, b, *features.shape[1:])
        main = features[: self.main_views].mean(dim=0)  # per-view normalised, averaged, not renormalised
        logits = grid_logits_to_crop(main @ text.T, grid, size)
        if not self.flips:
            return logits
        flipped = features[self.main_views:]
        vflip = grid_logits_to_crop(flipped[0] @ text.T, grid, size).flip(-2)
        hflip = grid_logits_to_crop(flipped[1] @ text.T, grid, size).flip(-1)
        lam = float(self.img_eng_coefficient)
        return lam * logits + (1 - lam) * 0.5 * (vflip + hflip)

    # --- text ---------------------------------------------------------------------------------------------------

    def text_classifier(self, models, spec, cache):
        classifier = super().text_classifier(models, spec, cache)
        alpha = float(self.aux_coefficient)
        if self._aux is None or alpha == 0:
            return classifier
        first = 1 if spec.has_background else 0
        texts = self._aux.for_classes(spec.names[first:], spec.labels[first:])
        aux_embeddings = embed_names(models.clip.text, texts, IMAGENET_TEMPLATES, cache)
        embeddings = mix_aux_embeddings(classifier.embeddings, classifier.query_class, aux_embeddings, alpha,
                                        spec.has_background)
        return TextClassifier(spec=spec, embeddings=embeddings, query_class=classifier.query_class)

    # --- post-processing ----------------------------------------------------------------------------------------

    def refine_labels(self, labels, prepared, dense, protocol):
        return postprocess.morphological_closing(labels, 3) if self.closing else labels

