"""Parity with the official code: each CLIP method, through ``Segmenter(...).segment``, against the outputs of its
paper's own code in ``../shared/oracle`` (tiny seeded CLIP, the VOC photo; see that folder's README).

For every protocol variant the goldens hold: raw per-class logits (max |diff| <= 1e-4), label maps without and with
PAMR (>= 99.5% equal pixels), and the intermediates (text classifier, one crop's features and grid logits), so a
future mismatch says where it starts. The protocol of each variant is read from the golden's own ``__meta__``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import (
    assert_close_logits,
    assert_labels_agree,
    golden,
    golden_meta,
    oracle_path,
    tiny_clip_weights,
    voc_rgb,
)

from vocabseg import Segmenter
from vocabseg.methods.cliptrase.method import dbscan_labels, denoised_correlation, paper_resize
from vocabseg.models.encoder import OPENAI_NORMALIZATION
from vocabseg.pipeline import postprocess
from vocabseg.pipeline.preprocess import preprocess
from vocabseg.pipeline.run import DenseResult, paste
from vocabseg.pipeline.windows import grid_logits_to_crop
from vocabseg.text.classes import read_classes_file


@pytest.fixture(scope="module")
def oracle_clip():
    """The tiny CLIP loaded through the public weights path (OpenAI-format state dict, architecture inferred)."""
    return Segmenter("sclip", weights=str(tiny_clip_weights()), device="cpu", text_cache=False).models.clip


@pytest.fixture(scope="module")
def voc_names():
    """``names_voc.txt``: line 0 the background names, then 20 classes (synonyms separated by ', ')."""
    lines = read_classes_file(oracle_path("names_voc.txt"))
    return [list(names) for names in lines[1:]], list(lines[0])


@pytest.fixture(scope="module")
def crop224():
    return golden("inputs_voc.pt")["voc/crop224"][None]


def harness_protocol(meta: dict) -> dict:
    """The harness knobs of a golden variant's ``__meta__``."""
    return {
        "short_side": meta["short_side"],
        "crop": meta["slide_crop"] or 0,
        "stride": meta["slide_stride"] or 112,
        "logit_scale": float(meta["logit_scale"]),
        "prob_thd": float(meta["prob_thd"]),
        "area_thd": meta.get("area_thd"),
    }


def per_class(query_logits: torch.Tensor, query_idx: torch.Tensor) -> torch.Tensor:
    """Official per-query maps ``Q,H,W`` -> per-class maximum over names ``C,H,W``."""
    return torch.stack([query_logits[query_idx == c].amax(dim=0) for c in range(int(query_idx.max()) + 1)])


def check_segmenter(segmenter: Segmenter, classes, background, prefix: str, official: dict, pamr_segmenter=None):
    """End-to-end parity of one variant: logits, labels, and labels with PAMR."""
    out = segmenter.segment(voc_rgb(), classes=classes, background=background)
    expected = per_class(official[f"{prefix}seg_logits_s2"], official["voc/query_idx"])
    assert_close_logits(out.logits[:, ::2, ::2], expected, what=f"{prefix} seg_logits")
    assert_labels_agree(out.labels, official[f"{prefix}pred"], what=f"{prefix} pred")
    if pamr_segmenter is not None:
        refined = pamr_segmenter.segment(voc_rgb(), classes=classes, background=background)
        assert_labels_agree(refined.labels, official[f"{prefix}pred_pamr"], what=f"{prefix} pred_pamr")
    return out


# method, golden file, variant (None: the file's only one)
HARNESS_VARIANTS = [
    ("clip", "golden_vanilla_voc.pt", "slide"),
    ("maskclip", "golden_maskclip_clearclip_voc.pt", "slide224"),
    ("sclip", "golden_sclip_voc.pt", None),
    ("clearclip", "golden_clearclip_voc.pt", "slide224"),
    ("clearclip", "golden_clearclip_voc.pt", "official448"),
    ("naclip", "golden_naclip_voc.pt", "slide"),
    ("naclip", "golden_naclip_voc.pt", "whole"),
]


