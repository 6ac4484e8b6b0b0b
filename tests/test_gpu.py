"""The CUDA path against the CPU one, on the same tiny random CLIP and a real photo.

These run only where a GPU is present (they skip elsewhere, CI included); run them on a GPU machine with
``python -m pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TINY_LOADABLE_CFG, make_tiny_clip
from test_eval import voc_root  # noqa: F401  (fixture)

from vocabseg import Segmenter
from vocabseg.models.openclip import from_open_clip
from vocabseg.pipeline import postprocess

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CLASSES = ["cat", "grass|lawn", "wall"]
KNOBS = dict(short_side=96, crop=64, stride=32, text_cache=False)
#: Each training-free method with the options the 3-block tiny model needs.
TRAINING_FREE = {"clip": {}, "maskclip": {}, "sclip": {}, "clearclip": {}, "naclip": {},
                 "itaclip": dict(intermediate_layers=(1, 2)), "cliptrase": {},
                 "scclip": dict(pre_adjust_idx=1, post_adjust_idx=0, multi_start_idx=0, multi_end_idx=2),
                 "sfp": dict(pre_adjust_idx=1, post_adjust_idx=0, cross_s=0, cross_e=2), "pearl": {}}


@pytest.fixture(scope="module")
def cuda_clip(tiny_model):
    return from_open_clip(copy.deepcopy(tiny_model).cuda(), name="tiny", source="test")


@pytest.fixture(scope="module")
def photo(chelsea):
    return np.ascontiguousarray(chelsea[::2, ::2])


def _pair(method, clip, cuda_clip, photo, **knobs):
    knobs = {**KNOBS, **knobs}
    cpu = Segmenter(method, models={"clip": clip}, **knobs).segment(photo, CLASSES)
    gpu = Segmenter(method, models={"clip": cuda_clip}, **knobs).segment(photo, CLASSES)
    return cpu, gpu


@pytest.mark.parametrize("method", TRAINING_FREE)
def test_cuda_matches_cpu(method, clip, cuda_clip, photo):
    cpu, gpu = _pair(method, clip, cuda_clip, photo, **TRAINING_FREE[method])
    # cuDNN's default TF32 patch-embedding convolution is the only reduced-precision step
    assert np.abs(gpu.logits - cpu.logits).max() < 5e-3
    assert (gpu.labels == cpu.labels).mean() > 0.99


def test_cuda_pamr_matches_cpu(clip, cuda_clip, photo):
    cpu, gpu = _pair("naclip", clip, cuda_clip, photo, pamr=True)
    assert np.abs(gpu.scores - cpu.scores).max() < 5e-3
    assert (gpu.labels == cpu.labels).mean() > 0.99
    guide = torch.rand(1, 3, 40, 50)
    logits = torch.randn(1, 6, 40, 50)
    expected = postprocess.pamr(guide, logits, 10, (1, 2))
    np.testing.assert_allclose(postprocess.pamr(guide.cuda(), logits.cuda(), 10, (1, 2)).cpu(), expected,
                               atol=1e-5)


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.05), ("fp16", 0.01)])
def test_autocast_stays_close_to_fp32(precision, tolerance, cuda_clip, photo):
    full = Segmenter("sclip", models={"clip": cuda_clip}, **KNOBS).segment(photo, CLASSES)
    reduced = Segmenter("sclip", models={"clip": cuda_clip}, precision=precision, **KNOBS).segment(photo, CLASSES)
    difference = np.abs(reduced.logits - full.logits).max()
    assert 0 < difference < tolerance  # autocast really ran, and the cosines stay close
    assert reduced.logits.dtype == np.float32 and (reduced.labels == full.labels).mean() > 0.95


def test_batched_images_match_one_by_one(cuda_clip, photo):
    seg = Segmenter("sclip", models={"clip": cuda_clip}, **KNOBS)
    images = [photo, np.ascontiguousarray(photo[:, ::-1]), np.ascontiguousarray(photo[10:90])]
    together = seg.segment_batch(images, CLASSES)
    for image, batched in zip(images, together, strict=True):
        alone = seg.segment(image, CLASSES)
        np.testing.assert_allclose(batched.logits, alone.logits, atol=1e-5)


@pytest.mark.parametrize("method, options", [("maft", dict(proposals="slic", input_size=96)),
                                             ("ifseg-clip", dict(knn=True))])
def test_mask_and_image_free_methods_on_cuda(method, options, clip, cuda_clip, photo):
    cpu, gpu = _pair(method, clip, cuda_clip, photo, **options)
    assert gpu.labels.shape == photo.shape[:2]
    assert (gpu.labels == cpu.labels).mean() > 0.98


def test_maft_training_step_on_cuda(tmp_path):
    from test_maft_train import _coco_root

    from vocabseg.cli import main

    weights = tmp_path / "tiny.pt"
    torch.save(make_tiny_clip(seed=1, cfg=TINY_LOADABLE_CFG).state_dict(), weights)
    out = tmp_path / "run"
    assert main(["train", "maft", "--data-root", str(_coco_root(tmp_path)), "--out", str(out), "--weights",
                 str(weights), "--device", "cuda", "--iterations", "2", "--batch-size", "2", "--micro-batch", "1",
                 "--crop-size", "48", "--input-size", "48", "--max-proposals", "6"]) == 0
    state = torch.load(out / "last.pt", weights_only=True, map_location="cpu")
    assert state["iteration"] == 2


def test_ifseg_training_on_cuda(tmp_path):
    from vocabseg.cli import main
    from vocabseg.models.ifseg_head import load_head_checkpoint

    weights = tmp_path / "tiny.pt"
    torch.save(make_tiny_clip(seed=1, cfg=TINY_LOADABLE_CFG).state_dict(), weights)
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nsky\n")
    ckpt = tmp_path / "ifseg.pt"
    assert main(["train", "ifseg-clip", "--classes-file", str(classes), "--weights", str(weights), "--device", "cuda",
                 "--out", str(ckpt), "--iterations", "4", "--batch-size", "2", "--grid", "4", "--width", "32",
                 "--heads", "2", "--layers", "1"]) == 0
    assert load_head_checkpoint(ckpt)["step"] == 4


def test_eval_on_cuda_with_batches_and_workers_matches_cpu(voc_root, clip, cuda_clip):  # noqa: F811
    from vocabseg.data.datasets import get_dataset
    from vocabseg.eval.runner import evaluate

    dataset = get_dataset("voc21", voc_root)
    knobs = dict(preset="voc21", short_side=224, stride=160)
    cpu = evaluate(Segmenter("sclip", models={"clip": clip}, **knobs), dataset, progress=False)
    gpu = evaluate(Segmenter("sclip", models={"clip": cuda_clip}, **knobs), dataset, progress=False, batch_images=2,
                   workers=2)
    agreement = np.trace(np.minimum(cpu.confusion.counts, gpu.confusion.counts)) / np.trace(cpu.confusion.counts)
    assert gpu.images == cpu.images == 3 and agreement > 0.99
    assert 0 <= gpu.info["data_wait_fraction"] <= 1


def test_ifseg_ofa_on_cuda_matches_the_official_labels_and_trains_under_bf16(tmp_path):
    """IFSeg on OFA (the oracle's tiny model): the GPU reproduces the official label map in fp32 and bf16, and the
    image-free training step runs under bf16 autocast."""
    from oracle import assert_labels_agree, golden, oracle_path, voc_rgb

    from vocabseg.cli import main
    from vocabseg.methods.ifseg.ofa_train import load_ofa_checkpoint

    weights = str(oracle_path("ifseg_ofa", "tiny_ifseg_ofa_d64.pt"))
    voc5 = ["person", "bus", "dining table", "potted plant", "tv monitor"]
    expected = golden("ifseg_ofa", "golden_voc.pt")["voc/pred_knn"]
    for precision, minimum in (("fp32", 0.995), ("bf16", 0.95)):
        out = Segmenter("ifseg", weights=weights, device="cuda", precision=precision).segment(
            voc_rgb(), classes=voc5, background=False)
        assert_labels_agree(out.labels, expected, minimum, what=f"labels on CUDA ({precision})")
    classes = tmp_path / "classes.txt"
    classes.write_text("person\nbus\n")
    ckpt = tmp_path / "ifseg.pt"
    assert main(["train", "ifseg", "--classes-file", str(classes), "--weights", weights, "--device", "cuda",
                 "--out", str(ckpt), "--iterations", "2", "--batch-size", "4", "--micro-batch", "2"]) == 0
    state = load_ofa_checkpoint(ckpt)
    assert state["step"] == 2 and state["train_config"]["precision"] == "bf16" and np.isfinite(state["losses"]).all()
