"""The `vocabseg segment` command on real photos with a tiny random model, and its behaviour on bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vocabseg.cli import main


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
        assert labels.getpalette()[3:6] == [128, 0, 0]  # VOC bit-shift palette, class 1
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.height == h and overlay.width > w  # the legend sits on the right
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
