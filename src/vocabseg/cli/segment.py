"""``vocabseg segment``: label maps, overlays and JSON sidecars for images and folders of images."""

from __future__ import annotations

import argparse
import logging

from vocabseg.cli.common import (
    add_classes_arguments,
    add_model_arguments,
    build_segmenter,
    classes_from_args,
    positive_int,
)
from vocabseg.errors import UsageError
from vocabseg.io.files import collect_images

log = logging.getLogger("vocabseg")


def register(sub) -> None:
    parser = sub.add_parser(
        "segment", help="segment images into the given classes",
        description="Writes per image: <name>.png (palette label map), <name>_overlay.png (colour overlay with "
                    "legend) and <name>.json (classes, palette, pixel shares, method, protocol and models). Folders "
                    "are searched for images (not recursively).")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    add_classes_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-pixels", type=positive_int,
                        help="refuse images larger than this many pixels (default 50,000,000 or VOCABSEG_MAX_PIXELS); "
                             "it replaces Pillow's own limit, so it may also be raised above it")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def _unique_stems(files) -> list[str]:
    stems, seen = [], {}
    for file in files:
        stem = file.stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vocabseg.io.images import ImageError, load_image, max_pixels_default

    max_pixels = args.max_pixels or max_pixels_default()  # a bad VOCABSEG_MAX_PIXELS is refused before any work
    spec = classes_from_args(args)
    files, missing = collect_images(args.images)
    for item in missing:
        log.error("%s: no such file or folder", item)
    if not files:
        raise UsageError("no images to segment")
    segmenter = build_segmenter(args)
    spec = segmenter.class_spec(spec)
    failures = len(missing)
    for file, stem in tqdm(list(zip(files, _unique_stems(files), strict=True)), desc="segment", unit="img",
                           disable=None):
        try:
            image = load_image(file, max_pixels=max_pixels)
        except ImageError as exc:
            log.error("skipped: %s", exc)
            failures += 1
            continue
        result = segmenter.segment(image, spec, maps=False, image_id=file.stem)
        result.meta["image"] = str(file)
        result.save(args.out, stem)
    log.info("wrote %d segmentation(s) to %s", len(files) - (failures - len(missing)), args.out)
    if failures:
        log.error("%d of %d input(s) failed", failures, len(files) + len(missing))
        return 1
    return 0
