"""Image discovery for commands that take files and folders (standard library only, so that building the command
line stays light)."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def collect_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Image files named directly or found (not recursively) in named folders; missing paths are reported."""
    files, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.exists():
            files.append(path)
        else:
            missing.append(item)
    return files, missing
