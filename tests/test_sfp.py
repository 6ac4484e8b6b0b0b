"""SFP against its official code's golden (tiny seeded CLIP, VOC photo), stage by stage and end to end, and its
outlier test and options against hand computations."""

import pytest
import torch
import torch.nn.functional as F
from harness_parity import (
    PRESET_OF,
    check_labels,
    check_logits,
    check_preset,
    check_text,
    check_windows,
    crop224,
    run_cli,
    segmenter,
)
from oracle import assert_close_logits, golden, golden_meta

from vocabseg.methods.registry import create
from vocabseg.methods.scclip.method import (
    aggregate,
    attention_only_block,
    cosine_similarity_matrix,
    fill_from_neighbours,
    similarity_attention,
    threshold,
)
from vocabseg.methods.scclip.sfp import block_with_attention, salient_outliers, sfp_attention

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = ("sfp", "golden_sfp_voc.pt")
GRID = (14, 14)


@pytest.fixture(scope="module")
def g():
    return golden(*GOLDEN)


def test_presets_are_the_official_configs():
    meta = golden_meta(*GOLDEN)
    check_preset("sfp", meta)
    method = create("sfp")
    assert (method.cross_s, method.cross_e, method.res_cls, method.res_scale, method.outlier_detector) == (
        meta["base_config"]["cross_s"], meta["base_config"]["cross_e"], meta["base_config"]["res_cls"],
        meta["model_constants"]["res_scale"], meta["base_config"]["pm"].lower())


def test_text_classifier(g):
    check_text(segmenter("sfp"), g)


def test_block_outputs_attention_and_outliers(g):
    seg = segmenter("sfp")
    encoder = seg.models.clip.image
    with torch.inference_mode():
        outputs = seg.method.run_recorded(encoder, encoder.embed(crop224()), 10)
        last, attention = block_with_attention(encoder, 10, outputs[-1])
    # the official blocks return attention weights (PyTorch's non-fused path): ~1e-5 relative
    assert_close_logits(torch.cat([*outputs, last]), g["voc/crop/block_outputs"], 2e-4, "block outputs")
    assert_close_logits(attention[0], g["voc/crop/block11_attn"], 1e-4, "block-11 attention")
    outliers = salient_outliers(g["voc/crop/block11_attn"][None])[0]
    rows, cols = g["voc/crop/outlier_rc"].T
    assert sorted(outliers.nonzero().flatten().tolist()) == sorted((rows * 14 + cols).tolist())


def _stages(g):
    """Every stored intermediate recomputed from the stored input of its own stage."""
    encoder = segmenter("sfp").models.clip.image
    rows, cols = g["voc/crop/outlier_rc"].T
    flagged = torch.zeros(1, 196, dtype=torch.bool)
    flagged[0, rows * 14 + cols] = True
    blocks = g["voc/crop/block_outputs"][:, None]
    pre = g["voc/crop/pre_sim_thresholded"][None]
    guide = similarity_attention(pre)
    post = g["voc/crop/post_sim_thresholded"][None]
    fused = torch.stack([*blocks[3:10]]).sum(dim=0)
    q, k, _ = encoder.qkv(11, g["voc/crop/x_pre_aggregated"][None])
    return {
        "x_after_purify": fill_from_neighbours(blocks[10][:, 1:], flagged, GRID),
        "ref_feat": fill_from_neighbours(blocks[8][:, 1:], flagged, GRID),
        "pre_sim_thresholded": threshold(cosine_similarity_matrix(g["voc/crop/ref_feat"][None]), 0.4),
        "x_pre_aggregated": aggregate(g["voc/crop/x_after_purify"][None], pre),
        "last_attn_main": sfp_attention(guide, q, k),
        "x_last_block_attn": attention_only_block(encoder, 11, g["voc/crop/x_pre_aggregated"][None],
                                                  lambda q, k: sfp_attention(guide, q, k)),
        "post_sim_thresholded": threshold(cosine_similarity_matrix(blocks[3][:, 1:]), 0.4),
        "x_post_aggregated": aggregate(g["voc/crop/x_last_block_attn"][None] + 0.3 * blocks[10][:, :1], post),
        "last_attn_sinkhorn": guide[:, None].expand(1, 2, 196, 196),
        "patch_state_attn_out": attention_only_block(encoder, 11, fused[:, 1:], lambda q, k: guide[:, None]),
        "patch_state_aggregated": aggregate(g["voc/crop/patch_state_attn_out"][None] + 0.3 * fused[:, :1], post),
        "tokens": encoder.head(g["voc/crop/x_post_aggregated"][None] + g["voc/crop/patch_state_aggregated"][None]),
    }


