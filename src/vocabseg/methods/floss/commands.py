"""``vocabseg floss-rank``: FLOSS's ranking stage over unlabelled images (parsing and output only)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("vocabseg")


def add_rank_parser(sub) -> None:
    """Add ``floss-rank`` to the ``vocabseg`` sub-commands."""
    from vocabseg.cli import add_model_arguments

    p = sub.add_parser(
        "floss-rank", help="rank the 80 prompt templates per class for FLOSS (needs unlabelled images of the target "
                           "domain)",
        description="FLOSS's ranking stage. It needs unlabelled images of the target domain (e.g. a benchmark's "
                    "training split, or photos like the ones you will segment); no labels are read. For each of the "
                    "80 ImageNet templates it segments every image with a classifier built from that template "
                    "alone, under --method (the base FLOSS will run on: naclip, sclip+..., naclip+resclip) and the "
                    "protocol of --preset (FLOSS's, e.g. voc20), and ranks the templates of each class by the mean "
                    "entropy of the pixels assigned to the class. Writes the official JSON format; use it with "
                    "`--method <base>+floss --option rankings=FILE`. Costs 80 classifiers per image: on a CPU, "
                    "rank on a few hundred images at most.")
    p.add_argument("images", nargs="+", help="unlabelled images of the target domain: files or folders")
    p.add_argument("--out", required=True, help="rankings file to write (.json)")
    p.add_argument("--dataset", help="rank the classes of a benchmark (its FLOSS preset when it has one), e.g. voc20")
    p.add_argument("--classes", help="comma-separated classes; '|' separates synonyms")
    p.add_argument("--classes-file", help="one class per line, synonyms separated by ', '")
    p.add_argument("--background", help="background names separated by '|' (default: no background, as FLOSS)")
    p.add_argument("--name", help="dataset name recorded in the file (default: --dataset or 'custom')")
    p.add_argument("--queries-per-pass", type=int, default=256,
                   help="text queries (templates x names) sharing one pass; lower it to save memory (default 256)")
    p.add_argument("--max-images", type=int, help="use only the first N images")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_model_arguments(p)
    p.set_defaults(method="naclip", func=cmd_floss_rank)


def cmd_floss_rank(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vocabseg.cli import build_segmenter, collect_images
    from vocabseg.methods.base import Preset
    from vocabseg.methods.floss.rankings import rank_templates
    from vocabseg.text.classifier import parse_classes, read_classes_file

    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"error: {out} exists; pass --force to overwrite it")
    if sum(bool(x) for x in (args.dataset, args.classes, args.classes_file)) != 1:
        raise SystemExit("error: give exactly one of --dataset, --classes and --classes-file")
    files, missing = collect_images(args.images)
    for item in missing:
        log.error("%s: no such file or folder", item)
    files = files[:args.max_images] if args.max_images else files
    if not files:
        raise SystemExit("error: no images to rank the templates on")
    if not args.method.endswith("floss"):
        args.method = f"{args.method}+floss"
    args.option = [(key, value) for key, value in args.option if key != "rankings"]
    if args.dataset and args.preset is None:
        from vocabseg.methods.base import METHODS, create_method

        create_method(args.method)
        args.preset = args.dataset if args.dataset in METHODS[args.method].presets else None
    segmenter = build_segmenter(args, rankings=None)
    if args.dataset:
        spec = (segmenter.preset or Preset(segmenter.protocol, args.dataset)).class_spec()
    else:
        classes = read_classes_file(args.classes_file) if args.classes_file else args.classes
        spec = parse_classes(classes, args.background or False)
    base = segmenter.method.base
    log.info("ranking 80 templates for %d classes with %s on %d image(s)", spec.num_classes, base.name, len(files))
    with tqdm(total=len(files), desc="floss-rank", unit="img", disable=None) as bar:
        rankings = rank_templates(base, segmenter.backbone, files, spec, segmenter.protocol, segmenter.text_cache,
                                  args.queries_per_pass, model=base.name, dataset=args.name or args.dataset or "custom",
                                  progress=lambda done: bar.update(1))
    rankings.save(out)
    log.info("wrote the template rankings of %d classes to %s", spec.num_classes, out)
    return 0

