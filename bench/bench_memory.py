"""Peak memory (RSS) and seconds of ``vocabseg segment`` work on photos of 1 to 50 megapixels with 1, 20 and 150
class names (plus the 26 default background words), labels only (what the CLI, eval and demo ask for).

Each case runs in a fresh process (peak RSS is per process) through the public API on a tiny random CLIP, so the
figures are the pipeline's own memory (a full ViT-B/16 adds about 0.6 GB of weights). ``--src`` runs another
checkout's code (e.g. a worktree of an older commit) for before/after tables.

    python bench/bench_memory.py [--megapixels 1,4,12,50] [--names 1,20,150] [--src PATH] [--skip-above-gb 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: Bytes per pixel per query name of full-resolution float maps: the growth this benchmark watches.
_FULL_MAPS_BYTES = 12


def one_case(megapixels: float, names: int, weights: str) -> dict:
    import resource
    import time

    import numpy as np
    import torch

    from vocabseg import Segmenter

    torch.set_num_threads(2)
    side = int((megapixels * 1e6 / 12) ** 0.5)
    height, width = 3 * side, 4 * side
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
    image = np.ascontiguousarray(np.kron(small, np.ones((64, 64, 1), dtype=np.uint8))[:height, :width])
    classes = [f"thing number {i}" for i in range(names)]
    seg = Segmenter("sclip", weights=weights, device="cpu", text_cache=False)
    seg.segment(image[:64, :64], classes=classes, maps=False)  # text classifier and model warm
    start = time.perf_counter()
    out = seg.segment(image, classes=classes, maps=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"megapixels": megapixels, "names": names, "peak_gb": round(peak, 2), "seconds": round(seconds, 1),
            "labels": list(out.labels.shape)}


def tiny_weights(folder: Path) -> str:
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=dict(image_size=64, layers=3, width=64, patch_size=16, head_width=64),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    path = folder / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", default="1,4,12,50")
    parser.add_argument("--names", default="1,20,150")
    parser.add_argument("--src", help="the src folder of the checkout to measure (default: this one)")
    parser.add_argument("--skip-above-gb", type=float, default=20.0,
                        help="skip cases whose full-resolution maps alone would need more than this")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_case(float(args.one[0]), int(args.one[1]), args.one[2])))
        return
    src = Path(args.src or Path(__file__).resolve().parents[1] / "src").resolve()
    env = {**os.environ, "PYTHONPATH": str(src)}
    with tempfile.TemporaryDirectory() as folder:
        weights = tiny_weights(Path(folder))
        print(f"code: {src}\n\n| megapixels | names | peak RSS (GB) | seconds |\n|---|---|---|---|")
        for megapixels in [float(m) for m in args.megapixels.split(",")]:
            for names in [int(n) for n in args.names.split(",")]:
                needed = _FULL_MAPS_BYTES * megapixels * 1e6 * (names + 26) / 2**30
                if needed > args.skip_above_gb:
                    print(f"| {megapixels:g} | {names} | not run (maps alone ~{needed:.0f} GB) | |", flush=True)
                    continue
                done = subprocess.run([sys.executable, __file__, "--one", str(megapixels), str(names), weights],
                                      env=env, capture_output=True, text=True)
                if done.returncode:
                    print(f"| {megapixels:g} | {names} | failed: {done.stderr.strip().splitlines()[-1:]} | |")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"| {megapixels:g} | {names} | {row['peak_gb']} | {row['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
