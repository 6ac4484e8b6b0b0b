"""CASS against the official code's outputs (``shared/oracle/cass``: tiny CLIP + tiny DINO ViT-B/8 of width 128, the
VOC photo; ``voc21`` = whole image, ``context59`` = windows 224 / 112), seeded randomised SVD and ``exact_svd``.

The official head assignment minimises a cost that is often additively separable (``c[i, j] = a_i + b_j`` whenever
every DINO spectrum lies on one side of every CLIP spectrum), so every pairing costs the same and float rounding
picks one: in 2 of the 6 ``context59`` windows the pairing taken here differs from the official run's (cost margins
0 and 6e-8). Those windows are checked to be ties and to match the official grids with the official pairing;
everything else must match as it is.
"""

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from oracle import assert_close_logits, assert_labels_agree, golden, oracle_path, tiny_clip, voc_rgb

from vocabseg import Segmenter
from vocabseg.errors import UsageError
from vocabseg.methods.cass.method import (
    cass_dino_images,
    cass_dino_pixels,
    dino_keys_on_clip_grid,
    dino_last_keys,
    hierarchical_clusters,
    hierarchical_prompt,
    spectral_attention,
)
from vocabseg.methods.last_block.method import gaussian_prior
from vocabseg.pipeline import postprocess
from vocabseg.pipeline.preprocess import preprocess
from vocabseg.text.classes import BACKGROUND_LABEL, ClassSpec

CONTEXT59 = dict(crop=224, stride=112, global_semantics_weight=0.25, mean_vector_weight=0.04, h_threshold=0.09)


@pytest.fixture(scope="module")
def gold():
    return golden("cass", "golden_cass_voc.pt")


@pytest.fixture(scope="module")
def spec():
    lines = oracle_path("names_voc.txt").read_text(encoding="utf-8").splitlines()
    names = tuple(tuple(line.split(", ")) for line in lines)
    return ClassSpec(labels=(BACKGROUND_LABEL, *(n[0] for n in names[1:])), names=names, has_background=True)


def make(protocol: str, **options) -> Segmenter:
    settings = dict(preset="voc21") if protocol == "voc21" else CONTEXT59
    models = {"clip": tiny_clip(), "dino": str(oracle_path("cass", "tiny_dino_vit8w128.pt"))}
    return Segmenter("cass", models=models, device="cpu", text_cache=False, **settings, **options)


@pytest.fixture(scope="module")
def segmenter():
    return make("context59")


@pytest.fixture(scope="module")
def encoder(segmenter):
    return segmenter.models.clip.image


@pytest.fixture(scope="module")
def inputs(encoder):
    return preprocess(torch.from_numpy(voc_rgb()), 336, normalization=encoder.normalization)


def text_and_clusters(segmenter: Segmenter, spec: ClassSpec) -> tuple[torch.Tensor, torch.Tensor]:
    text = segmenter.classifier(spec).embeddings
    return text, hierarchical_clusters(text, segmenter.method.h_threshold)


def test_text_classifier_and_clusters(segmenter, spec, gold):
    classifier = segmenter.classifier(spec)
    assert_close_logits(classifier.embeddings, gold["voc/text_features"], atol=1e-5, what="text classifier")
    assert classifier.query_class.tolist() == gold["voc/query_idx"].tolist()
    for protocol, threshold in (("voc21", 0.10), ("context59", 0.09)):
        clusters = hierarchical_clusters(classifier.embeddings, threshold)
        assert clusters.tolist() == gold[f"voc/{protocol}/cluster_info"].tolist(), protocol
    assert len(set(gold["voc/voc21/cluster_info"].tolist())) == 5


def test_voc21_whole_image_seeded_and_exact(segmenter, spec, gold, one_thread):
    """One window: the official seeded run is reproduced (same randomised-SVD draws), and the exact-SVD variant."""
    seeded = make("voc21")
    raw = seeded.results([voc_rgb()], spec)[0]
    assert_close_logits(raw.logits[:, ::2, ::2], gold["voc/voc21/seg_logits_s2"], what="voc21 seg_logits")
    assert_labels_agree(raw.labels, gold["voc/voc21/pred_no_pamr"], what="voc21 labels (no PAMR)")
    with_pamr = make("voc21", pamr=True).segment(voc_rgb(), spec)
    assert_labels_agree(with_pamr.labels, gold["voc/voc21/pred"], what="voc21 labels with PAMR")
    exact = make("voc21", svd="exact")
    grid = exact.method.window_logits(exact.models, *text_and_clusters(exact, spec), None)
    with torch.no_grad():
        x = preprocess(torch.from_numpy(voc_rgb()), 336, normalization=exact.models.clip.image.normalization)
        logits = grid(x)  # B,Q,h,w at the input size; compare the grid through a fresh upsampling
    expected = F.interpolate(gold["voc/voc21/exact_svd/window_logits_grid"], size=x.shape[-2:], mode="bilinear",
                             align_corners=False)
    assert_close_logits(logits, expected, what="voc21 exact-SVD window logits")
    assert_labels_agree(exact.segment(voc_rgb(), spec).labels, gold["voc/voc21/exact_svd/pred_no_pamr"],
                        what="voc21 exact-SVD labels")


