import numpy as np
import pytest
import torch

from vocabseg.methods import registry
from vocabseg.models import encoder as encoder_mod
from vocabseg.models.encoder import Models
from vocabseg.pipeline import preprocess, windows
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.run import run
from vocabseg.text.classes import ClassSpec
from vocabseg.text.classifier import TextClassifier


def test_resized_shape_follows_mmcv_rescale():
    assert preprocess.resized_shape(375, 500, 336) == (336, 448)
    assert preprocess.resized_shape(500, 375, 336) == (448, 336)
    assert preprocess.resized_shape(100, 1000, 336) == (205, 2048)  # long side capped at 2048
    assert preprocess.resized_shape(447, 600, 336) == (336, 451)


def test_sliding_windows_hand_computed():
    boxes = windows.sliding_windows(336, 448, 224, 112)
    starts = sorted({(w.y1, w.x1) for w in boxes})
    assert starts == [(y, x) for y in (0, 112) for x in (0, 112, 224)]
    assert all(w.y2 - w.y1 == 224 and w.x2 - w.x1 == 224 for w in boxes)
    # 300 wide: windows at 0 and 112 would overflow, the last is shifted back inside
    boxes = windows.sliding_windows(224, 300, 224, 112)
    assert [(w.x1, w.x2) for w in boxes] == [(0, 224), (76, 300)]
    # smaller than the crop: one window of the image size
    boxes = windows.sliding_windows(100, 150, 224, 112)
    assert [(w.y1, w.y2, w.x1, w.x2) for w in boxes] == [(0, 100, 0, 150)]


def test_preprocess_normalises_with_clip_constants():
    image = torch.full((20, 30, 3), 200, dtype=torch.uint8)
    x = preprocess.preprocess(image, None)
    clip = encoder_mod.CLIP_NORMALIZATION
    expected = (200 - torch.tensor(clip.mean)) / torch.tensor(clip.std)
    torch.testing.assert_close(x[0, :, 5, 5], expected)
    assert preprocess.preprocess(image, 60).shape == (1, 3, 60, 90)


def _classifier(clip, names=("cat", "dog", "sofa")):
    spec = ClassSpec(labels=tuple(names), names=tuple((n,) for n in names), has_background=False)
    return TextClassifier.build(clip.text, spec)


def _predict(method, clip, image, classifier, protocol):
    return run(method, Models({"clip": clip}), [image], classifier, protocol)[0]


@pytest.mark.parametrize("name", ["sclip", "naclip", "clearclip"])
def test_crop_covering_image_equals_whole_image(name, clip):
    method = registry.create(name)
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    clf = _classifier(clip)
    whole = _predict(method, clip, image, clf, Protocol(short_side=None, crop=None, pamr=False))
    slide = _predict(method, clip, image, clf, Protocol(short_side=None, crop=256, stride=64, pamr=False))
    torch.testing.assert_close(whole.logits, slide.logits)
    assert torch.equal(whole.labels, slide.labels)


def test_batched_windows_equal_one_by_one(clip):
    method = registry.create("sclip")
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    clf = _classifier(clip)
    calls = []

    def crop_logits(crops):
        calls.append(len(crops))
        return method.crop_logits(Models({"clip": clip}), crops, clf.embeddings)

    x = preprocess.preprocess(image, None)
    with torch.no_grad():
        one = windows.dense_logits(crop_logits, x, 64, 16, batch_size=1)
        many = windows.dense_logits(crop_logits, x, 64, 16, batch_size=7)
    count = len(windows.sliding_windows(80, 120, 64, 16))
    assert calls[:count] == [1] * count and max(calls[count:]) == 7
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)


def test_sliding_average_merges_overlaps():
    """With a crop function that returns its window's mean pixel, the merge is the average over windows."""
    image = torch.arange(1 * 1 * 4 * 6, dtype=torch.float32).reshape(1, 1, 4, 6)

    def crop_logits(crops):
        return crops.mean(dim=(2, 3), keepdim=True).expand(-1, 1, *crops.shape[-2:])

    merged = windows.dense_logits(crop_logits, image, crop=4, stride=2)
    window_means = [image[0, 0, :, x:x + 4].mean() for x in (0, 2)]
    assert merged[0, 0, 0] == pytest.approx(float(window_means[0]))
    assert merged[0, 0, 2] == pytest.approx(float(sum(window_means) / 2))
    assert merged[0, 0, 5] == pytest.approx(float(window_means[1]))


