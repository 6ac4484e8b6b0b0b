"""Writing results as people expect them: palette label PNG, colour overlay with a legend, JSON sidecar.

Every file is written to a temporary name in the same folder and moved into place, so an interrupted run never
leaves a truncated output behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vocabseg.io.fonts import draw_text, text_length


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically, with the permissions a
    plain ``open`` would give (0666 less the umask, not the temporary file's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@functools.cache
def _umask() -> int:
    """The process umask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Classes a palette label PNG can hold: ids 0..254 (255 marks pixels without a class).
MAX_PNG_CLASSES = 255


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_image(path: str | os.PathLike, image: Image.Image) -> None:
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def label_image(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Palette-indexed ('P') image whose pixel values are the class ids (255 = no class)."""
    if len(palette) > MAX_PNG_CLASSES or labels.max(initial=0) > 255:
        raise ValueError(f"a palette PNG holds at most {MAX_PNG_CLASSES} classes (ids 0-254; 255 marks pixels "
                         f"without a class), not {len(palette)}")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(palette)] = palette
    full[255] = (255, 255, 255)
    image.putpalette(full.flatten().tolist())
    return image


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """RGB ``H,W,3`` colours of a label map (ignore pixels white)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: min(len(palette), 255)] = palette[:255]
    table[255] = (255, 255, 255)
    return table[labels.astype(np.int64).clip(0, 255)]


def overlay_with_legend(image: np.ndarray, labels: np.ndarray, classes: Sequence[str], palette: np.ndarray,
                        alpha: float = 0.5, background: int | None = None) -> Image.Image:
    """The photo with the class colours blended in (the ``background`` class and pixels without a class left as
    the photo), above a legend of the classes present with their pixel shares. The legend wraps to the photo's
    width, and names too long for it are shortened with an ellipsis: the overlay is exactly as wide as the photo."""
    coloured = (labels != 255) & (labels != (-1 if background is None else background))
    blended = image.astype(np.float32)
    blended[coloured] = blended[coloured] * (1 - alpha) + colorize(labels, palette)[coloured] * alpha
    photo = Image.fromarray(blended.round().astype(np.uint8))
    height, width = labels.shape
    fractions = pixel_fractions(labels, classes)
    present = [(i, f"{name}  {100 * frac:.1f}%") for i, (name, frac) in enumerate(fractions.items()) if frac > 0]
    font_size = max(12, min(24, width // 40))
    entries = _legend_layout([text for _, text in present], font_size, width)
    rows = max((row for row, _, _ in entries), default=-1) + 1
    row_height = int(font_size * 1.5)
    canvas = Image.new("RGB", (width, height + rows * row_height + (font_size // 2 if rows else 0)),
                       (255, 255, 255))
    canvas.paste(photo, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for (index, _), (row, x, text) in zip(present, entries, strict=True):
        y = height + font_size // 4 + row * row_height
        draw.rectangle([x, y, x + font_size, y + font_size], fill=tuple(int(c) for c in palette[index]),
                       outline=(0, 0, 0))
        draw_text(draw, (x + int(font_size * 1.4), y), text, font_size, fill=(0, 0, 0))
    return canvas


def _legend_layout(texts: Sequence[str], font_size: int, width: int) -> list[tuple[int, int, str]]:
    """``(row, x, text)`` of each legend entry, flowing left to right and wrapping at ``width``; a text that does
    not fit one row is shortened with an ellipsis."""
    swatch, gap = int(font_size * 1.4), font_size
    room = max(width - font_size // 2 - swatch, font_size)
    layout, row, x = [], 0, font_size // 2
    for text in texts:
        text = _shortened(text, font_size, room)
        needed = swatch + int(text_length(text, font_size))
        if x > font_size // 2 and x + needed > width:
            row, x = row + 1, font_size // 2
        layout.append((row, x, text))
        x += needed + gap
    return layout


def _shortened(text: str, font_size: int, room: int) -> str:
    if text_length(text, font_size) <= room:
        return text
    name, share = text.rsplit("  ", 1)
    while name and text_length(f"{name}…  {share}", font_size) > room:
        name = name[:-1]
    return f"{name}…  {share}"


def pixel_fractions(labels: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Share of the image's pixels per class, in class order (ignore pixels count in the total only)."""
    counts = np.bincount(labels.astype(np.int64).ravel(), minlength=256)
    total = max(labels.size, 1)
    return {name: float(counts[i]) / total for i, name in enumerate(classes)}
