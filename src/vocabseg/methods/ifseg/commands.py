"""IFSeg's commands: ``vocabseg train ifseg`` (the paper's OFA model) and ``vocabseg train ifseg-clip`` (this
library's CLIP-variant head), image-free training from a class list alone (parsing and wiring only), and the
``--checkpoint`` flag."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vocabseg.methods.commands import Command

log = logging.getLogger("vocabseg")

#: ``--checkpoint CKPT`` names the trained model of ifseg (its ``ofa`` model) or ifseg-clip (its ``ifseg_head``).
OPTION_FLAGS = {"--checkpoint": ("checkpoint", "the trained model of ifseg or ifseg-clip (from `vocabseg train`); the "
                                               "same as --model ofa=CKPT or --model ifseg_head=CKPT")}

#: IFSeg's official protocol names and the CLIP variant's (a literal copy: this module imports no package code at
#: import time; tests check them against :mod:`vocabseg.methods.ifseg.protocols`).
OFA_PROTOCOL_NAMES = ("ade150", "coco-stuff-unseen15", "coco-stuff171", "coco-stuff27")
CLIP_PROTOCOL_NAMES = ("coco-stuff-unseen15", "coco-stuff171", "coco-stuff27", "coco-to-ade150")


def _grid(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a grid like 16 or 16x24, got {text!r}")
    return parts[0], parts[1]


def given(args: argparse.Namespace, names: str) -> dict:
    """The options among ``names`` (space-separated) given on the command line; the others keep the defaults of the
    config dataclass they go to."""
    return {name: getattr(args, name) for name in names.split() if getattr(args, name) is not None}


def check_output(out: Path, resume: bool) -> None:
    """Refuse to overwrite a run without ``--resume``, and ``--resume`` without a run."""
    from vocabseg.errors import UsageError

    if out.exists() and not resume:
        raise UsageError(f"{out} exists; pass --resume to continue that run or choose another --out")
    if resume and not out.exists():
        raise UsageError(f"--resume: {out} does not exist yet; drop --resume to start a new run")


def check_same_run(out: Path, stored: tuple, current: tuple, shown: object) -> None:
    """A resumed run must have the classes and options it was started with."""
    from vocabseg.errors import UsageError

    if stored != current:
        raise UsageError(f"--resume: {out} was started with other classes or options; rerun the original command "
                         f"with --resume (stored: {shown})")


# --- train ifseg-clip ---------------------------------------------------------------------------------------------

def add_clip_arguments(p: argparse.ArgumentParser) -> None:
    """``vocabseg train ifseg-clip`` (after the shared --weights/--arch/--device)."""
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes-file", help="one class per line, synonyms separated by ', '")
    classes.add_argument("--protocol", choices=CLIP_PROTOCOL_NAMES,
                         help="the training classes (and hierarchy) of a paper protocol")
    p.add_argument("--hierarchy", help="'class: word, word' per line, or 'coco-stuff' (27 coarse classes)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run saved in --out")
    p.add_argument("--no-text-cache", action="store_true", help="do not read or write cached text embeddings")
    opt = p.add_argument_group("training (defaults: TrainConfig's)")
    opt.add_argument("--iterations", type=int)
    opt.add_argument("--batch-size", type=int)
    opt.add_argument("--lr", type=float)
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--noise-var", type=float, help="variance of the token noise")
    opt.add_argument("--max-cells", type=int, help="S: grid sizes U, V drawn from 1..S")
    opt.add_argument("--grid", type=_grid, help="token grid of the artificial maps, e.g. 16x16")
    opt.add_argument("--temperature", type=float, help="logit scale of the loss")
    opt.add_argument("--seed", type=int)
    opt.add_argument("--save-every", type=int, help="checkpoint every N iterations")
    head = p.add_argument_group("head")
    head.add_argument("--recipe", help="training-free method giving the dense features")
    head.add_argument("--width", type=int)
    head.add_argument("--layers", type=int)
    head.add_argument("--heads", type=int)
    head.add_argument("--no-centering", action="store_true", help="feed the head uncentred features")


def clip_training_classes(args: argparse.Namespace):
    """The class spec, hierarchy and protocol name of ``vocabseg train ifseg-clip``."""
    from vocabseg.methods.ifseg.protocols import PROTOCOLS
    from vocabseg.methods.ifseg.sampler import read_hierarchy
    from vocabseg.text.classes import parse_classes, read_classes_file

    protocol = PROTOCOLS[args.protocol] if args.protocol else None
    classes = list(protocol.train_classes) if protocol else read_classes_file(args.classes_file)
    hierarchy_source = args.hierarchy or (protocol.hierarchy if protocol else None)
    return parse_classes(classes, background=False), read_hierarchy(hierarchy_source) if hierarchy_source else None


def run_train_clip(args: argparse.Namespace) -> int:
    from vocabseg.errors import UsageError
    from vocabseg.methods import registry
    from vocabseg.methods.ifseg.train import TrainConfig, build_targets, new_head, train
    from vocabseg.models.factory import load_model
    from vocabseg.models.ifseg_head import HeadConfig, load_head_checkpoint
    from vocabseg.text.classifier import TextCache

    out = Path(args.out)
    check_output(out, args.resume)
    head_options = given(args, "recipe width layers heads")
    recipe = head_options.get("recipe", HeadConfig.recipe)
    registry.method_class(recipe)
    if recipe in ("ifseg", "ifseg-clip"):
        raise UsageError(f"--recipe must be a training-free method such as clearclip (got {recipe!r})")
    spec, hierarchy = clip_training_classes(args)
    clip = load_model("clip", args.weights, args.device or "cpu", args.arch)
    targets = build_targets(clip.text, spec.labels, spec.names, hierarchy, None if args.no_text_cache else TextCache())
    config = TrainConfig(**given(args, "iterations batch_size lr weight_decay noise_var max_cells grid temperature "
                                       "seed save_every"))
    head_config = HeadConfig(embed_dim=clip.image.embed_dim, centering=not args.no_centering, **head_options)
    resume = load_head_checkpoint(out) if args.resume else None
    if resume is not None:
        stored = (TrainConfig.from_dict(resume["train_config"]), HeadConfig.from_dict(resume["head_config"]),
                  tuple(resume["classes"]), tuple(resume["words"]))
        check_same_run(out, stored, (config, head_config, targets.labels, targets.words.words), stored[:2])
    log.info("training on %d classes (%d words) without images: %d iterations of %d maps on a %dx%d grid",
             len(targets.labels), len(targets.words.words), config.iterations, config.batch_size, *config.grid)
    meta = {"weights": {"arch": clip.name, "source": clip.source}, "text_fingerprint": clip.text.fingerprint(),
            "names": [list(n) for n in spec.names], "protocol": args.protocol}
    losses = train(new_head(head_config, config.seed), targets, config, out, resume=resume, meta=meta)
    if losses:
        log.info("final loss %.4f (first %.4f); wrote %s", losses[-1], losses[0], out)
    return 0


# --- train ifseg (OFA) --------------------------------------------------------------------------------------------

def add_ofa_arguments(p: argparse.ArgumentParser) -> None:
    """``vocabseg train ifseg``."""
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes-file", help="one class per line: its category word first, then other words "
                                                "(', '-separated) that only fill the artificial maps")
    classes.add_argument("--protocol", choices=OFA_PROTOCOL_NAMES,
                         help="the category words (and hierarchy) of an official run script or paper setting")
    p.add_argument("--hierarchy", help="'class: word, word' per line, or coco-stuff / ifseg-coco27 (built in)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run saved in --out")
    p.add_argument("--weights", default="ofa-base",
                   help="OFA weights: ofa_base.pt, a Hugging Face OFA folder/file, or a hub id (default: ofa-base)")
    p.add_argument("--bpe-dir", help="folder with OFA's BPE files (default: next to the weights, or the hub's)")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast of the forward (default auto: bf16 on a GPU, fp32 on a CPU)")
    opt = p.add_argument_group("training (defaults: the official recipe's)")
    opt.add_argument("--iterations", type=int)
    opt.add_argument("--batch-size", type=int, help="global batch (all processes)")
    opt.add_argument("--micro-batch", type=int,
                     help="samples per forward pass on each process (gradient accumulation; 0: all at once)")
    opt.add_argument("--lr", type=float)
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--max-cells", type=int, help="S: grid sizes U, V drawn from 1..S")
    opt.add_argument("--target-size", type=int, help="side of the upsampled loss target")
    opt.add_argument("--seed", type=int)
    opt.add_argument("--save-every", type=int, help="checkpoint every N iterations")


def ofa_training_classes(args: argparse.Namespace):
    """The labels, per-class words (category word first) and hierarchy of ``vocabseg train ifseg``."""
    from vocabseg.methods.ifseg.protocols import OFA_PROTOCOLS
    from vocabseg.methods.ifseg.sampler import read_hierarchy
    from vocabseg.text.classes import read_classes_file

    protocol = OFA_PROTOCOLS[args.protocol] if args.protocol else None
    if protocol:
        labels, names = list(protocol.labels), [(word,) for word in protocol.words]
    else:
        names = read_classes_file(args.classes_file)
        labels = [group[0] for group in names]
    hierarchy_source = args.hierarchy or (protocol.hierarchy if protocol else None)
    return labels, names, read_hierarchy(hierarchy_source) if hierarchy_source else None


def run_train_ofa(args: argparse.Namespace) -> int:
    import torch

    from vocabseg.distributed import distributed_device, init_distributed, teardown
    from vocabseg.methods.ifseg.ofa_train import (
        ImageFreeTask,
        OFATrainConfig,
        load_ofa_checkpoint,
        train_ofa,
    )
    from vocabseg.models.ofa import OFATokenizer, find_bpe_files, load_ofa

    out = Path(args.out)
    check_output(out, args.resume)
    labels, names, hierarchy = ofa_training_classes(args)
    device = distributed_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    dist_info = init_distributed(device)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    config = OFATrainConfig(**given(args, "iterations batch_size micro_batch lr weight_decay max_cells target_size "
                                          "seed save_every"), precision=precision)
    loaded = load_ofa(args.weights, device, seed=config.seed)
    bpe_dir = find_bpe_files([p for p in (args.bpe_dir, Path(loaded.source).parent) if p])
    task = ImageFreeTask.build(OFATokenizer.from_folder(bpe_dir), labels, names, hierarchy)
    resume = load_ofa_checkpoint(out) if args.resume else None
    if resume is not None:
        stored = (OFATrainConfig(**resume["train_config"]), resume["labels"], resume["map_words"])
        check_same_run(out, stored, (config, list(task.labels), list(task.words.words)), stored[0])
    log.info("training IFSeg (OFA, %s) on %d classes (%d words) without images: %d iterations of %d maps",
             loaded.name, len(task.labels), len(task.words.words), config.iterations, config.batch_size)
    meta = {"weights": loaded.source, "bpe_dir": str(bpe_dir), "protocol": args.protocol,
            "names": [list(n) for n in names]}
    try:
        losses = train_ofa(loaded.model, task, config, out, resume=resume, meta=meta)
    finally:
        teardown(dist_info)
    if losses:
        log.info("final loss %.4f (first %.4f); wrote %s", losses[-1], losses[0], out)
    if args.protocol:
        from vocabseg.methods.ifseg.protocols import OFA_PROTOCOLS

        log.info("evaluate with: vocabseg eval --method ifseg --model ofa=%s --dataset %s --data-root DATA", out,
                 OFA_PROTOCOLS[args.protocol].eval_dataset)
    return 0


COMMANDS = (
    Command("ifseg", "train IFSeg (OFA) on artificial word maps, as the paper (no images)", add_ofa_arguments,
            run_train_ofa, group="train",
            description="Fine-tunes OFA on artificial maps made of category words, as IFSeg's official recipe (AdamW "
                        "5e-5, weight decay 0.1, cosine, clip 1.0, batch 16, 2000 iterations; ResNet, image_proj and "
                        "token embeddings frozen), and writes one checkpoint (use it with `--method ifseg --model "
                        "ofa=CKPT`). No image is read. Works under `torchrun --nproc-per-node N -m vocabseg train "
                        "ifseg ...` (the batch is split over the processes)."),
    Command("ifseg-clip", "train this library's CLIP-variant IFSeg head on artificial word maps (no images)",
            add_clip_arguments, run_train_clip, group="train", model_arguments=True,
            description="Trains the image-free head of the CLIP variant from category words alone and writes one "
                        "checkpoint file (use it with `--method ifseg-clip --model ifseg_head=CKPT`). The text "
                        "embeddings come from the CLIP text tower of --weights (default openai ViT-B/16, on the CPU "
                        "unless --device says otherwise; the head is small); no image is read. The paper's OFA model "
                        "trains with `vocabseg train ifseg`."),
)
