"""Text-classifier cost: vocabseg's truncated, length-sorted, batched text forward against the official pattern.

The official repositories encode each class's 80 prompts as one batch at the full 77-token context. vocabseg runs
the text tower only up to the longest prompt of each batch (identical results: the causal mask makes later tokens
irrelevant) over length-sorted batches. Prints CPU seconds (process time, robust to a busy machine) and wall seconds
for both, the largest difference between their embeddings, and a second (cached) run.

    python bench/bench_text.py [--classes 21] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from vocabseg.models.openclip import OpenCLIPText
from vocabseg.text.classifier import TextCache, embed_names
from vocabseg.text.templates import IMAGENET_TEMPLATES

VOC = ["background", "aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table",
       "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


@torch.inference_mode()
def official_pattern(text: OpenCLIPText, names: list[str]) -> torch.Tensor:
    model = text.model
    out = []
    for name in names:
        tokens = text.tokenizer([t.format(name) for t in IMAGENET_TEMPLATES]).to(text.device)
        features = F.normalize(model.encode_text(tokens), dim=-1)
        out.append(F.normalize(features.mean(0), dim=-1))
    return torch.stack(out)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda ... (on a GPU compare the wall seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval().to(args.device)
    text = OpenCLIPText(model)
    names = VOC[: args.classes]
    if text.device.type == "cuda":  # CUDA start-up and kernel selection stay out of the figures
        official_pattern(text, names[:1])
        embed_names(text, names[:1])
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, {len(names)} classes x "
          f"{len(IMAGENET_TEMPLATES)} templates, full-size random ViT-B/16 text tower")
    reference, wall_ref, cpu_ref = timed(lambda: official_pattern(text, names))
    cache = TextCache(tempfile.mkdtemp())
    ours, wall, cpu = timed(lambda: embed_names(text, names, cache=cache))
    _, wall_cached, _ = timed(lambda: embed_names(text, names, cache=cache))
    print(f"official pattern (full 77-token context, one batch per class): {wall_ref:.1f} s wall, {cpu_ref:.1f} s CPU")
    print(f"vocabseg (truncated, length-sorted batches):                   {wall:.1f} s wall, {cpu:.1f} s CPU "
          f"-> {cpu_ref / cpu:.1f}x less CPU")
    print(f"vocabseg second run (disk cache):                              {wall_cached:.3f} s wall")
    print(f"max |difference| of the embeddings: {(ours - reference).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
