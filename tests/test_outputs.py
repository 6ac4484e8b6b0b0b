"""What `vocabseg segment` writes: names that never collide, whole output sets, plain file modes, readable overlays
and legends, refusals before any work (issue 14)."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from vocabseg.cli import main
from vocabseg.cli.segment import OUTPUT_SUFFIXES, output_stems
from vocabseg.data.classes import palette
from vocabseg.io import fonts, outputs


def _outputs_of(folder, stems):
    return [folder / f"{stem}{suffix}" for stem in stems for suffix in OUTPUT_SUFFIXES]


def test_output_names_never_collide_with_other_outputs_or_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [tmp_path / "a" / "pet_overlay.jpg", tmp_path / "a" / "pet.jpg", tmp_path / "b" / "pet.jpg",
             tmp_path / "a" / "pet_2.jpg", tmp_path / "a" / "photo.png"]
    stems = output_stems(files, tmp_path / "a")  # --out is the input folder
    written = _outputs_of(tmp_path / "a", stems)
    assert len(set(written)) == len(written)  # no output overwrites another
    assert not set(written) & set(files)  # nor an input
    assert stems[0] == "pet_overlay" and stems[1] != "pet"  # pet's overlay would be pet_overlay.png's labels
    assert stems[4] != "photo"  # photo.png's label map would replace the photo


def test_output_files_get_the_modes_plain_files_get(tmp_path):
    previous = os.umask(0o022)
    try:
        outputs._umask.cache_clear()
        outputs.write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(previous)
        outputs._umask.cache_clear()
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def test_a_label_png_holds_at_most_255_classes():
    labels = np.zeros((4, 4), dtype=np.uint8)
    assert outputs.label_image(labels, palette(None, 255)).getpalette()[3 * 254:3 * 255] is not None
    with pytest.raises(ValueError, match="at most 255"):
        outputs.label_image(labels, palette(None, 256))


def test_overlay_keeps_the_photo_width_leaves_background_as_the_photo_and_shortens_long_names():
    photo = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    labels = np.zeros((90, 120), dtype=np.uint8)
    labels[20:50, 20:60] = 1
    labels[60:, :] = 2
    classes = ["background", "Café naïve – " + "x" * 600, "cat"]
    overlay = np.asarray(outputs.overlay_with_legend(photo, labels, classes, palette(None, 3), background=0))
    assert overlay.shape[1] == 120
    assert np.array_equal(overlay[:20, :, :], photo[:20])  # background pixels are the photo
    assert not np.array_equal(overlay[20:50, 20:60], photo[20:50, 20:60])
    many = (np.arange(90 * 120).reshape(90, 120) % 254).astype(np.uint8)
    wide = outputs.overlay_with_legend(photo, many, [f"class {i}" for i in range(254)], palette(None, 254))
    assert wide.size[0] == 120


@pytest.fixture
def font_lookup(monkeypatch):
    """Fresh glyph lookups and warnings; yields a setter for the fonts this machine has installed."""
    fonts.font_file_for.cache_clear()
    monkeypatch.setattr(fonts, "_warned", set())
    yield lambda paths: monkeypatch.setattr(fonts, "installed_fonts", lambda: tuple(paths))
    fonts.font_file_for.cache_clear()


def _ink(text: str, font_path: str | None = None) -> np.ndarray:
    """The pixels ``text`` draws: through the legend's font choice, or with one font file."""
    canvas = Image.new("L", (200, 40), 0)
    draw = ImageDraw.Draw(canvas)
    if font_path is None:
        fonts.draw_text(draw, (2, 2), text, 24, fill=255)
    else:
        draw.text((2, 2), text, fill=255, font=ImageFont.truetype(font_path, 24))
    return np.asarray(canvas)


