"""``vocabseg train ifseg`` (the paper's OFA model) and ``vocabseg train ifseg-clip`` (this library's CLIP-variant
head): image-free training from a class list alone (parsing and wiring only)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("vocabseg")


def _grid(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a grid like 16 or 16x24, got {text!r}")
    return parts[0], parts[1]


def add_train_parser(train_sub) -> None:
    """Add ``ifseg-clip`` to the ``vocabseg train`` sub-commands."""
    from vocabseg.methods.ifseg.protocols import PROTOCOLS

    p = train_sub.add_parser(
        "ifseg-clip", help="train this library's CLIP-variant IFSeg head on artificial word maps (no images)",
        description="Trains the image-free head of the CLIP variant from category words alone and writes one "
                    "checkpoint file (use it with `--method ifseg-clip --checkpoint CKPT`). The text embeddings come "
                    "from the CLIP text tower of --weights; no image is read. The paper's OFA model trains with "
                    "`vocabseg train ifseg`.")
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes-file", help="one class per line, synonyms separated by ', '")
    classes.add_argument("--protocol", choices=sorted(PROTOCOLS),
                         help="the training classes (and hierarchy) of a paper protocol")
    p.add_argument("--hierarchy", help="'class: word, word' per line, or 'coco-stuff' (27 coarse classes)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run saved in --out")
    p.add_argument("--weights", default="openai", help="open_clip pretrained tag or a local checkpoint file")
    p.add_argument("--arch", help="open_clip architecture (default: ViT-B-16)")
    p.add_argument("--device", help="cpu, cuda ... (default: cpu; the head is small)")
    p.add_argument("--no-text-cache", action="store_true", help="do not read or write cached text embeddings")
    from vocabseg.methods.ifseg.head import HeadConfig
    from vocabseg.methods.ifseg.train import TrainConfig

    t, h = TrainConfig(), HeadConfig(embed_dim=0)
    opt = p.add_argument_group("training")
    opt.add_argument("--iterations", type=int, default=t.iterations)
    opt.add_argument("--batch-size", type=int, default=t.batch_size)
    opt.add_argument("--lr", type=float, default=t.lr)
    opt.add_argument("--weight-decay", type=float, default=t.weight_decay)
    opt.add_argument("--noise-var", type=float, default=t.noise_var, help="variance of the token noise")
    opt.add_argument("--max-cells", type=int, default=t.max_cells, help="S: grid sizes U, V drawn from 1..S")
    opt.add_argument("--grid", type=_grid, default=t.grid, help="token grid of the artificial maps, e.g. 16x16")
    opt.add_argument("--temperature", type=float, default=t.temperature, help="logit scale of the loss")
    opt.add_argument("--seed", type=int, default=t.seed)
    opt.add_argument("--save-every", type=int, default=t.save_every, help="checkpoint every N iterations")
    head = p.add_argument_group("head")
    head.add_argument("--recipe", default=h.recipe, help="training-free method giving the dense features")
    head.add_argument("--width", type=int, default=h.width)
    head.add_argument("--layers", type=int, default=h.layers)
    head.add_argument("--heads", type=int, default=h.heads)
    head.add_argument("--no-centering", action="store_true", help="feed the head uncentred features")
    p.set_defaults(func=cmd_train_ifseg)


def cmd_train_ifseg(args: argparse.Namespace) -> int:
    from vocabseg.methods.base import create_method
    from vocabseg.methods.ifseg.head import HeadConfig
    from vocabseg.methods.ifseg.protocols import PROTOCOLS
    from vocabseg.methods.ifseg.sampler import read_hierarchy
    from vocabseg.methods.ifseg.train import TrainConfig, build_targets, load_checkpoint, new_head, train
    from vocabseg.models.factory import load_clip
    from vocabseg.models.openclip import CLIPBackbone
    from vocabseg.text.classifier import TextCache, parse_classes, read_classes_file

    out = Path(args.out)
    if out.exists() and not args.resume:
        raise ValueError(f"{out} exists; pass --resume to continue that run or choose another --out")
    if args.resume and not out.exists():
        raise ValueError(f"--resume: {out} does not exist yet; drop --resume to start a new run")
    create_method(args.recipe)
    if args.recipe in ("ifseg", "ifseg-clip"):
        raise ValueError(f"--recipe must be a training-free method such as clearclip (got {args.recipe!r})")
    protocol = PROTOCOLS[args.protocol] if args.protocol else None
    classes = list(protocol.train_classes) if protocol else read_classes_file(args.classes_file)
    spec = parse_classes(classes, background=False)
    hierarchy_source = args.hierarchy or (protocol.hierarchy if protocol else None)
    hierarchy = read_hierarchy(hierarchy_source) if hierarchy_source else None

    model, info = load_clip(args.weights, args.arch, args.device or "cpu")
    backbone = CLIPBackbone(model, name=info.arch, source=info.source)
    cache = None if args.no_text_cache else TextCache()
    targets = build_targets(backbone, spec.labels, spec.names, hierarchy, cache)
    config = TrainConfig(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, noise_var=args.noise_var, max_cells=args.max_cells,
                         grid=args.grid, temperature=args.temperature, seed=args.seed, save_every=args.save_every)
    head_config = HeadConfig(embed_dim=backbone.embed_dim, width=args.width, layers=args.layers, heads=args.heads,
                             centering=not args.no_centering, recipe=args.recipe)
    resume = load_checkpoint(out) if args.resume else None
    if resume is not None:
        stored = (TrainConfig.from_dict(resume["train_config"]), HeadConfig.from_dict(resume["head_config"]),
                  tuple(resume["classes"]), tuple(resume["words"]))
        if stored != (config, head_config, targets.labels, targets.words.words):
            raise ValueError(f"--resume: {out} was started with other classes or options; rerun the original "
                             f"command with --resume (stored: {stored[0]}, {stored[1]})")
    log.info("training on %d classes (%d words) without images: %d iterations of %d maps on a %dx%d grid",
             len(targets.labels), len(targets.words.words), config.iterations, config.batch_size, *config.grid)
    meta = {"weights": {"arch": info.arch, "source": info.source}, "text_fingerprint": backbone.text_fingerprint(),
            "names": [list(n) for n in spec.names], "protocol": args.protocol}
    losses = train(new_head(head_config, config.seed), targets, config, out, resume=resume, meta=meta)
    if losses:
        log.info("final loss %.4f (first %.4f); wrote %s", losses[-1], losses[0], out)
    return 0


def add_ofa_train_parser(train_sub) -> None:
    """Add ``ifseg`` (OFA, the paper's model) to the ``vocabseg train`` sub-commands."""
    from vocabseg.methods.ifseg.ofa_train import OFATrainConfig
    from vocabseg.methods.ifseg.protocols import OFA_PROTOCOLS

    p = train_sub.add_parser(
        "ifseg", help="train IFSeg (OFA) on artificial word maps, as the paper (no images)",
        description="Fine-tunes OFA on artificial maps made of category words, as IFSeg's official recipe (AdamW "
                    "5e-5, weight decay 0.1, cosine, clip 1.0, batch 16, 2000 iterations; ResNet, image_proj and "
                    "token embeddings frozen), and writes one checkpoint (use it with `--method ifseg --checkpoint "
                    "CKPT`). No image is read. Works under `torchrun --nproc-per-node N -m vocabseg train ifseg ...` "
                    "(the batch is split over the processes).")
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes-file", help="one class per line: its category word first, then other words "
                                                "(', '-separated) that only fill the artificial maps")
    classes.add_argument("--protocol", choices=sorted(OFA_PROTOCOLS),
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
    t = OFATrainConfig()
    opt = p.add_argument_group("training")
    opt.add_argument("--iterations", type=int, default=t.iterations)
    opt.add_argument("--batch-size", type=int, default=t.batch_size, help="global batch (all processes)")
    opt.add_argument("--micro-batch", type=int, default=t.micro_batch,
                     help="samples per forward pass on each process (gradient accumulation; 0: all at once)")
    opt.add_argument("--lr", type=float, default=t.lr)
    opt.add_argument("--weight-decay", type=float, default=t.weight_decay)
    opt.add_argument("--max-cells", type=int, default=t.max_cells, help="S: grid sizes U, V drawn from 1..S")
    opt.add_argument("--target-size", type=int, default=t.target_size, help="side of the upsampled loss target")
    opt.add_argument("--seed", type=int, default=t.seed)
    opt.add_argument("--save-every", type=int, default=t.save_every, help="checkpoint every N iterations")
    p.set_defaults(func=cmd_train_ifseg_ofa)


def cmd_train_ifseg_ofa(args: argparse.Namespace) -> int:
    import torch

    from vocabseg.eval.runner import distributed_device, init_distributed
    from vocabseg.methods.ifseg.ofa_train import ImageFreeTask, OFATrainConfig, load_ofa_checkpoint, train_ofa
    from vocabseg.methods.ifseg.protocols import OFA_PROTOCOLS
    from vocabseg.methods.ifseg.sampler import read_hierarchy
    from vocabseg.models.ofa import OFATokenizer, find_bpe_files, load_ofa
    from vocabseg.text.classifier import read_classes_file

    out = Path(args.out)
    if out.exists() and not args.resume:
        raise ValueError(f"{out} exists; pass --resume to continue that run or choose another --out")
    if args.resume and not out.exists():
        raise ValueError(f"--resume: {out} does not exist yet; drop --resume to start a new run")
    if args.protocol:
        protocol = OFA_PROTOCOLS[args.protocol]
        labels, names = list(protocol.labels), [(word,) for word in protocol.words]
    else:
        names = read_classes_file(args.classes_file)
        labels = [group[0] for group in names]
    hierarchy_source = args.hierarchy or (OFA_PROTOCOLS[args.protocol].hierarchy if args.protocol else None)
    hierarchy = read_hierarchy(hierarchy_source) if hierarchy_source else None

    device = distributed_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(device)
    loaded = load_ofa(args.weights, device, seed=args.seed)
    bpe_dir = find_bpe_files([p for p in (args.bpe_dir, Path(loaded.source).parent) if p])
    task = ImageFreeTask.build(OFATokenizer.from_folder(bpe_dir), labels, names, hierarchy)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    config = OFATrainConfig(iterations=args.iterations, batch_size=args.batch_size, micro_batch=args.micro_batch,
                            lr=args.lr, weight_decay=args.weight_decay, max_cells=args.max_cells,
                            target_size=args.target_size, seed=args.seed, save_every=args.save_every,
                            precision=precision)
    resume = load_ofa_checkpoint(out) if args.resume else None
    if resume is not None:
        stored = (OFATrainConfig(**resume["train_config"]), resume["labels"], resume["map_words"])
        if stored != (config, list(task.labels), list(task.words.words)):
            raise ValueError(f"--resume: {out} was started with other classes or options; rerun the original "
                             f"command with --resume (stored: {stored[0]})")
    log.info("training IFSeg (OFA, %s) on %d classes (%d words) without images: %d iterations of %d maps",
             loaded.model.config.embed_dim, len(task.labels), len(task.words.words), config.iterations,
             config.batch_size)
    meta = {"weights": loaded.source, "bpe_dir": str(bpe_dir), "protocol": args.protocol,
            "names": [list(n) for n in names]}
    losses = train_ofa(loaded.model, task, config, out, resume=resume, meta=meta)
    if losses:
        log.info("final loss %.4f (first %.4f); wrote %s", losses[-1], losses[0], out)
    if args.protocol:
        log.info("evaluate with: vocabseg eval --method ifseg --checkpoint %s --dataset %s --data-root DATA", out,
                 OFA_PROTOCOLS[args.protocol].eval_dataset)
    return 0
