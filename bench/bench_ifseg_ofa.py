"""IFSeg on OFA-Base (random init, the real sizes): seconds per image and per training iteration.

Inference: a 480x640 photo (COCO's usual size) rescaled to 512x683 as the official pipeline does (32x43 tokens), the
171 COCO-Stuff words in the prompt (239 text tokens), one encoder-decoder pass, kNN smoothing (K=3, 25 iterations),
upsampling to 480x640; median of --repeats after a warm-up, with and without kNN, for each --precision.

Training: one iteration of the official recipe (artificial 32x32 maps, 512x512 CE, AdamW, clip) with a batch of
--train-batch maps (micro-batches of --micro-batch), timed after a warm-up step and scaled to the recipe's batch of
16 (the cost is linear in the batch); CPU training of 2000 such iterations is impractical, so the GPU figure is the
one to plan with.

    python bench/bench_ifseg_ofa.py [--repeats 3] [--train-batch 2] [--micro-batch 1] [--device cpu|cuda]
                                    [--precision fp32,bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch


def _timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall seconds and CPU seconds (all threads of this process) of ``fn`` after a warm-up call. On a
    shared machine the CPU seconds divided by the thread count estimate the wall time of an idle one."""
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=2, help="maps per timed training iteration")
    parser.add_argument("--micro-batch", type=int, default=1, help="maps per forward pass in training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="comma-separated: fp32,bf16,fp16 (default: fp32 on CPU, "
                                                          "fp32,bf16 on a GPU)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = (args.precision or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")

    from vocabseg.data.classes import CLASSES, query_names
    from vocabseg.methods.ifseg.knn import knn_smooth
    from vocabseg.methods.ifseg.ofa import grid_to_image, preprocess, segmentation_pass
    from vocabseg.methods.ifseg.ofa_train import OFATrainConfig
    from vocabseg.methods.ifseg.sampler import WordSet
    from vocabseg.models.ofa import OFA, OFA_SIZES
    from vocabseg.pipeline.windows import autocast

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {load[0]:.1f}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}")
    torch.manual_seed(0)
    model = OFA(OFA_SIZES["base"])
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.to(device).eval()
    print(f"OFA-Base (random init): {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")

    words = [n[0] for n in query_names("coco-stuff", "ifseg")]
    # The prompt's length without the tokenizer files: 12 prefix tokens, 239 for the 171 words (as the official
    # coco_fine171 prompt), BOS/EOS; the values of the ids do not change the cost.
    prompt = torch.randint(4, 50000, (12 + 226 + 1 + 2,), generator=torch.Generator().manual_seed(0))
    classes = torch.randn(len(CLASSES["coco-stuff"]), model.config.embed_dim, device=device) * 0.02
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))

    for precision in precisions:
        def segment(knn: bool, precision=precision):
            with torch.inference_mode(), autocast(precision, device):
                x = preprocess(image).to(device)
                seg = segmentation_pass(model, x, prompt, classes)
                probs = torch.softmax(seg.logits, -1)
                if knn:
                    probs = knn_smooth(probs, seg.features)
                return grid_to_image(probs, seg.grid, (480, 640)).argmax(1)

        for knn in (False, True):
            seconds, cpu = _timed(lambda knn=knn: segment(knn), args.repeats, device)
            print(f"inference {precision}, 480x640 -> 512x683 (32x43 tokens), 171 classes, "
                  f"kNN {'on' if knn else 'off'}: {seconds:.3f} s/image ({cpu:.1f} CPU s)")

    wordset = WordSet.build([(w,) for w in words])
    word_embeddings = torch.randn(len(words), model.config.embed_dim, device=device) * 0.02
    config = OFATrainConfig()
    for precision in precisions:
        seconds, cpu = _timed(_training_step(model, wordset, prompt, word_embeddings, classes, precision, args,
                                             device), 1, device)
        per_iteration = seconds * config.batch_size / args.train_batch
        print(f"training {precision}: {seconds:.1f} s ({cpu:.1f} CPU s) for {args.train_batch} maps (micro-batch "
              f"{args.micro_batch}) -> {per_iteration:.1f} s per iteration of 16 maps, "
              f"{per_iteration * config.iterations / 3600:.1f} h for the recipe's {config.iterations} iterations")


def _training_step(model, wordset, prompt, word_embeddings, classes, precision, args, device):
    """A closure running one training iteration of ``args.train_batch`` maps (new maps at each call)."""
    from vocabseg.methods.ifseg.ofa_train import OFATrainConfig, artificial_sample, freeze, imagefree_loss, sample_seed
    from vocabseg.pipeline.windows import autocast

    config = OFATrainConfig()
    model.train()
    trained = freeze(model)
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    calls = iter(range(10 ** 6))

    def iteration():
        first = next(calls) * args.train_batch
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, args.train_batch, args.micro_batch):
            indices = range(first + start, first + min(start + args.micro_batch, args.train_batch))
            samples = [artificial_sample(wordset, torch.Generator().manual_seed(sample_seed(0, i)),
                                         np.random.RandomState(sample_seed(0, i)), (32, 32), (512, 512))
                       for i in indices]
            maps = torch.stack([s[1] for s in samples]).to(device)
            targets = torch.stack([s[2] for s in samples]).to(device)
            with autocast(precision, device):
                loss, _ = imagefree_loss(model, prompt, word_embeddings, classes, maps, targets)
            (loss * len(samples) / args.train_batch).backward()
        torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
        optimizer.step()

    return iteration

if __name__ == "__main__":
    main()
