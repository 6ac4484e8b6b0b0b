"""Trident against the official code's outputs (``shared/oracle/trident``: tiny CLIP + tiny DINO ViT-B/16 + tiny SAM
ViT-B encoder, VOC photo, ``cfg_voc21`` protocol), end to end through the public API and stage by stage.

The SAM branch (the slow part: two global blocks over 64x64 cells) runs once: the end-to-end run records it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import (
    assert_close_logits,
    assert_labels_agree,
    golden,
    golden_meta,
    oracle_class_spec,
    oracle_path,
    tiny_clip_weights,
    voc_rgb,
)

from vocabseg import Segmenter
from vocabseg.methods.proxyclip.method import dino_patch_tokens, proxy_similarity
from vocabseg.methods.registry import create
from vocabseg.methods.trident import method as trident_module
from vocabseg.methods.trident.method import (
    guided_tokens,
    official_query_class,
    splice_windows,
    trident_resize,
    window_tokens,
)
from vocabseg.models.sam import SamModel
from vocabseg.pipeline import postprocess, windows
from vocabseg.pipeline.preprocess import resize_uint8

RUN = "voc/voc21/"
DINO = str(oracle_path("vfm", "tiny_dino_vitb16.pt"))
SAM_ENCODER = str(oracle_path("vfm", "tiny_sam_vitb_image_encoder.pt"))


@pytest.fixture(scope="module")
def gold():
    return golden("trident", "golden_trident_voc21.pt")


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter("trident", weights=str(tiny_clip_weights()), device="cpu", text_cache=False, preset="voc21",
                     models={"dino": DINO, "sam": SAM_ENCODER})


@pytest.fixture(scope="module")
def spec():
    return oracle_class_spec("trident", "names_voc21.txt")


@pytest.fixture(scope="module")
def run(segmenter, spec):
    """One end-to-end run through the public API, with the SAM branch's output recorded."""
    recorded = {}
    original, original_qkv = trident_module.sam_branches, SamModel.qkv

    def recording(*args, **kwargs):
        branches = original(*args, **kwargs)
        recorded["branch"] = branches[0]
        return branches

    def recording_qkv(self, index, x):
        recorded["qkv"] = original_qkv(self, index, x)
        return recorded["qkv"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trident_module, "sam_branches", recording)
        patch.setattr(SamModel, "qkv", recording_qkv)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models: a second thread only adds contention on a loaded machine
        try:
            out = segmenter.segment(voc_rgb(), spec)
        finally:
            torch.set_num_threads(threads)
    return out, recorded


@pytest.fixture(scope="module")
def inputs(segmenter):
    """The CLIP/DINO input: mmcv resize to 448, then ``preprocess_image`` to 464x608."""
    return segmenter.method.prepare(segmenter.models, torch.from_numpy(voc_rgb()), segmenter.protocol).input


def test_end_to_end_logits_and_labels(segmenter, spec, gold, run):
    classifier = segmenter.classifier(spec)
    assert_close_logits(classifier.embeddings, gold[RUN + "text_features"], atol=1e-5, what="text classifier")
    assert classifier.query_class.tolist() == gold[RUN + "query_idx"].tolist()
    out, _ = run
    per_class = postprocess.max_over_names(gold[RUN + "seg_logits_s2"], gold[RUN + "query_idx"], spec.num_classes)
    assert_close_logits(out.logits[:, ::2, ::2], per_class, what="seg_logits (max over names)")
    assert_labels_agree(out.labels, gold[RUN + "pred"])
    helpers = out.meta["models"]
    assert helpers["sam"]["source"].endswith("tiny_sam_vitb_image_encoder.pt")
    assert helpers["dino"]["source"].endswith("tiny_dino_vitb16.pt")


def test_sam_values_attention_and_guidance(gold, run, segmenter):
    _, recorded = run
    branch = recorded["branch"]
    meta = golden_meta("trident", "golden_trident_voc21.pt")[RUN.rstrip("/")]
    assert list(branch.input_size) == meta["sam_input_size"] and list(branch.grid) == meta["sam_valid_hw"]
    assert_close_logits(branch.v.reshape(gold[RUN + "sam_v"].shape), gold[RUN + "sam_v"], what="SAM values")
    rows = gold[RUN + "guidance_weights_row_idx"]
    assert_close_logits(branch.guidance[rows], gold[RUN + "guidance_weights_rows"], atol=1e-6,
                        what="guidance rows")
    # the SAM attention rows, from the last block's recorded q and k
    sam = segmenter.models.sam
    q, k, _ = recorded["qkv"]
    with torch.inference_mode():
        attention = sam.attention_logits(len(sam.blocks) - 1, q, k, (64, 64), rows=branch.grid).softmax(-1)
    keep = torch.arange(64 * 64).view(64, 64)[:48, :64].flatten()
    attn_rows = attention[0][:, gold[RUN + "sam_attn_row_idx"]][:, :, keep]
    assert_close_logits(attn_rows, gold[RUN + "sam_attn_rows"], atol=1e-6, what="SAM attention rows")


