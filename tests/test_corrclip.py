"""CorrCLIP against the official code's outputs (``shared/oracle/corrclip``: tiny CLIP + tiny DINO ViT-B/8, the VOC
photo with CorrCLIP's own pre-generated mask file, ``cfg_voc21`` protocol), end to end through the public API and
stage by stage on the first window; and the region-mask sources."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import (
    assert_close_logits,
    assert_labels_agree,
    golden,
    oracle_class_spec,
    oracle_path,
    tiny_clip_weights,
    voc_rgb,
)

from vocabseg import Segmenter
from vocabseg.methods.corrclip.method import (
    corrclip_branches,
    correct_labels,
    dino_qk_features,
    merge_regions,
    resize_ids,
    scope_attention,
    semantic_layout,
)
from vocabseg.methods.proxyclip.method import dino_input
from vocabseg.models import region_masks
from vocabseg.pipeline import postprocess

RUN = "voc/voc21/"
WIN = RUN + "win0/"
DINO = str(oracle_path("vfm", "tiny_dino_vitb8.pt"))
MASKS = str(oracle_path("corrclip", "masks"))


@pytest.fixture(scope="module")
def gold():
    return golden("corrclip", "golden_corrclip_voc21.pt")


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter("corrclip", weights=str(tiny_clip_weights()), device="cpu", text_cache=False, preset="voc21",
                     models={"dino": DINO}, masks=MASKS)


def _variant(segmenter, **options):
    """Another CorrCLIP on the same models."""
    return Segmenter("corrclip", models=dict(segmenter.models), text_cache=False, preset="voc21", **options)


@pytest.fixture(scope="module")
def spec():
    return oracle_class_spec("corrclip", "names_voc21.txt")


@pytest.fixture(scope="module")
def window(segmenter, gold):
    """The first window (``[0:336, 0:336]`` of the 336x447 input) and its region ids."""
    x = segmenter.method.prepare(segmenter.models, torch.from_numpy(voc_rgb()), segmenter.protocol, "voc").input
    ids = resize_ids(gold[RUN + "instance_mask"].long(), x.shape[-2:])
    return x[:, :, :336, :336], ids[:336, :336]


def test_end_to_end_from_the_image_file(segmenter, spec, gold, one_thread):
    """The masks come from the folder by the image's file stem (``voc.png`` -> ``voc.npz``), as in evaluation."""
    classifier = segmenter.classifier(spec)
    assert_close_logits(classifier.embeddings, gold[RUN + "text_features"], atol=1e-5, what="text classifier")
    out = segmenter.segment(oracle_path("voc.png"), spec)
    per_class = postprocess.max_over_names(gold[RUN + "seg_logits_s2"], gold[RUN + "query_idx"], spec.num_classes)
    assert_close_logits(out.logits[:, ::2, ::2], per_class, what="seg_logits (max over names)")
    assert_labels_agree(out.labels, gold[RUN + "pred"], what="labels after map correction")
    assert out.meta["method_options"]["masks"] == MASKS and out.meta["models"]["dino"]["source"].endswith(".pt")
    raw = segmenter.results([voc_rgb()], spec, image_ids=["voc"])[0]
    assert_close_logits(raw.logits[:, ::2, ::2], gold[RUN + "seg_logits_s2"], what="seg_logits (per query)")


def test_labels_before_map_correction(segmenter, spec, gold, one_thread):
    plain = _variant(segmenter, masks=MASKS, map_correction=False)
    before = plain.segment(voc_rgb(), spec, image_id="voc").labels
    assert_labels_agree(before, gold[RUN + "pred_before_correction"], what="labels before correction")
    ids = torch.from_numpy(np.load(oracle_path("corrclip", "masks", "voc.npz"))["instance_mask"])
    assert torch.equal(ids, gold[RUN + "instance_mask"].long())
    corrected = correct_labels(gold[RUN + "pred_before_correction"].long(), ids)
    assert torch.equal(corrected, gold[RUN + "pred"].long())
    assert int((corrected != gold[RUN + "pred_before_correction"].long()).sum()) == 4041


