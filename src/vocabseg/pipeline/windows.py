"""Sliding windows batched across images: window placement, per-window logits averaged over overlaps, the token
budget per forward pass, and the bilinear resizes between a token grid, a window and the image.

Follows the SCLIP-lineage harness: windows of ``crop`` with ``stride`` (the last window shifted back inside), raw
cosine logits averaged over overlaps, then bilinear upsampling to the original size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

CropLogits = Callable[[torch.Tensor], torch.Tensor]
"""Maps normalised crops ``B,3,h,w`` to per-query logits ``B,Q,h,w`` at crop resolution."""


@dataclass(frozen=True)
class Window:
    y1: int
    y2: int
    x1: int
    x2: int


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


def auto_window_batch(encoder, crop: int, views: int = 1, cap: int = 64) -> int:
    """Windows per forward pass: a token budget on CPU; on a GPU what a quarter of the free memory holds."""
    tokens = (crop // encoder.patch_size) ** 2 + encoder.prefix_tokens
    if encoder.device.type != "cuda":
        return max(1, CPU_TOKENS_PER_PASS // (tokens * views))
    free, _ = torch.cuda.mem_get_info(encoder.device)
    width, heads = encoder.width, encoder.num_heads
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


def upsample_rows(maps: torch.Tensor, size: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of :func:`upsample` ``(maps, size)``, computed from the few source rows they need, so that
    a band of a large output costs memory for the band only. Equal to the full resize within float rounding (the
    weights are those of PyTorch's bilinear kernel; the sums run in another order: differences <= 1e-6 relative)."""
    height, width = size
    if tuple(maps.shape[-2:]) == (height, width):
        return maps[..., start:stop, :]
    rows0, rows1, top, bottom = _linear_taps(maps.shape[-2], height, start, stop, maps.device)
    first = int(rows0[0])
    source = maps[..., first:int(rows1[-1]) + 1, :]
    # along the width with PyTorch's kernel (an unchanged height copies rows exactly), then the two source rows of
    # each output row
    across = F.interpolate(source[None], size=(source.shape[-2], width), mode="bilinear", align_corners=False)[0]
    return across[..., rows0 - first, :] * top[:, None] + across[..., rows1 - first, :] * bottom[:, None]


def _linear_taps(in_size: int, out_size: int, start: int, stop: int, device) -> tuple[torch.Tensor, ...]:
    """Source indices and weights of output positions ``start:stop`` of a bilinear (align_corners=False) resize."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    position = (scale.double() * (torch.arange(start, stop, dtype=torch.float64) + 0.5) - 0.5).float().clamp_min(0)
    index0 = position.floor().long().clamp_max(in_size - 1)
    weight1 = (position - index0).clamp(0, 1)
    index1 = torch.where(index0 < in_size - 1, index0 + 1, index0)
    return index0.to(device), index1.to(device), (1 - weight1).to(device), weight1.to(device)


def autocast(precision: str, device: torch.device):
    """Autocast context for ``precision`` ('fp32' disables it) on ``device``'s type."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grid_logits_to_crop(logits: torch.Tensor, grid: tuple[int, int], size) -> torch.Tensor:
    """``B,N,Q`` patch logits on a ``gh x gw`` grid -> ``B,Q,h,w`` (bilinear, align_corners=False)."""
    b, _, q = logits.shape
    maps = logits.transpose(1, 2).reshape(b, q, *grid)
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
