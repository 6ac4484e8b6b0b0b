"""SC-CLIP against its official code's golden (tiny seeded CLIP, VOC photo), stage by stage and end to end, and
its tensor functions against hand computations."""

import math

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
    class_free_clip,
    crop224,
    run_cli,
    segmenter,
)
from oracle import assert_close_logits, golden, golden_meta

from vocabseg import Segmenter
from vocabseg.errors import UsageError
from vocabseg.methods.registry import create
from vocabseg.methods.scclip.method import (
    aggregate,
    attention_only_block,
    cosine_similarity_matrix,
    fill_from_neighbours,
    lof_scores,
    official_positions,
    scclip_attention,
    similarity_attention,
    threshold,
    top_outliers,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = ("scclip", "golden_scclip_voc.pt")
GRID = (14, 14)


@pytest.fixture(scope="module")
def g():
    return golden(*GOLDEN)


def test_presets_are_the_official_configs():
    check_preset("scclip", golden_meta(*GOLDEN))
    assert segmenter("scclip", "cityscapes").protocol.short_side == 560


def test_text_classifier(g):
    check_text(segmenter("scclip"), g)


def test_block_outputs_and_anomaly_tokens(g):
    seg = segmenter("scclip")
    encoder = seg.models.clip.image
    with torch.inference_mode():
        outputs = seg.method.run_recorded(encoder, encoder.embed(crop224()), 11)
    # the official blocks run PyTorch's fused attention path, ours the explicit one: ~1e-5 relative
    assert_close_logits(torch.cat(outputs), g["voc/crop/block_outputs"], 2e-4, "block outputs")
    assert_close_logits(outputs[-1][0, 1:], g["voc/crop/lof_input"], 2e-4, "LOF input")
    scores = lof_scores(g["voc/crop/lof_input"][None])[0]
    assert_close_logits(scores, g["voc/crop/lof_scores"], 1e-5, "LOF scores")
    flagged = top_outliers(scores[None])[0]
    assert flagged.nonzero().flatten().tolist() == g["voc/crop/lof_outlier_idx"].tolist()


def _stages(g):
    """Every stored intermediate recomputed from the stored input of its own stage."""
    encoder = segmenter("scclip").models.clip.image
    flagged = torch.zeros(1, 196, dtype=torch.bool)
    flagged[0, g["voc/crop/lof_outlier_idx"]] = True
    blocks = g["voc/crop/block_outputs"][:, None]
    mid = g["voc/crop/mid_simi"][None]
    guide = similarity_attention(mid)
    post = g["voc/crop/after_simi_thresholded"][None]
    cls11 = blocks[10][:, :1]
    fused = sum(blocks[3:10])
    k_main = encoder.qkv(11, g["voc/crop/x_pre_aggregated"][None])[1]
    k_multi = encoder.qkv(11, fused[:, 1:])[1]

    def weights(q, k):
        return scclip_attention(guide, k)

    return {
        "x_after_lof": fill_from_neighbours(g["voc/crop/lof_input"][None], flagged, GRID),
        "pre_adjust_feats": fill_from_neighbours(blocks[8][:, 1:], flagged, GRID),
        "mid_simi": cosine_similarity_matrix(g["voc/crop/pre_adjust_feats"][None]),
        "before_simi_thresholded": threshold(mid, 0.4),
        "x_pre_aggregated": aggregate(g["voc/crop/x_after_lof"][None], g["voc/crop/before_simi_thresholded"][None]),
        "last_attn_main": scclip_attention(guide, k_main),
        "x_last_block_attn": attention_only_block(encoder, 11, g["voc/crop/x_pre_aggregated"][None], weights),
        "after_simi_thresholded": threshold(cosine_similarity_matrix(blocks[3][:, 1:]), 0.4),
        "x_post_aggregated": aggregate(g["voc/crop/x_last_block_attn"][None] + 0.3 * cls11, post),
        "last_attn_multi": scclip_attention(guide, k_multi),
        "multi_attn_out": attention_only_block(encoder, 11, fused[:, 1:], weights),
        "re_feats_aggregated": aggregate(g["voc/crop/multi_attn_out"][None] + 0.3 * fused[:, :1], post),
        "tokens": encoder.head(g["voc/crop/x_post_aggregated"][None] + g["voc/crop/re_feats_aggregated"][None]),
    }


@pytest.mark.parametrize("name", ["x_after_lof", "pre_adjust_feats", "mid_simi", "before_simi_thresholded",
                                  "x_pre_aggregated", "last_attn_main", "x_last_block_attn", "after_simi_thresholded",
                                  "x_post_aggregated", "last_attn_multi", "multi_attn_out", "re_feats_aggregated",
                                  "tokens"])
def test_intermediate_stage(g, name):
    with torch.inference_mode():
        ours = _stages(g)[name][0]
    reference = g[f"voc/crop/{name}"]
    assert_close_logits(ours / reference.abs().max(), reference / reference.abs().max(), 1e-5, name + " (relative)")


def test_crop_features_end_to_end(g):
    seg = segmenter("scclip")
    with torch.inference_mode():
        features, grid = seg.method.patch_features(seg.models.clip.image, crop224())
    assert grid == GRID
    assert_close_logits(features[0], F.normalize(g["voc/crop/tokens"], dim=-1), 1e-5, "crop features")


def test_window_grids_in_one_batch(g):
    check_windows(segmenter("scclip", "voc21"), g["voc/window_boxes"], g["voc/window_logits_grid"])


def test_merged_logits(g):
    check_logits(segmenter("scclip", "voc21"), g["voc/seg_logits_s2"])


@pytest.mark.parametrize("pamr", [False, True])
@pytest.mark.parametrize("protocol", list(PRESET_OF))
def test_label_maps(g, protocol, pamr):
    seg = segmenter("scclip", PRESET_OF[protocol], pamr=pamr, pamr_steps=10, pamr_dilations=(8, 16))
    check_labels(seg, g[f"voc/{protocol}/pred_pamr" if pamr else f"voc/{protocol}/pred"], f"{protocol} pamr={pamr}")


def test_cli_segment_with_options(tmp_path):
    meta = run_cli(tmp_path, "scclip", "--preset", "coco-object", "--option", "exact_outlier_positions=true")
    assert meta["method"] == "scclip" and meta["classes"] == ["background", "aeroplane", "person"]
    assert meta["method_options"]["exact_outlier_positions"] is True and meta["protocol"]["prob_thd"] == 0.35


# --- hand computations -------------------------------------------------------------------------------------------

def test_lof_of_three_points_on_a_line():
    # points 0, 1, 3; k = 1. Squared distances: d(0,1) = 1, d(1,3) = 4. Nearest neighbours: 0->1, 1->0, 3->1;
    # k-distances 1, 1, 4; densities k / k-dist = 1, 1, 0.25; LOF = density(nn) / density = 1, 1, 4.
    points = torch.tensor([[[0.0], [1.0], [3.0]]])
    torch.testing.assert_close(lof_scores(points, n_neighbors=1), torch.tensor([[1.0, 1.0, 4.0]]))


def test_lof_reachability_is_the_query_k_distance():
    # points 0, 1, 2, 10 with k = 2: the k-distance of 10 is d(10, 1) = 81; its neighbours 2 and 1 have k-distances
    # 4 and 1, so LOF(10) = mean(81 / 4, 81 / 1) (the official reachability; the textbook one would give ~1.02)
    points = torch.tensor([[[0.0], [1.0], [2.0], [10.0]]])
    assert math.isclose(float(lof_scores(points, n_neighbors=2)[0, 3]), (81 / 4 + 81 / 1) / 2, rel_tol=1e-6)


def test_outliers_are_strictly_above_the_linear_quantile():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 5.0, 1.0, 1.0, 1.0]])
    # 0.8-quantile: 4.2 (first row), 5.0 (second row: nothing is strictly above)
    assert top_outliers(scores, 0.2).tolist() == [[False] * 4 + [True], [False] * 5]


