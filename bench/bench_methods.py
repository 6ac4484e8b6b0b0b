"""Seconds per image of each method on a 336x448 image with a full-size random ViT-B/16, split by stage.

One command runs every method/protocol of the issue-7 reference table, SC-CLIP, SFP and PEARL, the ResCLIP and FLOSS
plug-ins (FLOSS with stand-in rankings: which templates it uses does not change its cost), and the methods with
a helper model (ProxyCLIP, CorrCLIP, CASS, with a full-size random DINO ViT-B/8) (ITACLIP at stride 28 takes minutes
per image on a CPU; ``--methods`` picks a subset), and prints (and with ``--out`` writes) a Markdown table: total
seconds per image (median of ``--repeats`` after a warm-up) split into the CLIP ViT, the DINO ViT, the method's own
arithmetic between them ("recipe": proxy attention, region merging and scope, spectral matching and SVD, text prior),
PAMR and other work (preprocessing, region masks, upsampling, softmax/thresholds, PEARL's propagation), ViT forward
passes per image, and images per second. Text embeddings are timed once with an empty cache (their own row) and come
from the cache in the per-image runs.

Trident gets a full-size random DINO ViT-B/16 and SAM ViT-B (with its prompt encoder and mask decoder); its SAM
column is the SAM branch (encoder, last-block attention, guidance matrix) plus the refinement when on. ``--masks``
also times SAM ViT-B automatic mask generation (CorrCLIP's settings: 16x16 points) on the image.

    python bench/bench_methods.py [--device cuda] [--precision bf16] [--repeats 3] [--methods sclip,naclip] [--masks]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch

from vocabseg import Segmenter
from vocabseg.models.openclip import from_open_clip
from vocabseg.pipeline import timing

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
    ("SC-CLIP, crop 224 / stride 112", "scclip", None, dict(crop=224, stride=112), None),
    ("SFP, crop 224 / stride 112", "sfp", None, dict(crop=224, stride=112), None),
    ("PEARL, whole image + TLP (VOC21 protocol)", "pearl", None, dict(crop=0), None),
    ("PEARL, crop 224 / stride 112 + TLP", "pearl", None, dict(crop=224, stride=112), None),
    ("PEARL, crop 224 / stride 112, no TLP", "pearl", None, dict(crop=224, stride=112, propagation=False), None),
    ("ProxyCLIP, voc21 preset (crop 336 / stride 112), DINO ViT-B/8", "proxyclip", "voc21", {}, None),
    ("CorrCLIP, voc21 preset (crop 336 / stride 112), DINO ViT-B/8, SLIC masks", "corrclip", "voc21",
     dict(masks="slic:64"), None),
    ("CASS, voc21 preset (whole image), DINO ViT-B/8", "cass", "voc21", {}, None),
    ("CASS, pc59 preset (crop 224 / stride 112), DINO ViT-B/8", "cass", "pc59", {}, None),
    ("Trident, voc21 preset (448, crop 336 / stride 224), DINO ViT-B/16, SAM ViT-B", "trident", "voc21", {}, None),
    ("Trident, voc21 preset + SAM refinement", "trident", "voc21-refined", {}, None),
    ("ResCLIP on NACLIP, whole image (voc21 preset)", "naclip+resclip", "voc21", {}, None),
    ("ResCLIP on NACLIP, crop 224 / stride 112 (pc59 preset)", "naclip+resclip", "pc59", {}, None),
    ("ResCLIP on ClearCLIP, crop 224 / stride 112 (pc59 preset)", "clearclip+resclip", "pc59", {}, None),
    ("ResCLIP on SCLIP, crop 224 / stride 112 (pc59 preset)", "sclip+resclip", "pc59", {}, None),
    ("FLOSS on NACLIP, whole image (voc20 protocol), 46 experts", "naclip+floss", "voc20", {}, None),
    ("FLOSS on NACLIP, crop 224 / stride 112 (pc59 protocol), 46 experts", "naclip+floss", "pc59", {}, None),
    ("FLOSS on SCLIP, crop 224 / stride 112, 46 experts", "sclip+floss", "pc59", {}, None),
]
#: Methods that run a DINO helper model (given a full-size random DINO ViT-B/8).
DINO_METHODS = ("proxyclip", "corrclip", "cass")
#: Methods that run DINO ViT-B/16 and SAM ViT-B (given full-size random ones).
SAM_METHODS = ("trident",)
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


def _helper_checkpoints(folder: str) -> dict[str, str]:
    """Random full-size DINO ViT-B/16 and SAM ViT-B (with prompt encoder and mask decoder) checkpoint files."""
    from vocabseg.models import dino, sam

    torch.manual_seed(0)
    paths = {"dino": f"{folder}/dino_vitb16_random.pt", "sam": f"{folder}/sam_vit_b_random.pt"}
    torch.save(dino.build_model(dino.DinoConfig(patch_size=16, embed_dim=768, depth=12, native_grid=14,
                                                mlp_hidden=3072)).state_dict(), paths["dino"])
    torch.save(sam.build_model(sam.SamConfig(embed_dim=768, depth=12, num_heads=12,
                                             global_attn_indexes=(2, 5, 8, 11), window_size=14)).state_dict(),
               paths["sam"])
    return paths


def _profile(segmenter, image, spec, maps) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        segmenter.segment(image, spec, maps=maps)
        timing._sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60)


def _arguments() -> argparse.Namespace:
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
    parser.add_argument("--masks", action="store_true", help="also time SAM ViT-B automatic mask generation")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators of one image per row")
    return parser.parse_args()


def _dino_checkpoint(folder: str) -> str:
    """A random full-size DINO ViT-B/8 checkpoint file."""
    from vocabseg.models.dino import DinoConfig, build_model

    torch.manual_seed(0)
    path = f"{folder}/dino_vitb8_random.pt"
    torch.save(build_model(DinoConfig(patch_size=8, embed_dim=768, depth=12, native_grid=28, mlp_hidden=3072))
               .state_dict(), path)
    return path


def _models(method: str, clip, folder: str, made: dict) -> dict:
    """The models of ``method``: the shared random CLIP, and random full-size helper models where it has roles."""
    models = {"clip": clip}
    if method in DINO_METHODS:
        made.setdefault("dino8", _dino_checkpoint(folder))
        models["dino"] = made["dino8"]
    if method in SAM_METHODS:
        made.setdefault("helpers", _helper_checkpoints(folder))
        models.update(made["helpers"])
    return models


def _row(label: str, segmenter, image, spec, args, official) -> str:
    total, stages = _timed_segment(segmenter, image, spec, args.repeats, args.maps)
    vit, pamr = stages.get("vit", 0.0), stages.get("pamr", 0.0)
    helper, recipe = stages.get("dino", 0.0), stages.get("recipe", 0.0)
    sam = stages.get("sam", 0.0) + stages.get("sam_refinement", 0.0)
    passes = segmenter.method.forward_passes(*image.shape[:2], segmenter.protocol)
    official = official if official is not None else ""
    row = (f"| {label} | {total:.2f} | {vit - helper - recipe:.2f} | {helper:.2f} | {sam:.2f} | {recipe:.2f} "
           f"| {pamr:.2f} | {total - vit - pamr - sam:.2f} | {passes} | {1 / total:.2f} | {official} |")
    if args.stages:
        outside = total - sum(stages.values())
        row += ("\n    ms: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in stages.items())
                + f", outside stages {outside * 1000:.1f}")
    return row


def _masks_row(args, folder: str, made: dict, image) -> str:
    from vocabseg.models.masks import MaskGenerator

    made.setdefault("helpers", _helper_checkpoints(folder))
    generator = MaskGenerator("sam", made["helpers"]["sam"], args.device, cache=False, precision=args.precision)
    generator.compute(image)  # warm-up
    start = time.perf_counter()
    count = len(generator.compute(image))
    return (f"| SAM ViT-B automatic masks, 16x16 points (CorrCLIP's settings), {count} masks | "
            f"{time.perf_counter() - start:.2f} | | | | | | | | | 1.26 (SAM 2, 32x32, GPU) |")


def main() -> None:
    args = _arguments()
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval().to(args.device)
    clip = from_open_clip(model, name="ViT-B-16 (random)")
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
    wanted = set(args.methods.split(",")) if args.methods else None
    text_segmenter = Segmenter("sclip", models={"clip": clip}, text_cache=cache)
    spec = text_segmenter.class_spec(VOC_CLASSES)
    start = time.perf_counter()
    text_segmenter.classifier(spec)
    text_seconds = time.perf_counter() - start
    lines += [
        "| method and protocol | s/image | CLIP ViT | DINO ViT | SAM | recipe | PAMR | other | ViT passes "
        "| images/s | official s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| text classifier, {len(spec.queries)} names x 80 templates (empty cache) | {text_seconds:.2f} "
        f"| | | | | | | | | 116.4 (21 x 80) |",
    ]
    print("\n".join(lines), flush=True)
    made: dict = {}
    for label, method, preset, overrides, official in CASES:
        if wanted and method not in wanted:
            continue
        if method.endswith("+floss"):
            overrides = {**overrides, "rankings": _stand_in_rankings(spec.labels)}
        segmenter = Segmenter(method, models=_models(method, clip, cache, made), preset=preset, text_cache=cache,
                              precision=args.precision, **overrides)
        lines.append(_row(label, segmenter, image, spec, args, official))
        print(lines[-1], flush=True)
        if args.profile:
            print(_profile(segmenter, image, spec, args.maps), flush=True)
    if args.masks:
        lines.append(_masks_row(args, cache, made, image))
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
