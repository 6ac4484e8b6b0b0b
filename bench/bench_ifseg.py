"""IFSeg (CLIP variant) costs with a full-size random ViT-B/16: training time for the 171 COCO-Stuff names and
seconds per image with and without kNN smoothing.

Training: the 171 names' prompt-ensembled text embeddings (80 templates; cached in real use), then --iterations
steps of the default training configuration, timed and extrapolated to the default iteration count. Inference:
the method's default protocol (short side 448, crop 448 / stride 224) on a 336x448 photo, the 171 classes, kNN on
(K=3, 25 iterations) and off; median of --repeats after a warm-up. A random head costs what a trained one does.

    python bench/bench_ifseg.py [--iterations 50] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=50, help="training steps to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["VOCABSEG_CACHE"] = tempfile.mkdtemp(prefix="bench-ifseg-")  # time the text tower, not a cache

    import open_clip
    import skimage.data

    from vocabseg import Segmenter
    from vocabseg.data.classes import CLASSES
    from vocabseg.methods.ifseg.train import TrainConfig, build_targets, new_head, train
    from vocabseg.models.ifseg_head import HeadConfig
    from vocabseg.models.openclip import from_open_clip
    from vocabseg.text.classes import parse_classes

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {load[0]:.1f}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    clip = from_open_clip(model, name="ViT-B-16 (random)")
    spec = parse_classes(list(CLASSES["coco-stuff"]), background=False)

    start = time.perf_counter()
    targets = build_targets(clip.text, spec.labels, spec.names)
    text_s = time.perf_counter() - start
    print(f"text embeddings, {len(spec.queries)} names x 80 templates: {text_s:.1f} s (once; cached afterwards)")

    default = TrainConfig()
    config = TrainConfig(iterations=args.iterations, save_every=args.iterations + 1)
    head_config = HeadConfig(clip.image.embed_dim)
    head = new_head(head_config, 0)
    params = sum(p.numel() for p in head.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(head, targets, config, os.path.join(tmp, "ifseg.pt"), progress=False)
        train_s = time.perf_counter() - start
    per_step = train_s / args.iterations
    total_min = per_step * default.iterations / 60
    print(f"training: head {params / 1e6:.2f} M parameters (width {head_config.width}, {head_config.layers} layers),"
          f" batch {config.batch_size}, grid {config.grid[0]}x{config.grid[1]}: {per_step:.3f} s/iteration over "
          f"{args.iterations}; the default {default.iterations} iterations take ~{total_min:.1f} min"
          f" (+ {text_s:.0f} s of text embeddings)")

    image = skimage.data.chelsea()[:, :448]  # 300x448
    for knn in (False, True):
        segmenter = Segmenter("ifseg-clip", models={"clip": clip}, knn=knn, text_cache=False)
        segmenter.classifier(spec)  # the text side is built before timing
        segmenter.segment(image, spec)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            segmenter.segment(image, spec)
            times.append(time.perf_counter() - start)
        protocol = segmenter.protocol
        print(f"inference, kNN {'on (K=3, 25 iterations)' if knn else 'off'}, {image.shape[0]}x{image.shape[1]} "
              f"image, short side {protocol.short_side}, crop {protocol.crop} / stride {protocol.stride}, "
              f"171 classes: {statistics.median(times):.2f} s/image")


if __name__ == "__main__":
    main()
