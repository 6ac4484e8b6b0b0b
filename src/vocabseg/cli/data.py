"""``vocabseg data``: list the benchmarks, check a dataset folder, convert raw downloads."""

from __future__ import annotations

import argparse

from vocabseg.cli.eval import dataset_keys


def register(sub) -> None:
    from vocabseg.data.prepare import CONVERTERS

    parser = sub.add_parser("data", help="check benchmark folders, or convert raw downloads")
    data_sub = parser.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="report what was found for a dataset (no model is run)")
    check.add_argument("dataset", choices=dataset_keys())
    check.add_argument("--data-root", required=True)
    check.add_argument("--split", default="val")
    check.add_argument("--max-labels", type=int, default=200,
                       help="label files to read for the value check, spread over the split (default 200)")
    check.add_argument("--all-labels", action="store_true", help="read every label file")
    check.set_defaults(func=cmd_data_check)
    prepare = data_sub.add_parser("prepare", help="convert a raw download into the evaluated label files")
    prepare.add_argument("converter", choices=tuple(CONVERTERS))
    prepare.add_argument("--data-root", required=True)
    prepare.add_argument("--split", action="append",
                         help="split to convert (repeatable; default: val and train where present; ade847: val)")
    prepare.add_argument("--workers", type=int, default=1, help="worker processes")
    prepare.add_argument("--overwrite", action="store_true", help="rewrite outputs that already exist")
    prepare.set_defaults(func=cmd_data_prepare)
    listing = data_sub.add_parser("list", help="list the benchmarks: class counts, expected folder layouts and "
                                               "name lists")
    listing.set_defaults(func=cmd_data_list)


def cmd_data_check(args: argparse.Namespace) -> int:
    from vocabseg.data.datasets import get_dataset

    dataset = get_dataset(args.dataset, args.data_root, args.split)
    report = dataset.check(max_labels=None if args.all_labels else args.max_labels, progress=True)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from vocabseg.data.prepare import prepare

    report = prepare(args.converter, args.data_root, splits=args.split, overwrite=args.overwrite,
                     workers=args.workers)
    print("\n".join(report.lines()))
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    from vocabseg.data import classes, datasets

    for key in datasets.DATASET_KEYS:
        spec = datasets.layout(key)
        extra = " (zero-shot split)" if key in classes.ZERO_SHOT_SPLITS else ""
        lists = ", ".join(f"{key}.{s}" for s in classes.sources(key)) or "class names"
        print(f"{key:20s} {len(spec.classes):4d} classes  {spec.roots[0]}/{spec.label}{extra}\n"
              f"{'':26s} name lists: {lists}")
    return 0
