"""How close each method's ViT pass is to the matrix-multiply bound on this machine.

Profiles one forward batch of 224x224 crops (as many as the harness puts in one pass: ``--crops`` or the automatic
window batch, divided among ITACLIP's five views) through each method's crop-to-logits step (full-size random
ViT-B/16) and prints the profiler's total self CPU time divided by the time inside the matrix products (addmm, mm,
bmm, baddbmm and the patch-embedding convolution): 1.00 would mean nothing but matrix products. Best of
``--repeats``.

    python bench/bench_vit_bound.py [--crops N] [--methods clip,sclip] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from vocabseg import Segmenter
from vocabseg.models.openclip import from_open_clip
from vocabseg.pipeline.windows import auto_window_batch

MATMUL = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution"}
METHODS = ["clip", "maskclip", "sclip", "clearclip", "naclip", "itaclip", "cliptrase", "ifseg-clip"]


def bound_ratio(method, models, crops: torch.Tensor, text: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(total / matrix-product self CPU time, total seconds) of the best of ``repeats`` profiled passes."""
    best = None
    with torch.inference_mode():
        method.crop_logits(models, crops, text)
        for _ in range(repeats):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                method.crop_logits(models, crops, text)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL)
            if best is None or total / matmul < best[0]:
                best = (total / matmul, total / 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, help="crops per pass (default: the harness's automatic choice)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import open_clip

    torch.manual_seed(0)
    clip = from_open_clip(open_clip.create_model("ViT-B-16-quickgelu", pretrained=None), name="ViT-B-16 (random)")
    text = F.normalize(torch.randn(26, clip.text.embed_dim), dim=-1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, 224x224 crops, random ViT-B/16\n\n"
          "| method | crops per pass | CPU seconds (profiled) | total / matrix products |\n|---|---|---|---|")
    for name in args.methods.split(","):
        segmenter = Segmenter(name, models={"clip": clip}, text_cache=False)  # its other models at their defaults
        method, models = segmenter.method, segmenter.models
        count = args.crops or auto_window_batch(clip.image, 224, method.views_per_crop)
        crops = torch.randn(count, 3, 224, 224)
        ratio, seconds = bound_ratio(method, models, crops, text, args.repeats)
        print(f"| {name} | {count} | {seconds:.2f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