def test_fill_from_neighbours_by_hand():
    tokens = torch.arange(1.0, 10.0).reshape(1, 9, 1)  # 3x3 grid 1..9
    flagged = torch.zeros(1, 9, dtype=torch.bool)
    flagged[0, 4] = True
    assert fill_from_neighbours(tokens, flagged, (3, 3))[0, 4, 0] == (45 - 5) / 8
    flagged = torch.zeros(1, 9, dtype=torch.bool)
    flagged[0, [0, 1]] = True  # corner 0 sees 4, 5 (1 is flagged); 1 sees 3, 4, 5, 6
    filled = fill_from_neighbours(tokens, flagged, (3, 3))[0, :, 0]
    assert filled.tolist() == [4.5, 4.5, *range(3, 10)]
    alone = fill_from_neighbours(torch.tensor([[[1.0], [2.0]]]), torch.tensor([[True, True]]), (1, 2))
    assert alone.flatten().tolist() == [1.0, 2.0]  # no valid neighbour: kept


def test_official_outlier_positions():
    flagged = torch.zeros(1, 6, dtype=torch.bool)
    flagged[0, 2] = True  # row-major (0, 2) on a 2x3 grid; the official code puts it at (2 // 2, 2 % 2) = (1, 0)
    assert official_positions(flagged, (2, 3))[0].nonzero().flatten().tolist() == [3]
    square = torch.zeros(1, 9, dtype=torch.bool)
    square[0, 5] = True
    assert torch.equal(official_positions(square, (3, 3)), square)
    flagged[0, 5] = True  # (5 // 2, 5 % 2) = (2, 1): outside the 2x3 grid
    with pytest.raises(ValueError, match="exact_outlier_positions"):
        official_positions(flagged, (2, 3))


