"""``vocabseg eval`` and ``vocabseg compare``: benchmark evaluation (sharded under torchrun, resumable)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from vocabseg.cli.common import add_model_arguments, build_segmenter
from vocabseg.errors import UsageError

log = logging.getLogger("vocabseg")

#: Datasets without a published protocol of their own borrow the protocol of the closest benchmark.
PRESET_FALLBACK = {"coco-stuff27": "coco-stuff", "coco-stuff-unseen15": "coco-stuff", "pc459": "pc59",
                   "ade847": "ade150"}


def dataset_keys() -> tuple[str, ...]:
    from vocabseg.data.datasets import DATASET_KEYS

    return DATASET_KEYS


def _add_data_arguments(parser: argparse.ArgumentParser, many: bool = False) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", required=True,
                       help=("benchmark(s), comma-separated: " if many else "benchmark: ") + ", ".join(dataset_keys()))
    group.add_argument("--data-root", required=True,
                       help="folder holding the dataset folders (VOCdevkit, coco_stuff164k, ...) or the dataset "
                            "folder itself")
    group.add_argument("--split", default="val", help="split to evaluate (default: val)")
    group.add_argument("--limit", type=int, help="evaluate only the first N images of the split")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", help="results folder (default: results/<method>_<dataset>)")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from the state saved in --out")
    group.add_argument("--save-every", type=int, default=20, help="save the resumable state every N images")
    group.add_argument("--batch-images", type=int,
                       help="images whose sliding windows share forward passes (default: 8 on a GPU, 1 on a CPU)")
    group.add_argument("--workers", type=int,
                       help="background processes decoding images and labels (default: up to 4 on a GPU; 0, "
                            "decoding in the main process, on a CPU)")
    group.add_argument("--names", metavar="LIST",
                       help="the query-name list: a list id such as voc21.itaclip, or its source (itaclip); "
                            "default: the preset's, else the benchmark's default list (`vocabseg data list`)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub) -> None:
    parser = sub.add_parser(
        "eval", help="evaluate a method on a benchmark (mIoU); works under torchrun",
        description="Evaluates one method on one benchmark split and writes results.json, results.md and "
                    "confusion.npy to --out. Under `torchrun --nproc-per-node N -m vocabseg eval ...` the images "
                    "are sharded over the processes and the confusion matrices summed.")
    _add_data_arguments(parser)
    parser.add_argument("--save-preds", help="also write each predicted label map as <id>.png to this folder")
    _add_run_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(func=cmd_eval)

    parser = sub.add_parser("compare", help="evaluate several methods and print one table",
                            description="Runs `vocabseg eval` for every method (and dataset) with the same "
                                        "models and options and prints one table; writes compare.md and "
                                        "compare.json to --out (default: results/compare).")
    parser.add_argument("--methods", required=True, help="comma-separated methods, e.g. clip,maskclip,sclip")
    _add_data_arguments(parser, many=True)
    _add_run_arguments(parser)
    add_model_arguments(parser)
    for action in parser._actions:
        if "--method" in action.option_strings:
            action.help = argparse.SUPPRESS
    parser.set_defaults(func=cmd_compare)


def build_eval_segmenter(args: argparse.Namespace, dataset_key: str, device: str | None):
    """A Segmenter for ``dataset_key``: ``--preset`` if given, else the method's preset for the dataset, else the
    preset of the closest benchmark (:data:`PRESET_FALLBACK`), else the method's default protocol."""
    from vocabseg.methods.registry import method_class

    presets = method_class(args.method).presets
    preset = args.preset
    if preset is None:
        if dataset_key in presets:
            preset = dataset_key
        elif PRESET_FALLBACK.get(dataset_key) in presets:
            preset = PRESET_FALLBACK[dataset_key]
            log.info("%s has no %s preset: using its %s protocol", args.method, dataset_key, preset)
        else:
            log.info("%s has no %s preset: using its default protocol and the dataset's class names",
                     args.method, dataset_key)
    return build_segmenter(args, device=device, preset=preset)


def _default_out(method: str, dataset: str, split: str) -> Path:
    return Path("results") / (f"{method}_{dataset}" + ("" if split == "val" else f"_{split}"))