def pairing(columns: list[int]):
    """A stand-in for ``linear_sum_assignment`` returning this pairing of the two heads."""
    return lambda cost: (np.arange(2), np.array(columns))


@pytest.fixture(scope="module")
def official_pairings(segmenter, spec, gold, inputs) -> list[list[int]]:
    """Per context59 window: the head pairing whose exact-SVD grid equals the official one (the official choice);
    asserts that wherever it differs from ours the cost is a tie."""
    exact = make("context59", svd="exact")
    encoder = exact.models.clip.image
    text, clusters = text_and_clusters(exact, spec)
    with torch.no_grad():
        cls = encoder.head(encoder.run_blocks(encoder.embed(inputs)))[0, 0]
    similarity = F.normalize(cls, dim=-1) @ text.T
    pairings = []
    for index, (y1, x1, y2, x2) in enumerate(gold["voc/context59/window_boxes"].tolist()):
        expected = gold["voc/context59/exact_svd/window_logits_grid"][index].flatten(1).T
        with torch.no_grad():
            tokens = exact.method.window_tokens(exact.models, inputs[:, :, y1:y2, x1:x2])
            keys, dino_keys = tokens["keys"][0], tokens["dino_keys"][0]
            _, details = spectral_attention(keys, dino_keys, exact=True)
            ours = details["columns"].tolist()
            logits = exact.method.token_logits(encoder, tokens, 0, (14, 14), text, clusters, similarity)
        if float((logits - expected).abs().max()) <= 1e-4:
            pairings.append(ours)
            continue
        cost = details["cost"]
        margin = float(cost[0, 0] + cost[1, 1] - cost[0, 1] - cost[1, 0])
        print(f"window {index}: head pairing differs from the official run; cost margin {margin:.1e}")
        assert abs(margin) < 1e-6, f"window {index}: not a tie (margin {margin})"
        other = ours[::-1]
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(scipy.optimize, "linear_sum_assignment", pairing(other))
            logits = exact.method.token_logits(encoder, tokens, 0, (14, 14), text, clusters, similarity)
        assert_close_logits(logits, expected, what=f"window {index} with the other (tied) pairing")
        pairings.append(other)
    return pairings


def test_context59_windows_exact_svd(official_pairings, one_thread):
    assert len(official_pairings) == 6 and [1, 0] in official_pairings


@pytest.mark.parametrize("svd", ["lowrank", "exact"])
def test_context59_end_to_end_with_the_official_pairings(official_pairings, segmenter, spec, gold, svd, one_thread):
    """The whole pipeline through the public API (windows, global embedding, merge, upsampling, thresholds) with
    the official run's pairing in each window; seeded randomised SVD and exact."""
    calls = iter(official_pairings)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scipy.optimize, "linear_sum_assignment", lambda cost: pairing(next(calls))(cost))
        out = make("context59", svd=svd).segment(voc_rgb(), spec)
    prefix = "voc/context59/" + ("exact_svd/" if svd == "exact" else "")
    assert_labels_agree(out.labels, gold[prefix + "pred_no_pamr"], what=f"context59 {svd} labels")
    if svd == "lowrank":
        per_class = postprocess.max_over_names(gold["voc/context59/seg_logits_s2"], gold["voc/query_idx"],
                                               spec.num_classes)
        assert_close_logits(out.logits[:, ::2, ::2], per_class, what="context59 seeded seg_logits (max over names)")


def test_first_window_dino_keys(segmenter, gold, inputs, one_thread):
    crop = inputs[:, :, :224, :224]
    assert np.array_equal(cass_dino_pixels(crop[0]), gold["voc/crop/dino_input_uint8"].numpy())
    dino = segmenter.models.dino
    with torch.no_grad():
        keys = dino_last_keys(dino, cass_dino_images(crop, 8))[0]
    # fp16 keys of a float32 DINO that differs from the official one by ~1e-6: a few values one fp16 step apart
    assert_close_logits(keys.permute(0, 2, 1), gold["voc/crop/dino_key"], atol=4e-3, what="DINO keys (fp16)")
    assert float((keys.permute(0, 2, 1) != gold["voc/crop/dino_key"]).float().mean()) < 0.01
    official = dino_keys_on_clip_grid(gold["voc/crop/dino_key"].permute(0, 2, 1), (28, 28), gold["voc/crop/clip_k"],
                                      (14, 14))
    assert torch.equal(official, gold["voc/crop/dino_key_final"])