def test_stage_timing_is_recorded_only_when_asked(clip, chelsea):
    from vocabseg import Segmenter
    from vocabseg.pipeline import timing

    seg = Segmenter("naclip", models={"clip": clip}, crop=64, stride=32, short_side=96, pamr_steps=1, text_cache=False)
    seg.segment(chelsea, ["cat"])  # no recorder open: nothing to collect, nothing fails
    with timing.record() as times:
        seg.segment(chelsea, ["cat", "sofa"])
    assert {"text", "preprocess", "vit", "upsample", "pamr", "postprocess"} <= set(times)
    assert all(t >= 0 for t in times.values()) and times["vit"] > 0


@pytest.mark.parametrize("method, options", [
    ("sclip", dict(crop=64, stride=32)),
    ("cliptrase", dict(crop=0)),  # its own whole-image encoder
    ("cliptrase", dict(crop=64, stride=32, clustering=False)),
    ("maft", dict(proposals="slic", input_size=96)),  # its own IP-CLIP pass over the proposals
])
def test_reduced_precision_stays_close_to_fp32(method, options, clip, chelsea):
    from vocabseg import Segmenter

    results = {}
    for precision in ("fp32", "bf16"):
        seg = Segmenter(method, models={"clip": clip}, short_side=96, precision=precision, text_cache=False, **options)
        results[precision] = seg.segment(chelsea, ["cat", "wall", "floor"], background=False)
    difference = np.abs(results["fp32"].logits - results["bf16"].logits).max()
    assert results["bf16"].logits.dtype == np.float32
    assert 0 < difference < 0.05  # autocast really ran, and bf16's 8-bit mantissa keeps cosines close


def test_labels_only_skips_the_maps(clip, chelsea):
    from vocabseg import Segmenter

    seg = Segmenter("sclip", models={"clip": clip}, crop=64, stride=32, short_side=96, text_cache=False)
    full = seg.segment(chelsea, ["cat", "wall"])
    lean = seg.segment(chelsea, ["cat", "wall"], maps=False)
    assert lean.scores is None and lean.logits is None and full.scores.shape == (3, *chelsea.shape[:2])
    np.testing.assert_array_equal(lean.labels, full.labels)
    assert lean.labels.dtype == full.labels.dtype == np.uint8


def test_unknown_precision_is_refused(clip):
    from vocabseg import Segmenter

    with pytest.raises(ValueError, match="precision"):
        Segmenter("sclip", models={"clip": clip}, precision="int4")


@pytest.mark.parametrize("crop", [64, 0])
def test_images_batched_together_equal_one_by_one(clip, crop):
    from vocabseg import Segmenter

    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((80, 120, 3), (80, 120, 3), (70, 90, 3))]
    seg = Segmenter("naclip", models={"clip": clip}, short_side=0, crop=crop, stride=32, pamr_steps=2, text_cache=False)
    calls = []
    real = seg.method.crop_logits

    def counting(models, crops, text):
        calls.append(len(crops))
        return real(models, crops, text)

    seg.method.crop_logits = counting
    batched = seg.segment_batch(images, ["cat", "sofa"])
    batched_calls = len(calls)
    single = [seg.segment(image, ["cat", "sofa"]) for image in images]
    assert batched_calls < len(calls) - batched_calls  # windows of different images shared forward passes
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_automatic_window_batch_follows_the_token_budget(clip):
    assert windows.auto_window_batch(clip.image, 224) == windows.CPU_TOKENS_PER_PASS // 197
    assert windows.auto_window_batch(clip.image, 224, views=5) == 1
    assert windows.auto_window_batch(clip.image, 448) == 1
    method = registry.create("sclip")
    models = Models({"clip": clip})
    assert method.windows_per_pass(models, Protocol(window_batch=3), 500) == 3
    assert method.windows_per_pass(models, Protocol(crop=0), 64) == windows.CPU_TOKENS_PER_PASS // 17