def test_similarity_attention_and_aggregation_by_hand():
    similarity = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # mean 0.5: off-diagonal entries are below it
    assert torch.equal(similarity_attention(similarity), torch.eye(2)[None])
    affinity = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    tokens = torch.tensor([[[2.0], [4.0]]])
    expected = torch.tensor([[[6.0 / (2 + 1e-6)], [8.0 / (2 + 1e-6)]]])  # (1*2 + 1*4) / 2 and 2*4 / 2
    torch.testing.assert_close(aggregate(tokens, affinity), expected)


# --- the method on a small random CLIP ---------------------------------------------------------------------------

SMALL = dict(pre_adjust_idx=1, post_adjust_idx=0, multi_start_idx=0, multi_end_idx=2)


def test_windows_of_a_batch_are_independent(spread_clip):
    method = create("scclip", **SMALL)
    crops = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batched, grid = method.patch_features(spread_clip.image, crops)
        single = torch.cat([method.patch_features(spread_clip.image, crop[None])[0] for crop in crops])
    assert grid == (6, 6)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def _crop(height, width, seed):
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_non_square_grids(spread_clip):
    official, exact = create("scclip", **SMALL), create("scclip", exact_outlier_positions=True, **SMALL)
    with torch.inference_mode():
        # 6 x 10 tokens: the LOF flags tokens 4, 41 and 47; the official row 41 // 6 = 6 is outside the grid
        with pytest.raises(ValueError, match="exact_outlier_positions"):
            official.patch_features(spread_clip.image, _crop(96, 160, 0))
        features, grid = exact.patch_features(spread_clip.image, _crop(96, 160, 0))
        assert grid == (6, 10) and torch.isfinite(features).all()
        # 10 x 6 tokens: flags 3, 33 and 54 land inside the grid at the official (i // 10, i % 10): wrong places
        tall = _crop(160, 96, 4)
        assert not torch.allclose(official.patch_features(spread_clip.image, tall)[0],
                                  exact.patch_features(spread_clip.image, tall)[0])


def test_bad_block_indices_are_a_clear_error(spread_clip):
    with pytest.raises(ValueError, match="block-output indices"):
        create("scclip").patch_features(spread_clip.image, _crop(96, 96, 0))


@pytest.mark.parametrize("method", ["scclip", "sfp"])
def test_an_encoder_without_class_token_is_refused(method):
    with pytest.raises(UsageError, match=f"{method} reads the image encoder's class token"):
        Segmenter(method, models={"clip": class_free_clip()}, text_cache=False)