def test_windows_dino_proxy_and_splice(segmenter, inputs, gold, run):
    method, clip = segmenter.method, segmenter.models.clip.image
    protocol = segmenter.protocol
    assert tuple(inputs.shape[-2:]) == (464, 608)
    crops_windows = windows.sliding_windows(464, 608, protocol.crop, protocol.stride)
    cells = [(w.y1 // 16, w.x1 // 16, w.y2 // 16, w.x2 // 16) for w in crops_windows]
    assert cells == [tuple(c) for c in gold[RUN + "patch_locs"].tolist()]
    crops = torch.cat([inputs[:, :, w.y1:w.y2, w.x1:w.x2] for w in crops_windows])
    with torch.inference_mode():
        proxy, _ = dino_patch_tokens(segmenter.models.dino, crops)
        assert_close_logits(proxy[0].T.reshape(128, 21, 21), gold[RUN + "dino_feats_win0"], what="DINO window 0")
        tokens = window_tokens(clip, crops, proxy, proxy_similarity(proxy).mean())
        assert torch.allclose(method.spliced_tokens(segmenter.models, [inputs], protocol)[0],
                              splice_windows(tokens, cells, (29, 38)), atol=1e-5)
        assert_close_logits(tokens[0], gold[RUN + "custom_attn_out_win0"], what="proxy attention output, window 0")
        spliced = splice_windows(tokens, cells, (29, 38))
        branch = run[1]["branch"]
        features = clip.head(guided_tokens(spliced, branch.guidance, branch.grid))
    # the stored tensor is unit-length: the official code normalises encode_image's output in place
    # (``clip_features /= clip_features.norm(...)``) after the recorder kept a reference to it
    assert_close_logits(F.normalize(features, dim=-1), gold[RUN + "clip_features"], what="clip_features (unit)")


def test_forward_passes_count_the_official_windows(segmenter, gold):
    assert segmenter.method.forward_passes(188, 250, segmenter.protocol) == len(gold[RUN + "patch_locs"])


def test_official_class_merge_shifts_foreground_synonyms():
    assert official_query_class(23, 21).tolist() == [0, 0, 0, *range(1, 21)]
    # a foreground synonym (class 1 with two names) lands in class 0 and shifts every later class
    assert official_query_class(4, 3).tolist() == [0, 0, 1, 2]


def test_splice_averages_overlaps():
    tokens = torch.stack([torch.full((4, 1), 1.0), torch.full((4, 1), 3.0)])
    spliced = splice_windows(tokens, [(0, 0, 2, 2), (0, 1, 2, 3)], (2, 3))
    assert spliced[0].tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]


def test_trident_resize_rounds_sides_to_cells():
    assert tuple(trident_resize(torch.zeros(1, 3, 448, 596), 336).shape[-2:]) == (464, 608)
    assert tuple(trident_resize(torch.zeros(1, 3, 336, 447), 336).shape[-2:]) == (336, 448)
    assert tuple(trident_resize(torch.zeros(1, 3, 320, 480), 336).shape[-2:]) == (320, 480)  # already on cells


# --- SAM refinement (no golden: the official run skipped it; checked against segment-anything's SamPredictor) ----

@pytest.fixture(scope="module")
def refinement_case():
    from vocabseg.models.sam import SamConfig, SamModel, build_model, infer_config

    torch.manual_seed(0)
    model = build_model(SamConfig(embed_dim=48, depth=2, num_heads=6, global_attn_indexes=(1,), window_size=7,
                                  img_size=256, out_chans=32))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.2)
    sam = SamModel(model, infer_config(model.state_dict()))
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    labels = torch.zeros(60, 90, dtype=torch.long)
    labels[10:40, 10:40], labels[30:55, 50:85] = 1, 2
    probs = torch.full((3, 60, 90), 0.1)
    probs[0] = 0.8
    probs[:, labels > 0] = 0.1
    probs[1][labels == 1], probs[2][labels == 2] = 0.7, 0.9
    return sam, image, labels, probs


def _predictor(sam, image):
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam.model)
    predictor.set_image(resize_uint8(image, (64, 96)).numpy())  # sides rounded up to 16, as Trident
    return predictor


