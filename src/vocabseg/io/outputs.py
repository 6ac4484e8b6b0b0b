"""Writing results as people expect them: palette label PNG, colour overlay with a legend, JSON sidecar.

Every file is written to a temporary name in the same folder and moved into place, so an interrupted run never
leaves a truncated output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_image(path: str | os.PathLike, image: Image.Image) -> None:
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def label_image(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Palette-indexed ('P') image whose pixel values are the class ids (255 = ignore)."""
    if labels.max(initial=0) > 255:
        raise ValueError("more than 255 classes cannot be stored in a palette PNG")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: min(len(palette), 255)] = palette[:255]
    full[255] = (255, 255, 255)
    image.putpalette(full.flatten().tolist())
    return image


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """RGB ``H,W,3`` colours of a label map (ignore pixels white)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: min(len(palette), 255)] = palette[:255]
    table[255] = (255, 255, 255)
    return table[labels.astype(np.int64).clip(0, 255)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def overlay_with_legend(image: np.ndarray, labels: np.ndarray, classes: Sequence[str], palette: np.ndarray,
                        alpha: float = 0.5) -> Image.Image:
    """The photo blended with the label colours, and a legend of the classes present (with pixel shares)."""
    blended = (image.astype(np.float32) * (1 - alpha) + colorize(labels, palette).astype(np.float32) * alpha)
    canvas_img = Image.fromarray(blended.round().astype(np.uint8))
    fractions = pixel_fractions(labels, classes)
    present = [(i, name, frac) for i, (name, frac) in enumerate(fractions.items()) if frac > 0]
    height, width = labels.shape
    font_size = max(12, min(28, height // 30))
    row = int(font_size * 1.5)
    font = _font(font_size)
    probe = ImageDraw.Draw(canvas_img)
    texts = [f"{name}  {100 * frac:.1f}%" for _, name, frac in present]
    text_width = max((probe.textlength(t, font=font) for t in texts), default=0)
    legend_width = int(text_width + row + font_size * 1.5)
    legend_height = row * len(present) + font_size
    canvas = Image.new("RGB", (width + legend_width, max(height, legend_height)), (255, 255, 255))
    canvas.paste(canvas_img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, ((index, _, _), text) in enumerate(zip(present, texts, strict=True)):
        y = font_size // 2 + k * row
        x = width + font_size // 2
        draw.rectangle([x, y, x + font_size, y + font_size], fill=tuple(int(c) for c in palette[index]),
                       outline=(0, 0, 0))
        draw.text((x + row, y), text, fill=(0, 0, 0), font=font)
    return canvas


def pixel_fractions(labels: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Share of the image's pixels per class, in class order (ignore pixels count in the total only)."""
    counts = np.bincount(labels.astype(np.int64).ravel(), minlength=256)
    total = max(labels.size, 1)
    return {name: float(counts[i]) / total for i, name in enumerate(classes)}
