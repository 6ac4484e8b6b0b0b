"""FLOSS's command: ``vocabseg floss-rank``, its ranking stage over unlabelled images (parsing and output only)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vocabseg.methods.commands import Command

log = logging.getLogger("vocabseg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="unlabelled images of the target domain: files or folders")
    parser.add_argument("--out", required=True, help="rankings file to write (.json)")
    parser.add_argument("--dataset",
                        help="rank the classes of a benchmark (its FLOSS preset when it has one), e.g. voc20")
    parser.add_argument("--classes", help="comma-separated classes; '|' separates synonyms")
    parser.add_argument("--classes-file", help="one class per line, synonyms separated by ', '")
    parser.add_argument("--background",
                        help="background names separated by '|' (default: no background, as FLOSS)")
    parser.add_argument("--name", help="dataset name recorded in the file (default: --dataset or 'custom')")
    parser.add_argument("--queries-per-pass", type=int, default=256,
                        help="text queries (templates x names) sharing one pass; lower it to save memory "
                             "(default 256)")
    parser.add_argument("--max-images", type=int, help="use only the first N images")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.set_defaults(method="naclip")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vocabseg.errors import UsageError
    from vocabseg.methods.floss.rankings import rank_templates

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    if sum(bool(x) for x in (args.dataset, args.classes, args.classes_file)) != 1:
        raise UsageError("give exactly one of --dataset, --classes and --classes-file")
    files = images(args)
    segmenter = floss_segmenter(args)
    spec = class_spec(args, segmenter)
    base = segmenter.method.base
    log.info("ranking 80 templates for %d classes with %s on %d image(s)", spec.num_classes, base.name, len(files))
    with tqdm(total=len(files), desc="floss-rank", unit="img", disable=None) as bar:
        rankings = rank_templates(base, segmenter.models, files, spec, segmenter.protocol, segmenter.text_cache,
                                  args.queries_per_pass, model=base.name, dataset=args.name or args.dataset or "custom",
                                  progress=lambda done: bar.update(1))
    rankings.save(out)
    log.info("wrote the template rankings of %d classes to %s", spec.num_classes, out)
    return 0


def images(args: argparse.Namespace) -> list[Path]:
    """The images to rank on (missing ones are logged; none at all is an error)."""
    from vocabseg.errors import UsageError
    from vocabseg.io.files import collect_images

    files, missing = collect_images(args.images)
    for item in missing:
        log.error("%s: no such file or folder", item)
    files = files[:args.max_images] if args.max_images else files
    if not files:
        raise UsageError("no images to rank the templates on")
    return files


def floss_segmenter(args: argparse.Namespace):
    """``<method>+floss`` without rankings, under ``--preset`` (default: the FLOSS preset of ``--dataset``)."""
    from vocabseg.methods import registry

    method = args.method if args.method.endswith("floss") else f"{args.method}+floss"
    options = [(key, value) for key, value in args.option if key != "rankings"]
    preset = args.preset
    if args.dataset and preset is None and args.dataset in registry.method_class(method).presets:
        preset = args.dataset
    return args.build_segmenter(argparse.Namespace(**{**vars(args), "method": method, "option": options,
                                                      "preset": preset}), rankings=None)


def class_spec(args: argparse.Namespace, segmenter):
    """The classes to rank: the benchmark's (as the preset names them), or the given ones."""
    from vocabseg.methods.base import Preset
    from vocabseg.text.classes import parse_classes, read_classes_file

    if args.dataset:
        return (segmenter.preset or Preset(segmenter.protocol, args.dataset)).class_spec()
    classes = read_classes_file(args.classes_file) if args.classes_file else args.classes
    return parse_classes(classes, args.background or False)


COMMANDS = (
    Command("floss-rank", "rank the 80 prompt templates per class for FLOSS (needs unlabelled images of the target "
                          "domain)", add_arguments, run, segmenter_arguments=True,
            description="FLOSS's ranking stage. It needs unlabelled images of the target domain (e.g. a benchmark's "
                        "training split, or photos like the ones you will segment); no labels are read. For each of "
                        "the 80 ImageNet templates it segments every image with a classifier built from that "
                        "template alone, under --method (the base FLOSS will run on: naclip, sclip+..., "
                        "naclip+resclip) and the protocol of --preset (FLOSS's, e.g. voc20), and ranks the templates "
                        "of each class by the mean entropy of the pixels assigned to the class. Writes the official "
                        "JSON format; use it with `--method <base>+floss --option rankings=FILE`. Costs 80 "
                        "classifiers per image: on a CPU, rank on a few hundred images at most."),
)
