"""MAFT's command-line commands: ``vocabseg train maft`` (mask-aware fine-tuning of IP-CLIP) and ``vocabseg convert
maft-checkpoint`` (a released checkpoint -> CLIP weights). Only the standard library is imported here."""

from __future__ import annotations

import argparse
import logging

from vocabseg.methods.commands import Command

log = logging.getLogger(__name__)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``train maft``'s own arguments: the data, the output folder, resuming, and one flag per
    :class:`~vocabseg.methods.maft.train.TrainConfig` field (``--batch-size``, ``--no-augment``, ...)."""
    from vocabseg.config import add_field_flags
    from vocabseg.methods.maft.train_config import TrainConfig

    parser.add_argument("--dataset", default="coco-stuff", choices=["coco-stuff"])
    parser.add_argument("--split", default="zs156", choices=["zs156", "all"], help="zs156: seen classes only")
    parser.add_argument("--data-root", required=True, help="COCO-Stuff root folder")
    parser.add_argument("--proposals", help="folder of per-image proposal files (<stem>.npz|png); "
                                            "default: perturbed ground truth")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--paper", action="store_true", help="the paper's λ_dis = 1 and weight decay 1e-5")
    parser.add_argument("--stop-at", type=int, help="stop after this iteration (checkpointed); continue with --resume")
    add_field_flags(parser.add_argument_group("training recipe (default: the released code's)"), TrainConfig)


def run_train(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from vocabseg.config import field_flag_values
    from vocabseg.distributed import distributed_device, teardown
    from vocabseg.errors import UsageError
    from vocabseg.methods.maft.train import Trainer, coco_stuff_train
    from vocabseg.methods.maft.train_config import TrainConfig
    from vocabseg.models.factory import resolve_device
    from vocabseg.models.openclip import load_clip
    from vocabseg.text.classifier import TextCache

    cfg = TrainConfig().paper() if args.paper else TrainConfig()
    cfg = dataclasses.replace(cfg, **field_flag_values(args, TrainConfig))
    checkpoint = Path(args.out) / "last.pt"
    if args.resume and not checkpoint.exists():
        raise UsageError(f"--resume: no checkpoint at {checkpoint}")
    dataset, names = coco_stuff_train(args.data_root, args.split, args.proposals)
    # load_clip, not the factory's shared models: the weights are trained in place
    clip = load_clip(args.weights, args.arch, resolve_device(distributed_device(args.device)))
    trainer = Trainer(clip, dataset, names, cfg, args.out, TextCache())
    try:
        if args.resume:
            trainer.load_checkpoint(checkpoint)
            log.info("resumed at iteration %d", trainer.iteration)
        trainer.train(args.stop_at)
    finally:
        teardown(trainer.dist)
    if trainer.dist.is_main:
        weights = Path(args.out) / "maft-clip.safetensors"
        if trainer.iteration >= cfg.iterations:
            log.info("checkpoint %s; weights %s (segment with: --method maft --weights %s)", checkpoint, weights,
                     weights)
        else:
            log.info("checkpoint %s; continue with --resume", checkpoint)
    return 0


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="e.g. MAFT_Vitb.pt")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--clip", help="base CLIP weights for the text tower, when the checkpoint lacks it")


def run_convert(args: argparse.Namespace) -> int:
    from vocabseg.methods.maft.convert import convert_file

    convert_file(args.checkpoint, args.out, args.clip)
    return 0


COMMANDS = (
    Command("maft", "mask-aware fine-tuning of IP-CLIP (MAFT)", add_train_arguments, run_train, group="train",
            description="Fine-tunes CLIP's attention layers with the mask-aware and self-distillation losses. Writes "
                        "OUT/last.pt (resumable) and OUT/maft-clip.safetensors (use with --method maft --weights). "
                        "Under torchrun the batch is split over the processes.",
            model_arguments=True),
    Command("maft-checkpoint", "released MAFT checkpoint -> CLIP weights for --method maft", add_convert_arguments,
            run_convert, group="convert"),
)
