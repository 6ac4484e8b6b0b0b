"""Seconds per image of each training-free method on a 336x448 image with a full-size random ViT-B/16.

Text embeddings are built before timing (they are cached in real use). Prints the machine, threads, torch version
and shapes, then one row per method/protocol: seconds per image (median of --repeats after a warm-up) and ViT
forward passes per image.

    python bench/bench_methods.py [--device cuda] [--repeats 3] [--methods sclip,naclip]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from vocabseg import Segmenter
from vocabseg.backbones.clip import CLIPBackbone

# (label, method, protocol overrides): the protocols the official figures of issue 7 use
CASES = [
    ("clip, crop 224 / stride 112", "clip", dict(crop=224, stride=112)),
    ("maskclip, crop 224 / stride 112", "maskclip", dict(crop=224, stride=112)),
    ("sclip, crop 224 / stride 112", "sclip", dict(crop=224, stride=112)),
    ("naclip, whole image + PAMR", "naclip", dict(crop=0, pamr=True)),
    ("naclip, crop 224 / stride 112 + PAMR", "naclip", dict(crop=224, stride=112, pamr=True)),
    ("clearclip, short side 448, crop 448 / stride 224", "clearclip", dict(short_side=448, crop=448, stride=224)),
]
CLASSES = ["aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
           "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", help="comma-separated subset of methods")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval().to(args.device)
    backbone = CLIPBackbone(model, name="ViT-B-16 (random)")
    image = np.random.default_rng(0).integers(0, 256, (336, 448, 3), dtype=np.uint8)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"image: {image.shape[0]}x{image.shape[1]}, {len(CLASSES)} classes + 26 background names, "
          f"median of {args.repeats} after a warm-up\n")
    cache = tempfile.mkdtemp(prefix="vocabseg-bench-")
    start = time.perf_counter()
    text_segmenter = Segmenter("sclip", backbone=backbone, text_cache=cache)
    text_segmenter.classifier(text_segmenter.class_spec(CLASSES))
    print(f"text classifier ({len(CLASSES)} classes + 26 background names x 80 templates, empty cache): "
          f"{time.perf_counter() - start:.1f} s\n")
    print("| method and protocol | s/image | ViT passes/image |")
    print("|---|---|---|")
    wanted = set(args.methods.split(",")) if args.methods else None
    for label, method, overrides in CASES:
        if wanted and method not in wanted:
            continue
        segmenter = Segmenter(method, backbone=backbone, text_cache=cache, **overrides)
        spec = segmenter.class_spec(CLASSES)
        segmenter.classifier(spec)  # from the cache, outside the timing
        segmenter.segment(image, spec)  # warm-up
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            segmenter.segment(image, spec)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        passes = segmenter.method.vit_passes(*image.shape[:2], segmenter.protocol)
        print(f"| {label} | {statistics.median(times):.2f} | {passes} |", flush=True)


if __name__ == "__main__":
    main()
