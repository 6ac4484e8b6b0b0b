"""Method-independent dense inference: resize, normalise, whole-image or batched sliding-window logits.

Follows the SCLIP-lineage harness: short side to S (bilinear, long side capped at 2048), CLIP normalisation,
windows of ``crop`` with ``stride`` (the last window shifted back inside), raw cosine logits averaged over
overlaps, then bilinear upsampling to the original size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation ``(x / unit - mean) / std`` of RGB pixel values ``x`` in 0..255.

    ``unit=255`` is torchvision's ``ToTensor`` + ``Normalize`` (statistics in 0..1); ``unit=1`` is the mmcv/mmseg
    convention (statistics in 0..255). The two differ in float rounding, so each official pipeline's own form is
    kept.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    unit: float = 1.0


#: CLIP's statistics as the mmseg configs of the SCLIP lineage write them (0..255).
CLIP_NORMALIZATION = Normalization((122.771, 116.746, 104.094), (68.501, 66.632, 70.323))
#: CLIP's statistics in OpenAI's own preprocessing (torchvision ``ToTensor`` + ``Normalize``).
OPENAI_NORMALIZATION = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 255.0)
#: ImageNet statistics of the mmseg 0.x configs (MaskCLIP's own protocol).
IMAGENET_NORMALIZATION = Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

CropLogits = Callable[[torch.Tensor], torch.Tensor]
"""Maps normalised crops ``B,3,h,w`` to per-query logits ``B,Q,h,w`` at crop resolution."""


@dataclass(frozen=True)
class Window:
    y1: int
    y2: int
    x1: int
    x2: int


def resized_shape(height: int, width: int, short_side: int, max_long_side: int = 2048) -> tuple[int, int]:
    """mmcv ``rescale`` with ``keep_ratio``: scale = min(long_cap / long, S / short), sizes rounded half up."""
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``H,W,C`` -> uint8 ``h,w,C`` exactly as mmcv's ``imresize``: OpenCV's ``INTER_LINEAR``.

    OpenCV resizes 8-bit images with a fixed-point kernel whose rounding differs from float bilinear plus rounding
    by one grey level at many pixels; the official SCLIP-lineage and MaskCLIP pipelines use it, so parity needs it.
    The resize runs on the CPU (the result goes back to ``image``'s device).
    """
    import cv2

    if tuple(image.shape[:2]) == tuple(size):
        return image
    array = np.ascontiguousarray(image.cpu().numpy())
    resized = cv2.resize(array, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(resized.reshape(size[0], size[1], -1)).to(image.device)


def preprocess(image: torch.Tensor, short_side: int | None, max_long_side: int = 2048,
               normalization: Normalization = CLIP_NORMALIZATION) -> torch.Tensor:
    """uint8 ``H,W,3`` (RGB) -> normalised float ``1,3,h,w`` at the protocol's size.

    The resize is mmcv's (:func:`resized_shape`, then :func:`resize_uint8`) on the 8-bit image, before
    normalising. ``short_side=None`` keeps the original size.
    """
    if short_side:
        image = resize_uint8(image, resized_shape(image.shape[0], image.shape[1], short_side, max_long_side))
    return normalize(image.permute(2, 0, 1)[None], normalization)


def normalize(images: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """Pixel values ``B,3,H,W`` (0..255, any dtype) -> normalised float32."""
    x = images.float()
    if normalization.unit != 1:
        x = x / normalization.unit
    mean = torch.tensor(normalization.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[Window]:
    """Window placement of mmseg's ``slide_inference``: a grid of stride steps, the last one shifted inside."""
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop and stride must be positive (got crop={crop}, stride={stride})")
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            windows.append(Window(max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


#: Tokens per forward pass on CPU: beyond this the activations fall out of cache and a pass gets slower per crop
#: (measured on ViT-B/16: 224 crops run fastest 6 at a time, 448 crops one at a time).
CPU_TOKENS_PER_PASS = 1200


def auto_window_batch(backbone, crop: int, views: int = 1, cap: int = 64) -> int:
    """Windows per forward pass: a token budget on CPU; on a GPU what a quarter of the free memory holds."""
    tokens = (crop // backbone.patch_size) ** 2 + 1
    if backbone.device.type != "cuda":
        return max(1, CPU_TOKENS_PER_PASS // (tokens * views))
    free, _ = torch.cuda.mem_get_info(backbone.device)
    width, heads = backbone.width, backbone.num_heads
    per_crop = 4 * views * (tokens * width * 16 + 2 * heads * tokens * tokens)  # fp32 activations of one block
    return int(max(1, min(cap, free // 4 // per_crop)))


def dense_logits_batch(crop_logits: CropLogits, images: list[torch.Tensor], crop: int | None, stride: int,
                       batch_size: int = 16) -> list[torch.Tensor]:
    """Per-query logits ``Q,H,W`` of each normalised ``1,3,H,W`` image: sliding windows, or the whole image when
    ``crop`` is falsy. Windows of equal size, from one image or several, run ``batch_size`` to a forward pass;
    overlapping window logits are averaged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    groups: dict[tuple[int, int], list[tuple[int, Window]]] = {}
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        windows = sliding_windows(height, width, crop, stride) if crop else [Window(0, height, 0, width)]
        for w in windows:
            groups.setdefault((w.y2 - w.y1, w.x2 - w.x1), []).append((index, w))
    totals: list[torch.Tensor | None] = [None] * len(images)
    counts: list[torch.Tensor | None] = [None] * len(images)
    for jobs in groups.values():
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            logits = crop_logits(torch.cat([images[i][:, :, w.y1:w.y2, w.x1:w.x2] for i, w in batch]))
            for (i, w), window_logits in zip(batch, logits, strict=True):
                if totals[i] is None:
                    totals[i] = logits.new_zeros(logits.shape[1], *images[i].shape[-2:])
                    counts[i] = logits.new_zeros(1, *images[i].shape[-2:])
                totals[i][:, w.y1:w.y2, w.x1:w.x2] += window_logits
                counts[i][:, w.y1:w.y2, w.x1:w.x2] += 1
    return [total / count for total, count in zip(totals, counts, strict=True)]


def dense_logits(crop_logits: CropLogits, image: torch.Tensor, crop: int | None, stride: int,
                 batch_size: int = 16) -> torch.Tensor:
    """:func:`dense_logits_batch` of one image."""
    return dense_logits_batch(crop_logits, [image], crop, stride, batch_size)[0]


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of ``C,h,w`` maps to ``size``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def autocast(precision: str, device: torch.device):
    """Autocast context for ``precision`` ('fp32' disables it) on ``device``'s type."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
