"""From a decoded image to a model input: the mmcv rescale rule, OpenCV's resize on the 8-bit image, normalisation."""

from __future__ import annotations

import numpy as np
import torch

from vocabseg.models.encoder import CLIP_NORMALIZATION, Normalization


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
    return normalization(image.permute(2, 0, 1)[None])
