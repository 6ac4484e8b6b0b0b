"""Resize cost per image: the mmcv-exact OpenCV resize vocabseg uses now, against the float bilinear + rounding it
used before (which differed from the official pipelines by one grey level at many pixels).

Both take a uint8 ``H,W,3`` photo to the protocol size (short side S, long side capped at 2048) and normalise it.
Prints milliseconds per image (median of ``--repeats``) and the share of pixels where the two disagree.

    python bench/bench_resize.py [--short-side 336] [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from vocabseg.models.encoder import CLIP_NORMALIZATION
from vocabseg.pipeline import preprocess

#: (name, height, width): a VOC-size photo, a 12-megapixel phone photo.
SIZES = (("VOC 375x500", 375, 500), ("12 MP 3000x4000", 3000, 4000))


def float_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The previous resize: torch bilinear (align_corners=False) on floats, rounded back to 8-bit values."""
    x = image.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round_().clamp_(0, 255)
    return x[0].permute(1, 2, 0).to(torch.uint8)


def previous_preprocess(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return CLIP_NORMALIZATION(float_bilinear(image, size).permute(2, 0, 1)[None])


def milliseconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short-side", type=int, default=336)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, OpenCV {cv2.__version__}, {args.threads} threads, short side {args.short_side}")
    print("| image | before: float bilinear + round (ms) | now: cv2 INTER_LINEAR (ms) | pixels that differ |")
    print("|---|---|---|---|")
    for name, height, width in SIZES:
        # a smooth photo-like image (noise would exaggerate the rounding differences)
        ys, xs = np.mgrid[0:height, 0:width]
        image = np.stack([(ys * 255 // height), (xs * 255 // width), ((ys + xs) * 127 // (height + width))], -1)
        image = torch.from_numpy((image + rng.integers(0, 8, image.shape)).clip(0, 255).astype(np.uint8))
        size = preprocess.resized_shape(height, width, args.short_side)
        before = milliseconds(functools.partial(previous_preprocess, image, size), args.repeats)
        now = milliseconds(functools.partial(preprocess.preprocess, image, args.short_side), args.repeats)
        differ = (float_bilinear(image, size) != preprocess.resize_uint8(image, size)).any(-1).float().mean()
        print(f"| {name} | {before:.2f} | {now:.2f} | {float(differ):.1%} |")


if __name__ == "__main__":
    main()