@pytest.mark.parametrize("method, file, variant", HARNESS_VARIANTS,
                         ids=[f"{m}-{v or 'voc'}" for m, _, v in HARNESS_VARIANTS])
def test_harness_methods_match_official_code(method, file, variant, oracle_clip, voc_names):
    official = golden(file)
    meta = golden_meta(file)["voc" if variant is None else f"voc/{variant}"]
    knobs = harness_protocol(meta)
    options = {"gaussian_std": meta["gaussian_std"]} if method == "naclip" else {}
    make = lambda pamr: Segmenter(method, models={"clip": oracle_clip}, text_cache=False, pamr=pamr,  # noqa: E731
                                  **knobs, **options)
    prefix = "voc/" if variant is None else f"voc/{variant}/"
    classes, background = voc_names
    check_segmenter(make(False), classes, background, prefix, official, pamr_segmenter=make(True))


@pytest.mark.parametrize("method, file", sorted({(m, f) for m, f, _ in HARNESS_VARIANTS}))
def test_harness_intermediates_match_official_code(method, file, oracle_clip, voc_names, crop224):
    """The text classifier and one 224 crop's features and grid logits, before any merging."""
    official = golden(file)
    segmenter = Segmenter(method, models={"clip": oracle_clip}, text_cache=False)
    classifier = segmenter.classifier(segmenter.class_spec(*voc_names))
    assert torch.equal(classifier.query_class, official["voc/query_idx"])
    assert_close_logits(classifier.embeddings, official["voc/text_features"], atol=1e-6, what="text_features")
    with torch.inference_mode():
        features, grid = segmenter.method.patch_features(oracle_clip.image, crop224)
    tokens = official["voc/crop_tokens"]
    assert_close_logits(features[0], F.normalize(tokens[-grid[0] * grid[1]:], dim=-1), what="crop features")
    grid_logits = (features[0] @ classifier.embeddings.T).T.reshape(-1, *grid)
    assert_close_logits(grid_logits, official["voc/crop_logits_grid"], what="crop_logits_grid")


@pytest.mark.parametrize("variant", ["aux_off", "aux_on"])
def test_itaclip_matches_official_code(variant, oracle_clip, voc_names, crop224):
    """Image engineering (5 views), intermediate attention maps, aux-text mixing, closing; with and without PAMR."""
    official = golden("golden_itaclip_voc.pt")
    meta = golden_meta("golden_itaclip_voc.pt")[f"voc/{variant}"]
    options = {
        "intermediate_layers": tuple(meta["intermediate_layers"]),
        "img_eng_coefficient": meta["img_eng_coefficient"],
        "aux_coefficient": meta["def_coefficient"],
        "aux_texts": str(oracle_path(meta["auxiliary_text"])) if meta["auxiliary_text"] else None,
    }
    make = lambda pamr: Segmenter("itaclip", models={"clip": oracle_clip}, text_cache=False,  # noqa: E731
                                  pamr=pamr, **harness_protocol(meta), **options)
    segmenter = make(False)
    classifier = segmenter.classifier(segmenter.class_spec(*voc_names))
    assert_close_logits(classifier.embeddings, official[f"voc/{variant}/text_features"], atol=1e-6,
                        what="mixed text_features")
    check_segmenter(segmenter, *voc_names, f"voc/{variant}/", official, pamr_segmenter=make(True))
    if variant == "aux_on":  # one crop through the architecture alone (no image engineering)
        with torch.inference_mode():
            features, grid = segmenter.method.patch_features(oracle_clip.image, crop224)
        assert_close_logits(features[0], F.normalize(official["voc/crop_tokens"][1:], dim=-1), what="crop features")
        grid_logits = (features[0] @ classifier.embeddings.T).T.reshape(-1, *grid)
        assert_close_logits(grid_logits, official["voc/aux_on/crop_logits_grid"], what="crop_logits_grid")