def test_first_window_spectral_attention(segmenter, encoder, gold, inputs, one_thread):
    clip_keys = gold["voc/crop/clip_k"]
    with torch.no_grad():
        ours = segmenter.method.window_tokens(segmenter.models, inputs[:, :, :224, :224])
    assert_close_logits(ours["keys"][0], clip_keys, what="CLIP last-block keys")
    assert_close_logits(ours["cls"][0], gold["voc/crop/x_last"], what="class token of the unmodified model")
    # the official keys are a transposed view; fp16 products round differently on a contiguous copy
    dino_keys = gold["voc/crop/dino_key_final"].transpose(1, 2).contiguous().transpose(1, 2)
    combined, details = spectral_attention(clip_keys, dino_keys, rescale=True, exact=True)
    assert_close_logits(details["cost"], gold["voc/crop/assignment_cost"], atol=1e-6, what="assignment cost")
    assert details["columns"].tolist() == gold["voc/crop/assignment_col"].tolist()
    assert details["ranks"].tolist() == gold["voc/crop/exact_svd/optimal_q"].tolist()
    assert_close_logits(combined, gold["voc/crop/exact_svd/spectral_attn"], atol=1e-5,
                        what="spectral key-key logits (exact SVD)")
    attention = (combined + gaussian_prior((14, 14), 5.0)[1:, 1:]).softmax(dim=-1)
    assert_close_logits(attention, gold["voc/crop/exact_svd/last_attn"], atol=1e-6, what="last-block attention")
    last = encoder.num_blocks - 1
    with torch.no_grad():
        heads = gold["voc/crop/exact_svd/last_attn"] @ ours["values"][0]
        tokens = encoder.head(encoder.attention_out(last, heads[None]))[0]
    assert_close_logits(tokens, gold["voc/crop/exact_svd/tokens"], atol=1e-4, what="patch tokens (exact SVD)")


def test_first_window_seeded_svd_is_close(segmenter, encoder, gold, inputs, one_thread):
    """The randomised SVD reseeded with 0 draws what the official run drew: the tokens match the seeded golden."""
    with torch.no_grad():
        ours = segmenter.method.window_tokens(segmenter.models, inputs[:, :, :224, :224])
        dino_keys = gold["voc/crop/dino_key_final"].transpose(1, 2).contiguous().transpose(1, 2)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _, details = spectral_attention(gold["voc/crop/clip_k"], dino_keys)
            torch.manual_seed(0)
            tokens, _ = segmenter.method.patch_tokens(encoder, ours["keys"][0], ours["values"][0], dino_keys,
                                                      (14, 14))
    assert details["ranks"].tolist() == gold["voc/crop/optimal_q"].tolist()
    assert_close_logits(tokens, gold["voc/crop/tokens"], atol=1e-4, what="patch tokens (seeded randomised SVD)")
    exact_gap = float((gold["voc/crop/tokens"] - gold["voc/crop/exact_svd/tokens"]).abs().max())
    print(f"official seeded vs exact-SVD tokens: {exact_gap:.2e}")
    assert exact_gap > 1e-3  # the randomised SVD matters: matching the seeded run is not matching the exact one


def test_first_window_object_presence_prior(segmenter, spec, gold, inputs):
    classifier = segmenter.classifier(spec)
    with torch.no_grad():
        similarity = segmenter.method.global_similarity(segmenter.models, inputs, classifier.embeddings)
    assert_close_logits(similarity, gold["voc/crop/global_sim"], atol=1e-5, what="global similarity")
    features = F.normalize(gold["voc/crop/tokens"], dim=-1)
    adjusted = hierarchical_prompt(gold["voc/text_features"], gold["voc/context59/cluster_info"], features,
                                   gold["voc/crop/global_sim"], 0.04)
    assert_close_logits(adjusted, gold["voc/crop/adjusted_text_features"], atol=1e-6, what="adjusted text")
    changed = (adjusted - gold["voc/text_features"]).abs().amax(dim=1) > 0
    assert int(changed.sum()) == len(set(gold["voc/context59/cluster_info"].tolist()))  # one query per cluster


def test_seed_is_isolated_and_presets(segmenter):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    make("voc21", short_side=64).segment(voc_rgb(), ["cat", "dog"])
    assert torch.equal(torch.rand(3), before)  # the caller's random state is untouched
    presets = segmenter.method.presets
    assert presets["voc21"].protocol.crop is None and presets["voc21"].options["global_semantics_weight"] == 0.1
    assert presets["cityscapes"].options["global_per_window"] and not presets["voc20"].options[
        "rescale_singular_values"]
    assert all(not p.protocol.pamr for p in presets.values())  # the official evaluation script: --pamr off
    with pytest.raises(UsageError, match="svd must be"):
        make("voc21", svd="fast")


def test_a_dino_narrower_than_clip_is_refused_up_front(segmenter):
    from vocabseg.models.dino import DinoConfig, build_model
    from vocabseg.models.timm_vit import TimmViT

    narrow = TimmViT(build_model(DinoConfig(patch_size=8, embed_dim=64, depth=1, native_grid=2, mlp_hidden=64)))
    with pytest.raises(UsageError, match=r"DINO's width \(64\) must equal CLIP's \(128\)"):
        Segmenter("cass", models={"clip": segmenter.models.clip, "dino": narrow}, text_cache=False)