def test_dino_features_and_mask_merging_of_the_first_window(segmenter, window, gold, one_thread):
    crop, ids = window
    with torch.no_grad():
        dino = segmenter.models.dino
        features, grid = dino_qk_features(dino, dino_input(crop, dino))
    assert grid == (42, 42)
    assert_close_logits(features[0], gold[WIN + "dino_feats"], atol=1e-5, what="DINO q+k features")
    feature_ids = resize_ids(ids, grid)
    assert torch.equal(feature_ids, gold[WIN + "masks_feat"].long())
    merged, distances, labels = merge_regions(feature_ids, gold[WIN + "dino_feats"])
    assert_close_logits(distances, gold[WIN + "dbscan_input"], atol=1e-6, what="DBSCAN input")
    assert labels.tolist() == gold[WIN + "dbscan_labels"].tolist() == [0, 1, 2, 3, 0]
    assert torch.equal(merged, gold[WIN + "masks_merged"].long())
    assert torch.equal(resize_ids(merged, (21, 21)), gold[WIN + "masks_token"].long())


def test_scope_attention_and_branches_of_the_first_window(segmenter, window, gold, one_thread):
    crop, _ = window
    merged = gold[WIN + "masks_merged"].long()
    attention = scope_attention(gold[WIN + "dino_feats"], merged.flatten())
    rows = gold[WIN + "attn_weights_row_idx"]
    assert_close_logits(attention[rows], gold[WIN + "attn_weights_rows"], atol=1e-6, what="scope attention rows")
    assert torch.equal(attention[rows] > 0, gold[WIN + "attn_weights_rows"] > 0)
    regions, attn_mask = semantic_layout(merged, (21, 21))
    assert regions.shape == (5, 21, 21)
    with torch.no_grad():
        streams, mct = corrclip_branches(segmenter.models.clip.image, crop, attention, regions, attn_mask, (42, 42))
    # residual-stream tokens of magnitude ~14 (relative difference ~3e-6)
    assert_close_logits(mct, gold[WIN + "mct_out"], atol=1e-4, what="mask class tokens (last block)")
    assert_close_logits(streams, gold[WIN + "branch_feats"], atol=1e-5, what="main/spatial/semantic streams")
    features = streams[0] + streams[1] + 0.5 * streams[2]
    # the official code sums the streams before the projection (<= 5e-6 apart), on features of magnitude ~5
    assert_close_logits(features, gold[WIN + "image_features"], atol=3e-5, what="image features")


def test_scope_rule_by_hand():
    """Two regions and unsegmented tokens (id 0): same-region pairs, and unsegmented pairs above the mean."""
    features = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    ids = torch.tensor([0, 0, 3, 3, 5, 5])
    attention = scope_attention(features, ids, tau=4.0)
    similarity = features @ features.T
    for i in range(6):
        for j in range(6):
            same = ids[i] == ids[j] and ids[i] != 0
            allowed = same or ((ids[i] == 0 or ids[j] == 0) and similarity[i, j] > similarity.mean())
            assert bool(attention[i, j] > 0) == bool(allowed), (i, j)
    # official: the lowest id is "unsegmented" even when it is a real region; the fix treats only 0 so
    lowest = scope_attention(features, ids + 1)
    fixed = scope_attention(features, ids + 1, lowest_is_unsegmented=False)
    torch.testing.assert_close(lowest, attention)
    assert not torch.equal(fixed > 0, attention > 0)


def test_region_mask_sources(tmp_path):
    image = torch.zeros(4, 5, 3, dtype=torch.uint8)
    ids = np.arange(20).reshape(4, 5) % 3
    np.savez(tmp_path / "photo.npz", instance_mask=ids)
    folder = region_masks.mask_source(str(tmp_path))
    assert torch.equal(folder(image, "photo"), torch.from_numpy(ids))
    with pytest.raises(ValueError, match="needs the image's name"):
        folder(image, None)
    with pytest.raises(ValueError, match="no region masks for image 'other'"):
        folder(image, "other")
    single = region_masks.mask_source(str(tmp_path / "photo.npz"))
    with pytest.raises(ValueError, match=r"are \(4, 5\), the image is \(3, 5\)"):
        single(image[:3], None)
    with pytest.raises(ValueError, match="region masks are needed"):
        region_masks.mask_source("")
    with pytest.raises(ValueError, match="unknown region-mask source 'nowhere'"):
        region_masks.mask_source("nowhere")
    slic = region_masks.mask_source("slic:16")(torch.from_numpy(voc_rgb()), None)
    assert slic.shape == (188, 250) and int(slic.min()) == 1 and 4 <= len(slic.unique()) <= 20


