"""PEARL against its official code's golden (tiny seeded CLIP, VOC photo): Procrustes attention stage by stage, the
merged logits, TLP's grid tensors and label maps with and without TLP; its tensor functions against hand
computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness_parity import (
    check_labels,
    check_logits,
    check_text,
    check_windows,
    class_free_clip,
    crop224,
    run_cli,
    segmenter,
    voc_classifier,
)
from oracle import assert_close_logits, golden, golden_meta, voc_rgb

from vocabseg import Segmenter
from vocabseg.methods.pearl.method import (
    conjugate_gradient,
    graph_laplacian,
    pearl_attention,
    polar_factor,
    pool_size,
    procrustes_rotation,
    text_affinity,
    text_aware_propagation,
    text_gain,
    weighted_centre,
)
from vocabseg.methods.registry import create
from vocabseg.pipeline.preprocess import preprocess
from vocabseg.pipeline.windows import upsample

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = ("pearl", "golden_pearl_voc.pt")
PRESET_OF = {"voc21": "voc21", "context59": "pc59"}


@pytest.fixture(scope="module")
def g():
    return golden(*GOLDEN)


def _relative(ours, reference, what, atol=1e-5):
    scale = reference.abs().max()
    assert_close_logits(ours / scale, reference / scale, atol, what + " (relative)")


def test_presets_and_defaults_are_the_official_configs():
    meta = golden_meta(*GOLDEN)
    defaults = meta["class_defaults"]
    method = create("pearl")
    assert (method.use_kk, method.alpha_kk, method.align_solver, method.polar_iters, method.propagation_grid) == (
        defaults["use_kk"], defaults["alpha_kk"], defaults["align_solver"], defaults["polar_iters"], defaults["grid"])
    assert method.propagation_tau == meta["tlp_constants"]["tau"]
    for protocol, preset in PRESET_OF.items():
        values = segmenter("pearl", preset).protocol
        whole = meta["protocols"][protocol].get("slide_crop") == 0
        assert (values.short_side, values.crop, values.logit_scale) == (336, None if whole else 224,
                                                                          defaults["logit_scale"])
        assert values.prob_thd == meta["protocols"][protocol].get("prob_thd", 0.0)


def test_text_classifier_and_affinity(g):
    check_text(segmenter("pearl"), g)
    assert_close_logits(text_affinity(voc_classifier().embeddings), g["voc/tlp_S"], 1e-6, "text affinity S")


def test_procrustes_attention_stages(g):
    encoder = segmenter("pearl").models.clip.image
    with torch.inference_mode():
        x = encoder.run_blocks(encoder.embed(crop224()), 0, 11)
        q, k, _ = encoder.qkv(11, x)
    _relative(q[0], g["voc/crop/q"], "q")
    _relative(k[0], g["voc/crop/k"], "k")
    q_c, k_c = weighted_centre(g["voc/crop/q"], g["voc/crop/k"])
    _relative(k_c.transpose(-1, -2) @ q_c, g["voc/crop/polar_M"], "M")
    _relative(polar_factor(g["voc/crop/polar_M"]), g["voc/crop/polar_R"], "R (Newton-Schulz polar factor)")
    attention = pearl_attention(g["voc/crop/q"][None], g["voc/crop/k"][None])[0]
    assert_close_logits(attention, g["voc/crop/attn"], 1e-5, "attention")


def test_crop_tokens(g):
    seg = segmenter("pearl")
    encoder = seg.models.clip.image
    with torch.inference_mode():
        x = encoder.run_blocks(encoder.embed(crop224()), 0, 11)
        tokens = encoder.head(seg.method.last_block(encoder, x, (14, 14)))
    _relative(tokens[0], g["voc/crop/tokens"], "tokens (class token first)")


@pytest.mark.parametrize("protocol", list(PRESET_OF))
def test_window_grids(g, protocol):
    boxes = g.get(f"voc/{protocol}/window_boxes", torch.tensor([[0, 0, 336, 447]]))
    check_windows(segmenter("pearl", PRESET_OF[protocol]), boxes, g[f"voc/{protocol}/window_logits_grid"],
                  f"{protocol} window grids")


@pytest.mark.parametrize("protocol", list(PRESET_OF))
def test_merged_logits_propagation_and_labels(g, protocol):
    seg = segmenter("pearl", PRESET_OF[protocol])
    logits = check_logits(seg, g[f"voc/{protocol}/seg_logits_pre_tlp_s2"], f"{protocol} merged logits")
    guide = preprocess(torch.from_numpy(voc_rgb()), 336)[0]
    out = text_aware_propagation(logits, upsample(guide, tuple(logits.shape[-2:])),
                                 text_affinity(voc_classifier().embeddings))
    for ours, theirs in [("agree", "agree"), ("confidence", "Cw"), ("w_h", "w_h"), ("w_v", "w_v"),
                         ("solution", "F_sol")]:
        assert_close_logits(out[ours], g[f"voc/{protocol}/tlp/{theirs}"], 1e-5, f"{protocol} TLP {theirs}")
    check_labels(seg, g[f"voc/{protocol}/pred"], f"{protocol} labels with TLP")
    check_labels(segmenter("pearl", PRESET_OF[protocol], propagation=False), g[f"voc/{protocol}/pred_no_tlp"],
                 f"{protocol} labels without TLP")


def test_segment_scores_come_from_the_propagated_logits(g):
    seg = segmenter("pearl", "voc21")
    out = seg.segment(voc_rgb(), voc_classifier().spec)
    propagated = upsample(g["voc/voc21/tlp/F_sol"], out.labels.shape)
    probabilities = torch.softmax(40 * propagated, dim=0)
    assert_close_logits(out.scores[0], probabilities[:3].amax(dim=0), 1e-4, "background score (max over 3 names)")
    assert_close_logits(out.scores[1:3], probabilities[3:5], 1e-4, "aeroplane, bicycle scores")


def test_cli_segment_with_options(tmp_path):
    meta = run_cli(tmp_path, "pearl", "--preset", "voc21", "--option", "propagation_tau=0.025",
                   "--option", "full_text_affinity=true")
    assert meta["method"] == "pearl" and meta["classes"] == ["background", "aeroplane", "person"]
    assert meta["method_options"]["propagation_tau"] == 0.025 and meta["protocol"]["crop"] is None


# --- hand computations -------------------------------------------------------------------------------------------

def test_weighted_centre_ignores_the_class_token():
    q = torch.tensor([[[100.0, 0.0], [3.0, 4.0], [0.0, 1.0]]])  # weights |q|: class token 0, then 5 and 1
    k = torch.tensor([[[9.0, 9.0], [6.0, 0.0], [0.0, 6.0]]])
    q_c, k_c = weighted_centre(q, k)
    q_mean = (5 * q[0, 1] + 1 * q[0, 2]) / (6 + 1e-6)
    k_mean = (5 * k[0, 1] + 1 * k[0, 2]) / (6 + 1e-6)
    torch.testing.assert_close(q_c[0], q[0] - q_mean)
    torch.testing.assert_close(k_c[0], k[0] - k_mean)


def test_polar_factor_approaches_the_svd_rotation():
    generator = torch.Generator().manual_seed(0)
    u, v = (torch.linalg.qr(torch.randn(6, 6, generator=generator)).Q for _ in range(2))
    m = u @ torch.diag(torch.linspace(1.0, 2.0, 6)) @ v
    exact = procrustes_rotation(torch.eye(6), m.T, solver="svd")  # polar factor of M = (M^T)^T I
    torch.testing.assert_close(exact @ exact.T, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(polar_factor(m, iterations=30), exact, atol=1e-4, rtol=0)
    assert (polar_factor(m, iterations=1) - exact).abs().max() > 1e-2  # few steps: not yet a rotation


@pytest.mark.parametrize("prefix", [1, 0])
def test_pearl_attention_equals_a_direct_computation(prefix):
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4, generator=generator), torch.randn(1, 2, 5, 4, generator=generator)
    ours = pearl_attention(q, k, alpha_kk=0.5, solver="svd", prefix=prefix)
    for h in range(2):
        qh, kh = q[0, h], k[0, h]
        w = qh.norm(dim=-1)
        w[:prefix] = 0
        w = w / (w.sum() + 1e-6)
        qc, kc = qh - w @ qh, kh - w @ kh
        u, _, vh = torch.linalg.svd(kc.T @ qc)
        logits = qh @ (kh @ u @ vh).T / 2 + 0.5 * kc @ kc.T / 2
        torch.testing.assert_close(ours[0, h], torch.softmax(logits, dim=-1), atol=1e-5, rtol=1e-5)


def test_graph_laplacian_equals_the_dense_matrix():
    w_h = torch.tensor([[1.0, 0.5, 0.25], [1.0, 2.0, 3.0]])  # column 0 unused
    w_v = torch.tensor([[1.0, 1.0, 1.0], [0.1, 0.2, 0.3]])  # row 0 unused
    dense = torch.zeros(6, 6)
    edges = [(0, 1, 0.5), (1, 2, 0.25), (3, 4, 2.0), (4, 5, 3.0), (0, 3, 0.1), (1, 4, 0.2), (2, 5, 0.3)]
    for a, b, w in edges:
        dense[a, a] += w
        dense[b, b] += w
        dense[a, b] -= w
        dense[b, a] -= w
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(graph_laplacian(x, w_h, w_v), (x.reshape(3, 6) @ dense.T).reshape(3, 2, 3))


def test_conjugate_gradient_solves_a_small_system():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=generator)
    a = a @ a.T + 6 * torch.eye(6)
    x = torch.randn(6, generator=generator)
    solution = conjugate_gradient(lambda v: a @ v, a @ x, torch.zeros(6), iterations=12)
    torch.testing.assert_close(solution, x, atol=1e-4, rtol=1e-4)


def test_text_gain_reads_the_diagonal_unless_full():
    affinity = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    p = torch.tensor([1.0, 0.0])[:, None, None]
    q = torch.tensor([0.0, 1.0])[:, None, None]
    assert float(text_gain(p, q, affinity)) == 0.0  # sum_c S_cc p_c q_c
    assert float(text_gain(p, q, affinity, full=True)) == 0.5  # p^T S q


def test_propagation_keeps_constant_maps_and_pools_on_an_80_cell_grid():
    assert pool_size(188, 250) == (2, 3) and pool_size(256, 256) == (3, 3) and pool_size(20, 30) == (1, 1)
    logits = torch.tensor([0.3, 0.1, -0.2])[:, None, None].expand(3, 160, 240)
    generator = torch.Generator().manual_seed(0)
    out = text_aware_propagation(logits, torch.randn(3, 160, 240, generator=generator),
                                 text_affinity(torch.randn(3, 8, generator=generator)))
    assert out["solution"].shape == (3, 80, 80)
    torch.testing.assert_close(out["logits"], logits)


def test_runs_on_an_encoder_without_class_token():
    """Every token of a class-free encoder is a patch: all of them weigh in the centring."""
    clip = class_free_clip()
    encoder = clip.image
    seg = Segmenter("pearl", models={"clip": clip}, text_cache=False, short_side=96, crop=64, stride=32)
    crops = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features, grid = seg.method.patch_features(encoder, crops)
        q, k, v = encoder.qkv(2, encoder.run_blocks(encoder.embed(crops), 0, 2))
        heads = pearl_attention(q, k, prefix=0) @ v
        expected = F.normalize(encoder.head(encoder.attention_out(2, heads)), dim=-1)
        out = seg.segment(voc_rgb(), ["aeroplane", "person"])
    assert grid == (4, 4) and features.shape == (2, 16, 32)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1:] == voc_rgb().shape[:2] and np.isfinite(out.logits).all()


def test_unknown_solver_is_a_clear_error():
    with pytest.raises(ValueError, match="align_solver"):
        create("pearl", align_solver="qr")
