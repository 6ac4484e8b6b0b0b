"""Legend text in any script: DejaVu Sans (shipped with matplotlib) for what it covers (Latin, Greek, Cyrillic,
Arabic, Hebrew, many symbols), an installed font for the characters it lacks (CJK, Indic, ...), and Unicode's Last
Resort font (also shipped with matplotlib) for characters no font here has: it draws each as the symbol of its
Unicode block instead of an anonymous box, and a warning names them once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from pathlib import Path

from PIL import ImageDraw, ImageFont

log = logging.getLogger(__name__)

PRIMARY = "DejaVuSans.ttf"
LAST_RESORT = "LastResortHE-Regular.ttf"


@functools.cache
def _shipped(name: str) -> str:
    """Path of a font file matplotlib ships (``name`` as in its ``fonts/ttf`` folder)."""
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name)


@functools.cache
def _coverage(path: str) -> frozenset[int]:
    """Code points the font (first face of a collection) has glyphs for; empty when it cannot be read."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, fontNumber=0, lazy=True) as font:
            return frozenset(font.getBestCmap() or ())
    except Exception as exc:  # a broken or unusual font file is skipped, not fatal
        log.debug("skipping font %s: %s", path, exc)
        return frozenset()


@functools.cache
def installed_fonts() -> tuple[str, ...]:
    """TrueType/OpenType files installed on this machine (matplotlib's cross-platform font list, built once and
    cached by matplotlib), in a stable order."""
    from matplotlib import font_manager

    bundled = Path(_shipped(PRIMARY)).parent
    paths = {entry.fname for entry in font_manager.fontManager.ttflist}
    return tuple(sorted(p for p in paths if Path(p).parent != bundled))


@functools.cache
def font_file_for(char: str) -> str | None:
    """The first font with a glyph for ``char``: DejaVu Sans, else an installed font; None when there is none."""
    point = ord(char)
    if point in _coverage(_shipped(PRIMARY)):
        return _shipped(PRIMARY)
    return next((path for path in installed_fonts() if point in _coverage(path)), None)


_warned: set[str] = set()


def _warn_missing(text: str) -> None:
    """Name, once per process, the characters of ``text`` that no font here has."""
    missing = "".join(dict.fromkeys(c for c in text if c not in _warned and font_file_for(c) is None))
    if missing:
        _warned.update(missing)
        log.warning("legend: no font here has glyphs for %r; drawn as their Unicode block symbols (install a font "
                    "that covers them, e.g. Noto Sans CJK for Chinese, Japanese or Korean)", missing)


def _runs(text: str) -> Iterator[tuple[str, str]]:
    """``(font path, run of text)`` pieces of ``text``, each drawn with one font."""
    start, current = 0, None
    for index, char in enumerate(text):
        path = font_file_for(char) or _shipped(LAST_RESORT)
        if current is not None and path != current:
            yield current, text[start:index]
            start = index
        current = path
    if current is not None:
        yield current, text[start:]


@functools.cache
def _truetype(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def text_length(text: str, size: int) -> float:
    """Advance width of ``text`` in pixels at font size ``size``."""
    return sum(_truetype(path, size).getlength(run) for path, run in _runs(text))


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int, fill) -> None:
    """Draw ``text`` with its top-left at ``xy`` (every run on DejaVu Sans's baseline)."""
    _warn_missing(text)
    x, y = xy
    baseline = y + _truetype(_shipped(PRIMARY), size).getmetrics()[0]
    for path, run in _runs(text):
        font = _truetype(path, size)
        draw.text((x, baseline), run, fill=fill, font=font, anchor="ls")
        x += font.getlength(run)