def test_paint_regions_larger_masks_overwrite_smaller():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # area 4
    masks[1, :3, :3] = True  # area 9
    masks[2, 0, 0] = True  # area 1
    ids = region_masks.paint_regions(masks)
    assert ids[0, 0] == 3 and ids[1, 1] == 3 and ids[2, 2] == 3 and ids[3, 3] == 0
    assert set(ids.unique().tolist()) == {0, 3}


def test_a_registered_generator_feeds_corrclip(segmenter, spec, one_thread):
    """The plug-in point for mask generators (SAM and others): ``NAME[:ARGUMENT]``."""
    calls = []

    def halves(argument):
        def source(image, image_id):
            calls.append((argument, image_id, tuple(image.shape)))
            ids = torch.ones(image.shape[:2], dtype=torch.int64)
            ids[:, : image.shape[1] // 2] = 2
            return ids
        return source

    region_masks.register_mask_generator("halves", halves)
    try:
        outputs = [_variant(segmenter, masks="halves:x", map_correction=correction).segment(voc_rgb(), spec)
                   for correction in (True, False)]
    finally:
        region_masks._GENERATORS.pop("halves")
    assert calls == [("x", None, (188, 250, 3))] * 2
    corrected, plain = (out.labels for out in outputs)
    # map correction: the left region takes its most frequent label; the right one (lowest id) is "unsegmented"
    assert (corrected[:, :125] == np.bincount(plain[:, :125].ravel()).argmax()).all()
    assert (corrected[:, 125:] == plain[:, 125:]).all()
    assert outputs[0].meta["method_options"]["masks"] == "halves:x"


def test_missing_masks_is_a_clear_error(segmenter, spec):
    seg = Segmenter("corrclip", models=dict(segmenter.models), text_cache=False)
    with pytest.raises(ValueError, match=r"corrclip: region masks are needed.*--option masks="):
        seg.segment(voc_rgb(), spec)


def test_cli_reads_the_masks_of_each_image_by_its_file_stem(tmp_path):
    import json

    from vocabseg.cli import main

    code = main(["segment", str(oracle_path("voc.png")), "--method", "corrclip", "--preset", "voc21",
                 "--weights", str(tiny_clip_weights()), "--device", "cpu", "--no-text-cache",
                 "--model", f"dino={DINO}", "--option", f"masks={MASKS}", "--out", str(tmp_path)])
    assert code == 0
    sidecar = json.loads((tmp_path / "voc.json").read_text())
    assert sidecar["method"] == "corrclip" and sidecar["models"]["dino"]["source"] == str(Path(DINO).resolve())
    assert len(sidecar["classes"]) == 21 and sidecar["names"][15] == ["people"]  # CorrCLIP's VOC21 names


def test_batched_images_equal_one_by_one(segmenter, one_thread):
    """Two images in one call (their windows share DINO and CLIP passes) give what each gives alone."""
    seg = Segmenter("corrclip", models=dict(segmenter.models), text_cache=False, masks="slic:16", short_side=224,
                    crop=224, stride=112)
    first, second = voc_rgb(), voc_rgb()[::-1, ::-1].copy()[:150]
    together = seg.segment_batch([first, second], ["person", "television monitor"])
    for image, batched in zip((first, second), together, strict=True):
        alone = seg.segment(image, ["person", "television monitor"])
        assert np.abs(alone.logits - batched.logits).max() < 1e-5
        assert np.array_equal(alone.labels, batched.labels)