def test_maskclip_official_protocol_matches_its_own_code(oracle_clip, voc_names, crop224):
    """MaskCLIP's repository: mmseg ViT numerics, ImageNet normalisation, short side 512, corner padding, 85
    templates, argmax; PAMR as glue on its ori-size logits."""
    official = golden("golden_maskclip_voc.pt")
    meta = golden_meta("golden_maskclip_voc.pt")["voc"]
    classes = [names[0] for names in voc_names[0]]  # the first name of each class, no background
    make = lambda pamr: Segmenter("maskclip", models={"clip": oracle_clip}, text_cache=False,  # noqa: E731
                                  preset="voc20-official", pamr=pamr)
    segmenter = make(False)
    assert segmenter.protocol.short_side == meta["short_side"] and not segmenter.protocol.crop
    classifier = segmenter.classifier(segmenter.class_spec(classes, background=False))
    assert_close_logits(classifier.embeddings, official["voc/text_features"], atol=1e-6, what="text_features")
    out = segmenter.segment(voc_rgb(), classes=classes, background=False)
    assert_close_logits(out.logits[:, ::2, ::2], official["voc/seg_logits_s2"], what="seg_logits")
    assert_labels_agree(out.labels, official["voc/pred"], what="pred")
    refined = make(True).segment(voc_rgb(), classes=classes, background=False)
    assert_labels_agree(refined.labels, official["voc/pred_pamr"], what="pred_pamr")
    with torch.inference_mode():
        features, grid = segmenter.method.patch_features(oracle_clip.image, crop224)
    assert_close_logits(features[0].T.reshape(-1, *grid), official["voc/crop_feat"], what="crop_feat")
    grid_logits = (features[0] @ classifier.embeddings.T).T.reshape(-1, *grid)
    assert_close_logits(grid_logits, official["voc/crop_logits_grid"], what="crop_logits_grid")


def test_maskclip_official_protocol_differs_from_the_harness_variant(oracle_clip):
    """The mmseg numerics are a real change (the README quotes up to 0.018 on normalised features)."""
    crops = golden("inputs_voc.pt")["voc/crop224"][None]
    harness = Segmenter("maskclip", models={"clip": oracle_clip}, text_cache=False).method
    own = Segmenter("maskclip", models={"clip": oracle_clip}, text_cache=False, preset="voc20-official").method
    with torch.inference_mode():
        difference = (harness.patch_features(oracle_clip.image, crops)[0]
                      - own.patch_features(oracle_clip.image, crops)[0]).abs().max()
    assert difference > 1e-3


