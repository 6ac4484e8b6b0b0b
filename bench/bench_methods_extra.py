"""Per-image time of ITACLIP (strides 28, 56, 112) and CLIPtrase (224, 336) with a full-size ViT-B/16.

The model is a randomly initialised ``ViT-B-16-quickgelu`` built by open_clip (the OpenAI architecture; timing does
not depend on the weights). The image is a random 336 x 448 uint8 image (VOC-like; the short side is already 336).
Text embeddings are random unit vectors built once, outside the timing (the text tower is cached in real use), for
the class lists of the VOC21 presets. Each timed run is the full ``predict`` of the method: resize, windows, every
ViT pass, merging, PAMR / clustering and post-processing.

Usage: ``python bench/bench_methods_extra.py [--threads 2] [--device cpu] [--repeats 3] [--once-stride 28]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import torch.nn.functional as F


def random_classifier(spec, dim: int, device):
    from vocabseg.engine.text import TextClassifier

    generator = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(len(spec.queries), dim, generator=generator), dim=-1).to(device)
    query_class = torch.tensor(spec.query_class, dtype=torch.long, device=device)
    return TextClassifier(spec=spec, embeddings=embeddings, query_class=query_class)


def time_predict(method, backbone, image, classifier, protocol, repeats: int, warmup: bool) -> list[float]:
    if warmup:
        method.predict(backbone, image, classifier, protocol)
    times = []
    for _ in range(repeats):
        if image.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        method.predict(backbone, image, classifier, protocol)
        if image.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--once-stride", type=int, action="append", default=[],
                        help="ITACLIP strides timed only once, without warm-up (slow on CPU)")
    parser.add_argument("--strides", default="28,56,112")
    parser.add_argument("--sizes", default="224,336")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import open_clip

    from vocabseg.backbones.clip import CLIPBackbone
    from vocabseg.methods import create_method
    from vocabseg.methods.itaclip import ITACLIP

    device = torch.device(args.device)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).to(device).eval()
    backbone = CLIPBackbone(model, name="ViT-B-16-quickgelu (random init)")
    image = torch.randint(0, 256, (336, 448, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = image.to(device)
    height, width = image.shape[:2]

    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, python {platform.python_version()}")
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"))
    print(f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})")
    print(f"model {backbone.name}: {backbone.num_blocks} blocks, width {backbone.width}, heads {backbone.num_heads}, "
          f"patch {backbone.patch_size}, embed {backbone.embed_dim}")
    print(f"image {height}x{width} (random uint8); text embeddings random, built outside the timing")
    print(f"load average at start {_load()} (other processes on the machine inflate the times)")
    print()
    print(f"{'method':10s} {'config':34s} {'queries':>7s} {'ViT passes':>10s} {'s/image':>9s} {'runs':>5s}  "
          f"{'s/ViT pass':>10s}", flush=True)

    def report(method_name, config, queries, passes, times):
        seconds = statistics.median(times)
        print(f"{method_name:10s} {config:34s} {queries:7d} {passes:10d} {seconds:9.3f} {len(times):5d}  "
              f"{seconds / passes:10.4f}", flush=True)

    torch.set_grad_enabled(False)
    preset = ITACLIP.presets["voc21"]
    spec = preset.class_spec()
    classifier = random_classifier(spec, backbone.embed_dim, device)
    for stride in [int(s) for s in args.strides.split(",") if s]:
        method = create_method("itaclip", **preset.options)
        protocol = preset.protocol.replace(stride=stride)
        once = stride in args.once_stride
        times = time_predict(method, backbone, image, classifier, protocol, 1 if once else args.repeats,
                             warmup=not once)
        passes = method.vit_passes(height, width, protocol)
        report("itaclip", f"voc21 preset, crop 224 stride {stride}", len(spec.queries), passes, times)

    for size in [int(s) for s in args.sizes.split(",") if s]:
        name = f"voc21-{size}"
        preset = create_method("cliptrase").presets[name]
        method = create_method("cliptrase", **preset.options)
        spec = preset.class_spec()
        classifier = random_classifier(spec, backbone.embed_dim, device)
        times = time_predict(method, backbone, image, classifier, preset.protocol, args.repeats, warmup=True)
        passes = method.vit_passes(height, width, preset.protocol)
        report("cliptrase", f"{name} preset (paper protocol)", len(spec.queries), passes, times)
        method = create_method("cliptrase", **{**preset.options, "center_crop": False})
        times = time_predict(method, backbone, image, classifier, preset.protocol, args.repeats, warmup=True)
        report("cliptrase", f"short side {size}, whole image", len(spec.queries), passes, times)
    print(f"load average at end {_load()}")
    return 0


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