def loader_settings(batch_images: int | None, workers: int | None, device) -> tuple[int, int]:
    """``--batch-images`` and ``--workers``, or their defaults for ``device``. On a GPU the model is fast enough
    for decoding to matter: 8 images per batch and up to 4 decoding processes (SCLIP on an H100 in bf16: 117 images/s
    against 56 with one image in the main process). On a CPU decoding is under 1% of an image's time."""
    import torch

    on_gpu = torch.device(device).type == "cuda"
    if batch_images is None:
        batch_images = 8 if on_gpu else 1
    if workers is None:
        workers = min(4, max((os.cpu_count() or 1) // 2, 1)) if on_gpu else 0
    if batch_images < 1 or workers < 0:
        raise UsageError(f"--batch-images must be at least 1 and --workers at least 0 (got {batch_images}, "
                         f"{workers})")
    return batch_images, workers


def _run_one(args, dataset, segmenter, out: Path, dist_info):
    from vocabseg.eval.runner import evaluate

    save_preds = getattr(args, "save_preds", None)
    batch_images, workers = loader_settings(args.batch_images, args.workers, segmenter.device)
    return evaluate(segmenter, dataset, out_dir=out, limit=args.limit, save_preds=save_preds, resume=args.resume,
                    save_every=args.save_every, names=args.names, batch_images=batch_images,
                    workers=workers, progress=not args.no_progress, dist_info=dist_info)


def cmd_eval(args: argparse.Namespace) -> int:
    from vocabseg.data.datasets import get_dataset
    from vocabseg.distributed import distributed_device, init_distributed, teardown

    dataset = get_dataset(args.dataset, args.data_root, args.split)
    device = distributed_device(args.device)
    dist_info = init_distributed(device)
    try:
        segmenter = build_eval_segmenter(args, dataset.key, device)
        out = Path(args.out) if args.out else _default_out(args.method, dataset.key, dataset.split)
        result = _run_one(args, dataset, segmenter, out, dist_info)
        if dist_info.is_main:
            paths = result.write(out)
            print(result.table())
            wait = result.info.get("data_wait_fraction")
            if wait is not None:
                log.info("%.3f s/image; after a %.1f s start-up, %.0f%% of the time spent waiting for decoded "
                         "images%s", result.info["seconds_per_image"], result.info["startup_seconds"], 100 * wait,
                         " (raise --workers)" if wait > 0.1 else "")
            log.info("results written to %s and %s", paths["json"], paths["markdown"])
    finally:
        teardown(dist_info)
    return 0


# --- compare --------------------------------------------------------------------------------------------------------

def compare_table(results: dict[tuple[str, str], object], methods: list[str], datasets: list[str]) -> str:
    """Markdown table: one row per method; with one dataset every headline metric, else mIoU per dataset."""
    if len(datasets) == 1:
        keys: list[str] = []
        for method in methods:
            for key in results[(method, datasets[0])].metrics.summary():
                if key not in keys:
                    keys.append(key)
        head = ["method", *keys, "images", "s/img"]
        rows = []
        for method in methods:
            r = results[(method, datasets[0])]
            summary = r.metrics.summary()
            rows.append([method, *[_fmt(summary.get(k)) for k in keys], str(r.images),
                         f"{r.info.get('seconds_per_image', 0):.3f}"])
    else:
        head = ["method", *[f"{d} mIoU" for d in datasets], "mean"]
        rows = []
        for method in methods:
            values = [results[(method, d)].metrics.summary()["mIoU"] for d in datasets]
            known = [v for v in values if v is not None]
            mean = sum(known) / len(known) if known else None
            rows.append([method, *[_fmt(v) for v in values], _fmt(mean)])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def cmd_compare(args: argparse.Namespace) -> int:
    from vocabseg.data.datasets import get_dataset
    from vocabseg.distributed import distributed_device, init_distributed, teardown

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    keys = [d.strip() for d in args.dataset.split(",") if d.strip()]
    if not methods or not keys:
        raise UsageError("give at least one method (--methods a,b) and one dataset")
    datasets = [get_dataset(key, args.data_root, args.split) for key in keys]
    device = distributed_device(args.device)
    dist_info = init_distributed(device)
    out_root = Path(args.out) if args.out else Path("results") / "compare"
    results = {}
    try:
        for dataset in datasets:
            for method in methods:  # models are loaded once and shared (the model factory's)
                ns = argparse.Namespace(**vars(args))
                ns.method = method
                segmenter = build_eval_segmenter(ns, dataset.key, device)
                result = _run_one(ns, dataset, segmenter, out_root / f"{method}_{dataset.key}", dist_info)
                results[(method, dataset.key)] = result
                if dist_info.is_main:
                    result.write(out_root / f"{method}_{dataset.key}")
                    log.info("%s: %s", result.title(), result.summary_line())
        if dist_info.is_main:
            table = compare_table(results, methods, keys)
            title = f"# {', '.join(keys)} ({args.split})"
            from vocabseg.io.outputs import atomic_write, write_json

            with atomic_write(out_root / "compare.md") as tmp:
                tmp.write_text(f"{title}\n\n{table}\n", encoding="utf-8")
            write_json(out_root / "compare.json",
                       {f"{m}/{d}": {"metrics": r.metrics.summary(), "images": r.images, "preset": r.info["preset"]}
                        for (m, d), r in results.items()})
            print(table)
            log.info("table written to %s", out_root / "compare.md")
    finally:
        teardown(dist_info)
    return 0