def test_cliptrase_matches_its_own_protocol(oracle_clip, voc_names, crop224):
    """CLIPtrase's standalone script: PIL bicubic resize and centre crop to 224, its encoder, block-11 correlation,
    DBSCAN, cluster maps and majority vote. Background is CLIPtrase's last label (20); vocabseg's is 0."""
    official = golden("golden_cliptrase_voc.pt")
    meta = golden_meta("golden_cliptrase_voc.pt")["voc"]
    segmenter = Segmenter("cliptrase", models={"clip": oracle_clip}, text_cache=False,
                          preset=f"voc21-{meta['image_size']}")
    assert (segmenter.method.eps, segmenter.method.min_samples) == (meta["eps"], meta["min_samples"])
    classes = [names[0] for names in voc_names[0]]
    spec = segmenter.class_spec(classes, background=voc_names[1])
    classifier = segmenter.classifier(spec)
    background = meta["n_labels"]
    text = official["voc/text_features"]  # the 20 labels, then the background names
    assert_close_logits(classifier.embeddings, torch.cat([text[background:], text[:background]]), atol=1e-6,
                        what="text_features")

    # stage by stage on the official input
    resized, _ = paper_resize(torch.from_numpy(voc_rgb()), meta["image_size"], center_crop=True)
    inputs = preprocess(resized, None, normalization=OPENAI_NORMALIZATION)
    assert_close_logits(inputs[0], official["voc/input224"], atol=1e-5, what="input224")
    with torch.inference_mode():
        features, grid, correlation = segmenter.method.encode(oracle_clip.image, inputs, correlation=True)
        crop_tokens, _, crop_correlation = segmenter.method.encode(oracle_clip.image, crop224, correlation=True)
    assert_close_logits(features[0], official["voc/visual_features"], what="visual_features")
    assert_close_logits(correlation[0], official["voc/semantic_corr_block11"], what="semantic_corr_block11")
    rows = denoised_correlation(correlation[0])
    assert_close_logits(rows, official["voc/dbscan_input"], what="dbscan_input")
    assert_same_partition(torch.from_numpy(dbscan_labels(rows, meta["eps"], meta["min_samples"])),
                          official["voc/dbscan_labels"])
    assignment = segmenter.method.clusters(correlation[0], grid, (224, 224))[0]
    assert_same_partition(assignment, official["voc/cluster_assign"])
    patch_logits = grid_logits_to_crop(features[:, 1:] @ classifier.embeddings.T, grid, (224, 224))[0]
    before_vote = patch_logits.argmax(dim=0)
    before_vote = torch.where(before_vote < len(voc_names[1]), background, before_vote - len(voc_names[1]))
    assert_labels_agree(before_vote, official["voc/pred_before_vote"], what="pred_before_vote")
    assert_close_logits(crop_tokens[0], F.normalize(official["voc/crop_tokens"], dim=-1), what="crop features")
    assert_close_logits(crop_correlation[0], official["voc/crop_semantic_corr_block11"], what="crop correlation")

    # end to end through the public API, mapped back onto the original photo as vocabseg reports it
    out = segmenter.segment(voc_rgb(), classes=spec)
    pred = official["voc/pred"].long()
    pred = torch.where(pred == background, 0, pred + 1)  # CLIPtrase's labels -> vocabseg's (background first)
    logits = official["voc/patch_logits"] / meta["logit_scale_exp"]
    logits = torch.cat([logits[background:], logits[:background]])
    region = segmenter.method.prepare(segmenter.models, torch.from_numpy(voc_rgb()), segmenter.protocol).region
    pasted = paste(DenseResult(pred, lambda: (logits, logits)), region, voc_rgb().shape[:2])
    expected = postprocess.max_over_names(pasted.logits, classifier.query_class, spec.num_classes)
    assert_close_logits(out.logits, expected, what="patch_logits (pasted)")
    assert_labels_agree(out.labels, pasted.labels, what="pred (pasted)")
    assert out.masks.shape[0] == meta["n_clusters"]


def assert_same_partition(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal label maps up to a relabelling of the clusters."""
    pairs = torch.unique(torch.stack([ours.flatten().long(), theirs.flatten().long()]), dim=1)
    assert pairs.shape[1] == len(torch.unique(ours)) == len(torch.unique(theirs)), "cluster partitions differ"


def test_pamr_matches_official_code():
    official = golden("golden_pamr.pt")
    meta = golden_meta("golden_pamr.pt")
    refined = postprocess.pamr(official["image"][None], official["mask_in"][None], meta["num_iter"],
                               tuple(meta["dilations"]))[0]
    assert_close_logits(refined, official["mask_out"], atol=1e-6, what="PAMR")


def test_resize_is_mmcv_bit_exact():
    """The mmcv rescale (cv2 INTER_LINEAR on the uint8 image) then CLIP normalisation reproduce ``x336`` exactly."""
    inputs = golden("inputs_voc.pt")
    assert np.array_equal(inputs["voc/rgb_uint8"].numpy(), voc_rgb())
    x = preprocess(inputs["voc/rgb_uint8"], 336)
    assert torch.equal(x[0], inputs["voc/x336"])