def test_refinement_scores_follow_sam_predictor(refinement_case):
    """Every region passes (threshold -inf): each class's refined score is max over its regions of
    sigmoid(mask logit) * p inside the masks, with the decoder prompted as the official code prompts
    ``SamPredictor.predict_torch`` (points and boxes mapped from the half-resolution grid, unbatched mask input)."""
    from vocabseg.methods.trident.method import class_regions, mask_prompt, refine_with_sam

    sam, image, labels, probs = refinement_case
    predictor = _predictor(sam, image)
    sizes = (predictor.input_size, predictor.original_size)
    with torch.inference_mode():
        refined_labels, refined = refine_with_sam(sam, predictor.features, sizes, labels, probs, 0.2, 20,
                                                  float("-inf"))
        small = (30, 45)
        labels_small = torch.nn.functional.interpolate(labels[None, None].float(), size=small, mode="nearest")[0, 0]
        probs_small = torch.nn.functional.interpolate(probs[None], size=small, mode="bilinear")[0]
        regions = class_regions(labels_small.long(), probs_small, 0.2, 20)
        assert sorted(regions) == [0, 1, 2]
        expected = torch.zeros_like(probs)
        for c, found in regions.items():
            points = predictor.transform.apply_coords_torch(found.points[:, None].long(), list(small))
            boxes = predictor.transform.apply_boxes_torch(found.boxes.long(), list(small))
            _, _, low_res = predictor.predict_torch(point_coords=points, point_labels=torch.ones(len(points), 1),
                                                    boxes=boxes, mask_input=mask_prompt(probs_small[c], (60, 90),
                                                                                        0.2, 0.005, 64),
                                                    multimask_output=False)
            logits = sam.model.postprocess_masks(low_res, *sizes)
            logits = torch.nn.functional.interpolate(logits, size=(60, 90), mode="bilinear")[:, 0]
            expected[c] = (logits.sigmoid() * probs[c]).amax(0) * (logits > 0).any(0)
    assert torch.allclose(refined, expected, atol=1e-6)
    claimed = expected.sum(0) > 0
    assert torch.equal(refined_labels[claimed], expected.argmax(0)[claimed])
    assert torch.equal(refined_labels[~claimed], labels[~claimed])


def test_refinement_with_failed_regions_keeps_labels(refinement_case):
    """No mask passes (threshold +inf): labels stay; scores rise to the coarse ones inside the failed regions."""
    from vocabseg.methods.trident.method import refine_with_sam

    sam, image, labels, probs = refinement_case
    predictor = _predictor(sam, image)
    with torch.inference_mode():
        refined_labels, refined = refine_with_sam(sam, predictor.features, (predictor.input_size,
                                                  predictor.original_size), labels, probs, 0.2, 20, float("inf"))
    assert torch.equal(refined_labels, labels) and torch.equal(refined, probs)  # no region survived: unchanged


def test_refinement_option_needs_the_mask_decoder(segmenter):
    assert create("trident", sam_refinement="true").sam_refinement is True
    assert segmenter.method.sam_refinement is False
    with pytest.raises(ValueError, match="prompt encoder and mask decoder"):
        Segmenter("trident", models={"clip": segmenter.models.clip, "dino": DINO, "sam": SAM_ENCODER},
                  text_cache=False, preset="voc21-refined")


def test_batched_images_equal_one_by_one(segmenter, refinement_case, tmp_path):
    """Two images in one call (SAM passes and windows shared) give what each gives alone, with the refinement."""
    sam, _, _, _ = refinement_case
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.model.state_dict(), path)
    trident = Segmenter("trident", models={"clip": segmenter.models.clip, "dino": DINO, "sam": str(path)},
                        text_cache=False, short_side=336, crop=336, stride=112, sam_refinement=True,
                        sam_iou_thresh=-1.0)
    first, second = voc_rgb(), voc_rgb()[::-1, ::-1].copy()[:150]
    together = trident.segment_batch([first, second], ["person", "television monitor"])
    for image, batched in zip((first, second), together, strict=True):
        alone = trident.segment(image, ["person", "television monitor"])
        assert np.abs(alone.logits - batched.logits).max() < 1e-5
        assert np.abs(alone.scores - batched.scores).max() < 1e-5
        assert np.array_equal(alone.labels, batched.labels)


def test_batched_mask_prompt_option_changes_the_prompt(refinement_case):
    """The official unbatched mask prompt and SAM's intended batched one give different mask-decoder inputs (SAM's
    LayerNorm2d normalises an unbatched map over rows), hence different refined scores."""
    from vocabseg.methods.trident.method import refine_with_sam

    sam, image, labels, probs = refinement_case
    predictor = _predictor(sam, image)
    sizes = (predictor.input_size, predictor.original_size)
    with torch.inference_mode():
        _, official = refine_with_sam(sam, predictor.features, sizes, labels, probs, 0.2, 20, float("-inf"))
        _, batched = refine_with_sam(sam, predictor.features, sizes, labels, probs, 0.2, 20, float("-inf"),
                                     batched_mask_prompt=True)
    assert not torch.allclose(official, batched, atol=1e-4)