def _cropped(ink: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(ink)
    return ink[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]


def test_legend_draws_accents_dashes_greek_and_cyrillic_as_glyphs_not_boxes(font_lookup):
    font_lookup([])
    box = _ink("\ue000", fonts._shipped(fonts.PRIMARY))  # a private-use code point: DejaVu's missing-glyph box
    for char in "éï–αΩЖ":
        assert fonts.font_file_for(char).endswith("DejaVuSans.ttf")
        assert not np.array_equal(_ink(char), box) and _ink(char).any()


def test_characters_no_font_has_are_drawn_as_their_block_symbol_and_named_once(font_lookup, caplog):
    font_lookup([])
    box = _ink("\ue000", fonts._shipped(fonts.PRIMARY))
    with caplog.at_level(logging.WARNING, logger="vocabseg"):
        cat = _ink("猫")
        _ink("猫狗")
    assert fonts.font_file_for("猫") is None
    assert cat.any() and not np.array_equal(cat, box)  # Last Resort's CJK block symbol, not an anonymous box
    assert np.array_equal(_cropped(cat), _cropped(_ink("猫", fonts._shipped(fonts.LAST_RESORT))))
    warnings = [r.getMessage() for r in caplog.records if "no font here" in r.getMessage()]
    assert len(warnings) == 2 and "'猫'" in warnings[0] and "'狗'" in warnings[1]  # each character named once


def _font_with_one_glyph(path, char: str) -> None:
    """A TrueType file whose only glyph (a filled square) is mapped from ``char``."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    pen = TTGlyphPen(None)
    for point in [(100, 0), (100, 700), (900, 700), (900, 0)]:
        (pen.lineTo if pen.points else pen.moveTo)(point)
    pen.closePath()
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder([".notdef", "square"])
    builder.setupCharacterMap({ord(char): "square"})
    builder.setupGlyf({".notdef": TTGlyphPen(None).glyph(), "square": pen.glyph()})
    builder.setupHorizontalMetrics({".notdef": (500, 0), "square": (1000, 100)})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": "Square", "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    builder.setupPost()
    builder.save(str(path))


def test_an_installed_font_supplies_the_glyphs_dejavu_lacks(font_lookup, tmp_path, caplog):
    square = tmp_path / "square.ttf"
    _font_with_one_glyph(square, "猫")
    font_lookup([str(tmp_path / "broken.ttf"), str(square)])
    (tmp_path / "broken.ttf").write_bytes(b"not a font")
    with caplog.at_level(logging.WARNING, logger="vocabseg"):
        mixed = _ink("a猫")
    assert fonts.font_file_for("猫") == str(square) and fonts.font_file_for("a").endswith("DejaVuSans.ttf")
    assert not caplog.records
    square_part = mixed[:, 2 + int(fonts.text_length("a", 24)):]
    assert (square_part == 255).sum() > 100  # the filled square, drawn after DejaVu's "a"
    assert fonts.text_length("a猫", 24) == fonts.text_length("a", 24) + 24  # the square advances one em


def test_custom_palettes_are_distinct_and_keep_neighbours_apart():
    colours = palette(None, 256).astype(int)
    assert len({tuple(c) for c in colours.tolist()}) == 256
    # consecutive classes differ clearly (VOC's bit-shift colours differ by 64 in one channel only)
    assert min(np.abs(colours[i] - colours[i + 1]).sum() for i in range(1, 40)) > 100


@pytest.mark.parametrize(("arguments", "message"), [
    (["--classes", ",".join(f"c{i}" for i in range(255))], "at most 255"),
    (["--classes", "cat\ndog"], "line break"),
])
def test_refusals_come_before_any_work(tmp_path, caplog, arguments, message):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    with caplog.at_level(logging.ERROR):
        code = main(["segment", str(image), "--weights", str(tmp_path / "missing.pt"), "--out",
                     str(tmp_path / "out"), *arguments])
    assert code == 2 and message in caplog.text
    assert "missing.pt" not in caplog.text  # refused before the weights were looked at


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_an_unusable_out_folder_is_refused_before_the_model_loads(tmp_path, caplog, kind):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    blocker = tmp_path / "taken"
    blocker.write_text("")
    out = blocker if kind == "file" else blocker / "sub"
    with caplog.at_level(logging.ERROR):
        code = main(["segment", str(image), "--classes", "cat", "--weights", str(tmp_path / "missing.pt"),
                     "--out", str(out)])
    assert code == 2 and "--out" in caplog.text and "missing.pt" not in caplog.text