@pytest.mark.parametrize("name", ["x_after_purify", "ref_feat", "pre_sim_thresholded", "x_pre_aggregated",
                                  "last_attn_main", "x_last_block_attn", "post_sim_thresholded", "x_post_aggregated",
                                  "last_attn_sinkhorn", "patch_state_attn_out", "patch_state_aggregated", "tokens"])
def test_intermediate_stage(g, name):
    with torch.inference_mode():
        ours = _stages(g)[name][0]
    reference = g[f"voc/crop/{name}"]
    assert_close_logits(ours / reference.abs().max(), reference / reference.abs().max(), 1e-5, name + " (relative)")


def test_crop_features_end_to_end(g):
    seg = segmenter("sfp")
    with torch.inference_mode():
        features, grid = seg.method.patch_features(seg.models.clip.image, crop224())
    assert grid == GRID
    assert_close_logits(features[0], F.normalize(g["voc/crop/tokens"], dim=-1), 1e-5, "crop features")


def test_window_grids_in_one_batch(g):
    check_windows(segmenter("sfp", "voc21"), g["voc/window_boxes"], g["voc/window_logits_grid"])


def test_merged_logits(g):
    check_logits(segmenter("sfp", "voc21"), g["voc/seg_logits_s2"])


@pytest.mark.parametrize("pamr", [False, True])
@pytest.mark.parametrize("protocol", list(PRESET_OF))
def test_label_maps(g, protocol, pamr):
    seg = segmenter("sfp", PRESET_OF[protocol], pamr=pamr, pamr_steps=10, pamr_dilations=(8, 16))
    check_labels(seg, g[f"voc/{protocol}/pred_pamr" if pamr else f"voc/{protocol}/pred"], f"{protocol} pamr={pamr}")


def test_cli_segment_with_options(tmp_path):
    meta = run_cli(tmp_path, "sfp", "--preset", "voc21", "--option", "outlier_detector=lof", "--option", "purify=false")
    assert meta["method"] == "sfp" and meta["classes"] == ["background", "aeroplane", "person"]
    assert meta["method_options"]["outlier_detector"] == "lof" and meta["method_options"]["purify"] is False


# --- hand computations -------------------------------------------------------------------------------------------

def test_salient_outliers_by_hand():
    # 1 class token + 3 patches, one head: class attention to patches 0.2, 0.1, 0.05 (x1.5 = 0.3, 0.15, 0.075);
    # self-attention 0.25, 0.2, 0.01 -> patches 0 and 2 are salient; with count=1 only patch 0 (the larger)
    attention = torch.zeros(1, 1, 4, 4)
    attention[0, 0, 0, 1:] = torch.tensor([0.2, 0.1, 0.05])
    attention[0, 0, 1:, 1:] = torch.diag(torch.tensor([0.25, 0.2, 0.01]))
    assert salient_outliers(attention).tolist() == [[True, False, True]]
    assert salient_outliers(attention, count=1).tolist() == [[True, False, False]]
    assert salient_outliers(attention, boost=1.0).tolist() == [[False, False, True]]


def test_enhanced_attention_rows_are_distributions():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 5, 8, generator=generator), torch.randn(2, 2, 5, 8, generator=generator)
    # a cosine matrix: its diagonal (1) is never below the mean, so no row is empty
    guide = similarity_attention(cosine_similarity_matrix(torch.randn(2, 5, 8, generator=generator)))
    weights = sfp_attention(guide, q, k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 5))


# --- options on a small random CLIP ------------------------------------------------------------------------------

SMALL = dict(pre_adjust_idx=1, post_adjust_idx=0, cross_s=0, cross_e=2)


@pytest.mark.parametrize("options", [{}, {"outlier_detector": "lof"}, {"purify": "false"}])
def test_options_run_and_batches_are_independent(spread_clip, options):
    method = create("sfp", **SMALL, **options)
    crops = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batched, grid = method.patch_features(spread_clip.image, crops)
        single = torch.cat([method.patch_features(spread_clip.image, crop[None])[0] for crop in crops])
    assert grid == (6, 6)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_purify_off_skips_the_repair(spread_clip):
    crops = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        purified, _ = create("sfp", **SMALL).patch_features(spread_clip.image, crops)
        raw, _ = create("sfp", purify=False, **SMALL).patch_features(spread_clip.image, crops)
    assert not torch.allclose(purified, raw)


def test_unknown_outlier_detector_is_a_clear_error():
    with pytest.raises(ValueError, match="outlier_detector"):
        create("sfp", outlier_detector="dbscan")
