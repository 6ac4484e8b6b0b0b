"""Seconds per image of each method on a 336x448 image with a full-size random ViT-B/16, split by stage.

One command runs every method/protocol of the issue-7 reference table and the plug-ins of issue 17 (ResCLIP, FLOSS;
FLOSS with stand-in rankings: which templates it uses does not change its cost; the ViT column of a plug-in includes
its per-crop work, split with ``--stages``). ITACLIP at stride 28 takes minutes per image on a CPU; ``--methods``
picks a subset (e.g. ``sclip,naclip+resclip``) and prints (and with ``--out`` writes) a Markdown table: total
seconds per image (median of ``--repeats`` after a warm-up) split into ViT, PAMR and other
work (preprocessing, upsampling, softmax/thresholds), ViT forward passes per image, and images per second. Text
embeddings are timed once with an empty cache (their own row) and come from the cache in the per-image runs.

    python bench/bench_methods.py [--device cuda] [--precision bf16] [--repeats 3] [--methods sclip,naclip]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch

from vocabseg import Segmenter
from vocabseg.backbones.clip import CLIPBackbone
from vocabseg.engine import timing

# (label, method, preset, overrides, official s/image from issue 7 (2 CPU threads) or None)
CASES = [
    ("CLIP, crop 224 / stride 112", "clip", None, dict(crop=224, stride=112), None),
    ("MaskCLIP, crop 224 / stride 112", "maskclip", None, dict(crop=224, stride=112), None),
    ("SCLIP, crop 224 / stride 112", "sclip", None, dict(crop=224, stride=112), 2.68),
    ("NACLIP, whole image + PAMR", "naclip", None, dict(crop=0, pamr=True), 5.09),
    ("NACLIP, crop 224 / stride 112 + PAMR", "naclip", None, dict(crop=224, stride=112, pamr=True), 6.79),
    ("ClearCLIP, short side 448, crop 448 / stride 224", "clearclip", None, dict(short_side=448, crop=448, stride=224),
     1.49),
    ("ITACLIP, crop 224 / stride 112, image engineering, PAMR", "itaclip", None, dict(stride=112), None),
    ("ITACLIP, crop 224 / stride 56, image engineering, PAMR", "itaclip", None, dict(stride=56), None),
    ("ITACLIP, crop 224 / stride 28, image engineering, PAMR", "itaclip", None, dict(stride=28), 91.2),
    ("CLIPtrase 224 (paper protocol)", "cliptrase", "voc21-224", {}, 0.79),
    ("CLIPtrase 336 (paper protocol)", "cliptrase", "voc21-336", {}, 4.49),
    ("ResCLIP on NACLIP, whole image (voc21 preset)", "naclip+resclip", "voc21", {}, None),
    ("ResCLIP on NACLIP, crop 224 / stride 112 (pc59 preset)", "naclip+resclip", "pc59", {}, None),
    ("ResCLIP on ClearCLIP, crop 224 / stride 112 (pc59 preset)", "clearclip+resclip", "pc59", {}, None),
    ("ResCLIP on SCLIP, crop 224 / stride 112 (pc59 preset)", "sclip+resclip", "pc59", {}, None),
    ("FLOSS on NACLIP, whole image (voc20 protocol), 46 experts", "naclip+floss", "voc20", {}, None),
    ("FLOSS on NACLIP, crop 224 / stride 112 (pc59 protocol), 46 experts", "naclip+floss", "pc59", {}, None),
    ("FLOSS on SCLIP, crop 224 / stride 112, 46 experts", "sclip+floss", "pc59", {}, None),
]
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
               "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def _stand_in_rankings(labels) -> dict:
    """FLOSS rankings with four templates per class (which ones does not change the cost), in the official layout."""
    return {"classes": {label: {"entropy_ranking": [
        {"template_id": (7 * c + 11 * i) % 80, "entropy": 0.1 * i, "pixel_percentage": 1.0, "rank": i + 1}
        for i in range(4)]} for c, label in enumerate(labels)}}


def _timed_segment(segmenter, image, spec, repeats, maps):
    segmenter.segment(image, spec, maps=maps)  # warm-up
    runs = []
    for _ in range(repeats):
        with timing.record() as stages:
            start = time.perf_counter()
            segmenter.segment(image, spec, maps=maps)
            timing._sync()
            total = time.perf_counter() - start
        runs.append((total, dict(stages)))
    runs.sort(key=lambda run: run[0])
    return runs[len(runs) // 2]


def _profile(segmenter, image, spec, maps) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        segmenter.segment(image, spec, maps=maps)
        timing._sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", help="comma-separated subset of methods")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument("--maps", action="store_true",
                        help="also return the per-class score and logit maps (default: labels, as the official "
                             "evaluation loops produce; on a GPU copying the maps back costs ~20 ms per image)")
    parser.add_argument("--stages", action="store_true", help="also print every recorded stage of each row")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators of one image per row")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval().to(args.device)
    backbone = CLIPBackbone(model, name="ViT-B-16 (random)")
    image = np.random.default_rng(0).integers(0, 256, (336, 448, 3), dtype=np.uint8)
    device = args.device + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    lines = [
        f"machine: {platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {device}, precision {args.precision}",
        f"image: {image.shape[0]}x{image.shape[1]}; 20 VOC classes + background (26 names); "
        f"median of {args.repeats} after a warm-up; output: labels" + (" + score/logit maps" if args.maps else ""),
        "",
    ]
    cache = tempfile.mkdtemp(prefix="vocabseg-bench-")
    text_segmenter = Segmenter("sclip", backbone=backbone, text_cache=cache)
    spec = text_segmenter.class_spec(VOC_CLASSES)
    start = time.perf_counter()
    text_segmenter.classifier(spec)
    text_seconds = time.perf_counter() - start
    lines += [
        "| method and protocol | s/image | ViT | PAMR | other | ViT passes | images/s | official s/image |",
        "|---|---|---|---|---|---|---|---|",
        f"| text classifier, {len(spec.queries)} names x 80 templates (empty cache) | {text_seconds:.2f} "
        f"| | | | | | 116.4 (21 x 80) |",
    ]
    print("\n".join(lines), flush=True)
    wanted = set(args.methods.split(",")) if args.methods else None
    for label, method, preset, overrides, official in CASES:
        if wanted and method not in wanted:
            continue
        if method.endswith("+floss"):
            overrides = {**overrides, "rankings": _stand_in_rankings(spec.labels)}
        segmenter = Segmenter(method, backbone=backbone, preset=preset, text_cache=cache, precision=args.precision,
                              **overrides)
        total, stages = _timed_segment(segmenter, image, spec, args.repeats, args.maps)
        vit, pamr = stages.get("vit", 0.0), stages.get("pamr", 0.0)
        passes = segmenter.method.vit_passes(*image.shape[:2], segmenter.protocol)
        row = (f"| {label} | {total:.2f} | {vit:.2f} | {pamr:.2f} | {total - vit - pamr:.2f} | {passes} "
               f"| {1 / total:.2f} | {official if official is not None else ''} |")
        lines.append(row)
        print(row, flush=True)
        if args.stages:
            outside = total - sum(stages.values())
            print("    ms: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in stages.items())
                  + f", outside stages {outside * 1000:.1f}", flush=True)
        if args.profile:
            print(_profile(segmenter, image, spec, args.maps), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
