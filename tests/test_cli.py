"""The `vocabseg segment` command on real photos with a tiny random model, and its behaviour on bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vocabseg.cli import main
from vocabseg.data.classes import palette


@pytest.fixture(scope="module")
def photos(tmp_path_factory, voc, chelsea):
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(voc[0]).save(folder / "voc.jpg", quality=95)
    Image.fromarray(chelsea).save(folder / "chelsea.png")
    return folder


def _segment(args, weights, tmp_path):
    out = tmp_path / "out"
    code = main(["segment", *args, "--weights", str(weights), "--device", "cpu", "--out", str(out)])
    return code, out


def test_segment_writes_label_png_overlay_and_json(photos, tiny_weights, tmp_path):
    code, out = _segment([str(photos), "--classes", "person|man,bottle,chair,dining table|table",
                          "--method", "sclip", "--crop", "96", "--stride", "64", "--short-side", "128",
                          "--pamr", "--pamr-steps", "2"], tiny_weights, tmp_path)
    assert code == 0
    for stem, (w, h) in {"voc": (500, 375), "chelsea": (451, 300)}.items():
        labels = Image.open(out / f"{stem}.png")
        assert labels.mode == "P" and labels.size == (w, h)
        assert np.asarray(labels).max() <= 4
        assert labels.getpalette()[3:6] == palette(None, 2)[1].tolist()  # the custom-list palette, class 1
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.width == w and overlay.height > h  # the legend sits below, as wide as the photo
        meta = json.loads((out / f"{stem}.json").read_text())
        assert meta["classes"] == ["background", "person", "bottle", "chair", "dining table"]
        assert meta["names"][1] == ["person", "man"] and len(meta["names"][0]) == 26
        assert sum(meta["pixel_fraction"].values()) == pytest.approx(1.0)
        assert meta["method"] == "sclip" and meta["protocol"]["crop"] == 96 and meta["protocol"]["pamr"] is True
        counts = np.bincount(np.asarray(labels).ravel(), minlength=5)[:5] / (w * h)
        assert np.allclose(counts, list(meta["pixel_fraction"].values()), atol=1e-6)


def test_any_image_mode_and_size(tiny_weights, tmp_path, chelsea):
    folder = tmp_path / "modes"
    folder.mkdir()
    gray = np.asarray(Image.fromarray(chelsea).convert("L"))
    Image.fromarray(chelsea).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "deep.png")  # 16-bit
    Image.fromarray(chelsea[:20, :13]).save(folder / "tiny.png")  # smaller than a patch after no resize
    code, out = _segment([str(folder), "--classes", "cat,wall", "--no-background", "--method", "clearclip",
                          "--crop", "none"], tiny_weights, tmp_path)
    assert code == 0
    for stem in ("rgba", "gray", "deep", "tiny"):
        assert (out / f"{stem}.png").exists() and (out / f"{stem}.json").exists()
    deep = json.loads((out / "deep.json").read_text())
    gray_meta = json.loads((out / "gray.json").read_text())
    assert deep["pixel_fraction"] == gray_meta["pixel_fraction"]  # 16-bit scaled to the same 8-bit image


def test_corrupt_and_missing_files_are_skipped(photos, tiny_weights, tmp_path, caplog):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    code, out = _segment([str(bad), str(photos / "chelsea.png"), str(tmp_path / "missing.png"),
                          "--classes", "cat", "--crop", "none"], tiny_weights, tmp_path)
    assert code == 1
    assert (out / "chelsea.png").exists() and not (out / "broken.png").exists()
    assert "broken.jpg" in caplog.text and "missing.png" in caplog.text and "2 of 3" in caplog.text


def test_decompression_bomb_is_refused(tiny_weights, tmp_path, caplog):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb)
    code, out = _segment([str(bomb), "--classes", "cat", "--max-pixels", "10000000"], tiny_weights, tmp_path)
    assert code == 1 and "exceeds the limit" in caplog.text and not (out / "bomb.png").exists()


@pytest.mark.parametrize("classes, message", [(",,", "empty"), ("cat,dog,cat", "Duplicate")])
def test_bad_class_lists(photos, tiny_weights, tmp_path, caplog, classes, message):
    code, _ = _segment([str(photos / "chelsea.png"), "--classes", classes], tiny_weights, tmp_path)
    assert code == 2 and message in caplog.text


def test_missing_weights_message(photos, tmp_path, caplog):
    code, _ = _segment([str(photos / "chelsea.png"), "--classes", "cat"], tmp_path / "ViT-B-16.pt", tmp_path)
    assert code == 2 and "not found" in caplog.text


def test_classes_file_and_preset_classes(photos, tiny_weights, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cat, kitten\nsofa\n")
    code, out = _segment([str(photos / "chelsea.png"), "--classes-file", str(names), "--background", "wall|floor",
                          "--crop", "none"], tiny_weights, tmp_path)
    assert code == 0
    meta = json.loads((out / "chelsea.json").read_text())
    assert meta["names"] == [["wall", "floor"], ["cat", "kitten"], ["sofa"]]
    code, out = _segment([str(photos / "chelsea.png"), "--preset", "voc21", "--method", "naclip", "--crop", "none",
                          "--pamr-steps", "1"], tiny_weights, tmp_path)
    meta = json.loads((out / "chelsea.json").read_text())
    assert code == 0 and len(meta["classes"]) == 21 and meta["protocol"]["logit_scale"] == 40
    assert meta["preset"] == "voc21" and meta["protocol"]["prob_thd"] == 0.1


def test_methods_command_lists_methods_and_presets():
    result = subprocess.run([sys.executable, "-m", "vocabseg", "methods"], capture_output=True, text=True,
                            check=True)
    for name in ("clip", "maskclip", "sclip", "clearclip", "naclip", "gaussian_std", "voc21", "cityscapes"):
        assert name in result.stdout


@pytest.mark.parametrize("device, message", [("tpu", "unknown device"), ("cuda:7", "CUDA|GPU")])
def test_impossible_device_is_a_clear_error(photos, tiny_weights, tmp_path, caplog, device, message):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    out = tmp_path / "out"
    code = main(["segment", str(photos / "chelsea.png"), "--classes", "cat", "--weights", str(tiny_weights),
                 "--device", device, "--out", str(out)])
    assert code == 2
    import re

    assert re.search(message, caplog.text)


def _error_line(caplog) -> str:
    """The one error the command logged (a single line)."""
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    return errors[0]


@pytest.mark.parametrize("name, content, message", [
    ("random.safetensors", bytes(range(256)) * 16, "is not a readable safetensors file"),
    ("empty.pt", b"", "is empty: not a checkpoint"),
], ids=["random-safetensors", "empty"])
def test_unreadable_weights_are_one_line_usage_errors(photos, tmp_path, caplog, name, content, message):
    weights = tmp_path / name
    weights.write_bytes(content)
    code, _ = _segment([str(photos / "chelsea.png"), "--classes", "cat"], weights, tmp_path)
    assert code == 2 and message in _error_line(caplog)


def test_weights_holding_code_are_refused_without_torch_hint(photos, tmp_path, caplog):
    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    weights = tmp_path / "evil.pt"
    torch.save({"visual.proj": Evil()}, weights)
    code, _ = _segment([str(photos / "chelsea.png"), "--classes", "cat"], weights, tmp_path)
    line = _error_line(caplog)
    assert code == 2 and "holds code (print), not only tensors: it will not be loaded" in line
    assert "weights_only" not in line


# Settings refused before any model loads: the weights named here do not exist, so loading one would say "not found".
@pytest.mark.parametrize("args, message", [
    (["--device", "mps"], "device 'mps' asked for, but this machine and PyTorch build have no 'mps' device"),
    (["--method", "naclip", "--option", "gaussian_std=abc"], "gaussian_std must be a number (got 'abc')"),
    (["--method", "naclip", "--option", "gaussian_std=-5"], "gaussian_std must be positive (got -5.0)"),
    (["--method", "naclip", "--option", "gaussian_std=nan"], "gaussian_std must be positive (got nan)"),
    (["--crop", "8"], "crop 8 is smaller than a CLIP patch: give at least 16 pixels"),
    (["--crop", "64"], "stride 112 is larger than crop 64: the windows would leave pixels uncovered"),
    (["--prob-thd", "1.5"], "prob_thd must be in [0, 1] (got 1.5)"),
], ids=["mps", "std-text", "std-negative", "std-nan", "crop-below-patch", "stride-above-crop", "threshold"])
def test_impossible_settings_are_refused_before_loading(photos, tmp_path, caplog, args, message):
    if args[:2] == ["--device", "mps"]:
        import torch

        if torch.backends.mps.is_available():
            pytest.skip("this machine has an MPS device")
    code = main(["segment", str(photos / "chelsea.png"), "--classes", "cat", *args, "--weights",
                 str(tmp_path / "ViT-B-16.pt"), "--out", str(tmp_path / "out")])
    assert code == 2 and message in _error_line(caplog)


def test_missing_classes_message_names_the_flags(photos, tmp_path, caplog):
    code, _ = _segment([str(photos / "chelsea.png")], tmp_path / "ViT-B-16.pt", tmp_path)
    line = _error_line(caplog)
    assert code == 2 and "--classes" in line and "--preset" in line and "[" not in line


def test_max_pixels_replaces_pillows_limit_both_ways(photos, tiny_weights, tmp_path, caplog, monkeypatch, recwarn):
    from PIL import Image as PILImage

    from vocabseg.io.images import load_image

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 20_000)  # Pillow refuses above 40,000 pixels, warns above 20,000
    image = photos / "chelsea.png"  # 451 x 300 = 135,300 pixels
    assert load_image(image).shape == (300, 451, 3)  # the default limit (50 MP) applies, not Pillow's
    assert load_image(image, max_pixels=135_300).shape == (300, 451, 3)
    assert PILImage.MAX_IMAGE_PIXELS == 20_000  # restored
    assert not [w for w in recwarn if issubclass(w.category, PILImage.DecompressionBombWarning)]
    code, out = _segment([str(image), "--classes", "cat", "--crop", "none", "--max-pixels", "100000"], tiny_weights,
                         tmp_path)
    assert code == 1 and not (out / "chelsea.png").exists()
    assert "451x300 (135,300 pixels) exceeds the limit of 100,000 pixels" in caplog.text
    assert "decompression bomb" not in caplog.text


def test_max_pixels_must_be_positive(photos, tmp_path, capsys, caplog, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        _segment([str(photos / "chelsea.png"), "--classes", "cat", "--max-pixels", "-3"], tmp_path / "w.pt", tmp_path)
    assert exit_.value.code == 2 and "expected a positive whole number, got '-3'" in capsys.readouterr().err
    monkeypatch.setenv("VOCABSEG_MAX_PIXELS", "lots")
    code, _ = _segment([str(photos / "chelsea.png"), "--classes", "cat"], tmp_path / "w.pt", tmp_path)
    assert code == 2 and "VOCABSEG_MAX_PIXELS must be a positive whole number of pixels (got 'lots')" in \
        _error_line(caplog)
