"""``vocabseg segment``: label maps, overlays and JSON sidecars for images and folders of images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

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


#: What ``Segmentation.save`` writes for a stem.
OUTPUT_SUFFIXES = (".png", "_overlay.png", ".json")


def output_stems(files, out_dir: Path) -> list[str]:
    """One stem per input whose output files collide neither with another input's outputs (``pet.jpg`` and
    ``pet_overlay.jpg``; two ``pet`` files from different folders) nor with any input file itself (``--out`` the
    input folder): the file's stem, else the stem with the first free ``_2``, ``_3``, ... suffix."""
    taken = {file.resolve() for file in files}
    stems = []
    for file in files:
        stem, number = file.stem, 1
        while any((out_dir / f"{stem}{suffix}").resolve() in taken for suffix in OUTPUT_SUFFIXES):
            number += 1
            stem = f"{file.stem}_{number}"
        taken.update((out_dir / f"{stem}{suffix}").resolve() for suffix in OUTPUT_SUFFIXES)
        stems.append(stem)
    return stems


def writable_folder(out: str) -> Path:
    """``--out`` created if needed and proven writable before any work (one clear line otherwise)."""
    import tempfile

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to --out {out}: {exc.strerror or exc}") from exc
    return folder


def check_storable(spec) -> None:
    """Label PNGs hold ids 0..254: refuse more classes before any model loads or image is read."""
    from vocabseg.io.outputs import MAX_PNG_CLASSES

    if spec is not None and spec.num_classes > MAX_PNG_CLASSES:
        raise UsageError(f"{spec.num_classes} classes (with background) but a label PNG holds at most "
                         f"{MAX_PNG_CLASSES}; give fewer classes, or use the Python API for larger vocabularies")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vocabseg.io.images import ImageError, load_image, max_pixels_default

    max_pixels = args.max_pixels or max_pixels_default()  # a bad VOCABSEG_MAX_PIXELS is refused before any work
    spec = classes_from_args(args)
    check_storable(spec)
    files, missing = collect_images(args.images)
    for item in missing:
        log.error("%s: no such file or folder", item)
    if not files:
        raise UsageError("no images to segment")
    out = writable_folder(args.out)
    segmenter = build_segmenter(args)
    spec = segmenter.class_spec(spec)
    check_storable(spec)
    failures = len(missing)
    for file, stem in tqdm(list(zip(files, output_stems(files, out), strict=True)), desc="segment", unit="img",
                           disable=None):
        try:
            image = load_image(file, max_pixels=max_pixels)
        except ImageError as exc:
            log.error("skipped: %s", exc)
            failures += 1
            continue
        result = segmenter.segment(image, spec, maps=False, image_id=file.stem)
        result.meta["image"] = str(file)
        result.save(out, stem)
    log.info("wrote %d segmentation(s) to %s", len(files) - (failures - len(missing)), args.out)
    if failures:
        log.error("%d of %d input(s) failed", failures, len(files) + len(missing))
        return 1
    return 0
