"""ResCLIP against the official code's goldens (every base and protocol the oracle holds, and every stored
intermediate), its pieces against direct computations, and its composition with the last-block bases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import assert_close_logits, assert_labels_agree, golden, oracle_path, tiny_clip_weights, voc_rgb

from vocabseg import Segmenter
from vocabseg.errors import UsageError
from vocabseg.methods.registry import create
from vocabseg.methods.resclip import method as resclip
from vocabseg.models.encoder import Models
from vocabseg.pipeline import run
from vocabseg.text.classes import ClassSpec, read_classes_file

pytestmark = pytest.mark.usefixtures("one_thread")  # heavy CPU work: a second thread only adds contention
GOLDEN = ("resclip", "golden_resclip_voc.pt")
# (base, oracle protocol, vocabseg preset, extra options): voc21_temp025 is the oracle's stress variant
PROTOCOLS = [
    ("naclip", "voc21", "voc21", {}),
    ("naclip", "context59", "pc59", {}),
    ("naclip", "voc21_temp025", "voc21", {"temp_thd": 0.25}),
    ("clearclip", "voc21", "voc21", {}),
    ("clearclip", "context59", "pc59", {}),
    ("sclip", "voc21", "voc21", {}),
    ("sclip", "context59", "pc59", {}),
]
# the crop intermediates: clearclip/sclip under context59; naclip's were generated with the voc21_temp025 weights
CROP_OPTIONS = {
    "naclip": {"rcs_weights": (2.0, 0.3), "sfr_weights": (2.2, 0.7), "temp_thd": 0.25},
    "clearclip": {"rcs_weights": (2.0, 0.4), "sfr_weights": (1.8, 0.7), "temp_thd": 0.25},
    "sclip": {"rcs_weights": (2.0, 0.4), "sfr_weights": (1.8, 0.7), "temp_thd": 0.25},
}


def _voc_spec() -> ClassSpec:
    names = read_classes_file(oracle_path("names_voc.txt"))
    return ClassSpec(labels=tuple(n[0] for n in names), names=tuple(names), has_background=True)


def _segmenter(base, preset=None, **options) -> Segmenter:
    return Segmenter(f"{base}+resclip", weights=str(tiny_clip_weights()), device="cpu", text_cache=False,
                     preset=preset, **options)


def _merge(grids, boxes, input_hw, ori_hw):
    """The official slide/whole merge of per-window grid cosines: bilinear to each window, averaged, to ori size."""
    total = torch.zeros(grids.shape[1], *input_hw)
    count = torch.zeros(1, *input_hw)
    for grid, (y1, x1, y2, x2) in zip(grids, boxes if boxes is not None else [(0, 0, *input_hw)], strict=True):
        size = (int(y2 - y1), int(x2 - x1))
        total[:, y1:y2, x1:x2] += F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0]
        count[:, y1:y2, x1:x2] += 1
    return F.interpolate((total / count)[None], size=ori_hw, mode="bilinear", align_corners=False)[0]


@pytest.fixture(scope="module")
def oracle_runs():
    """One official-protocol run per (base, protocol), recording the per-window features and SFR categories."""
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = _voc_spec()
        for base, protocol, preset, extra in PROTOCOLS:
            segmenter = _segmenter(base, preset, **extra)
            classifier = segmenter.classifier(spec)
            windows, categories = [], []
            method = segmenter.method
            features_of = method.text_patch_features

            def record_features(models, crops, text, features_of=features_of, windows=windows):
                features, grid = features_of(models, crops, text)
                windows.extend((features @ text.T).transpose(1, 2).reshape(-1, text.shape[0], *grid))
                return features, grid

            def record_categories(*args, categories=categories, original=resclip.patch_categories):
                found = original(*args)
                categories.extend(found)
                return found

            original_categories = resclip.patch_categories
            method.text_patch_features = record_features
            resclip.patch_categories = record_categories
            try:
                result = segmenter.results([voc_rgb()], spec)[0]
            finally:
                resclip.patch_categories = original_categories
                del method.text_patch_features
            runs[base, protocol] = (segmenter, classifier, result, torch.stack(windows), torch.stack(categories))
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("base, protocol", [(b, p) for b, p, _, _ in PROTOCOLS])
def test_resclip_matches_official_protocol(oracle_runs, base, protocol):
    g = golden(*GOLDEN)
    key = f"{base}/voc/{protocol}/"
    segmenter, classifier, result, windows, categories = oracle_runs[base, protocol]
    print(f"\n{base}+resclip {protocol}")
    assert_close_logits(classifier.embeddings, g["voc/text_features"], what="text classifier")
    assert_close_logits(windows, g[key + "window_logits_grid"], what="window logits grids")
    assert torch.equal(categories.to(torch.int16), g[key + "window_patch_matrix"]), "SFR patch categories"
    reference = _merge(g[key + "window_logits_grid"], g.get(key + "window_boxes"), (336, 447), (188, 250))
    if key + "seg_logits_s2" in g:
        assert_close_logits(reference[:, ::2, ::2], g[key + "seg_logits_s2"], atol=2e-7, what="reference merge")
    assert_close_logits(result.logits[:, ::2, ::2], reference[:, ::2, ::2], what="merged raw logits")
    assert_labels_agree(result.labels, g[key + "pred"], what="labels")
    if key + "pred_pamr" in g:  # the official PAMR variant: the pipeline's post-processing on the same logits
        prepared = segmenter.method.prepare(segmenter.models, torch.from_numpy(voc_rgb()), segmenter.protocol)
        _, labels = run.scores_and_labels(result.logits, prepared.input[0], classifier,
                                          segmenter.protocol.replace(pamr=True))
        assert_labels_agree(labels, g[key + "pred_pamr"], what="labels with PAMR")


def test_resclip_segment_through_the_public_api():
    """``Segmenter.segment`` (class logits = max over names, labels) on the whole-image voc21 protocol, PAMR on."""
    g = golden(*GOLDEN)
    spec = _voc_spec()
    segmenter = _segmenter("naclip", "voc21", pamr=True)
    out = segmenter.segment(voc_rgb(), spec)
    assert out.meta["method"] == "naclip+resclip" and out.meta["preset"] == "voc21"
    assert out.meta["method_options"]["rcs_weights"] == (2.0, 0.3)
    assert_labels_agree(out.labels, g["naclip/voc/voc21/pred_pamr"], what="labels with PAMR (segment)")
    per_query = g["naclip/voc/voc21/seg_logits_s2"]
    query_class = torch.tensor(spec.query_class)
    per_class = torch.stack([per_query[query_class == c].amax(0) for c in range(spec.num_classes)])
    assert_close_logits(out.logits[:, ::2, ::2], per_class, what="class logits (segment)")


@pytest.mark.parametrize("base", ["naclip", "clearclip", "sclip"])
def test_resclip_crop_intermediates_match_official(base):
    g = golden(*GOLDEN)
    crop = torch.load(oracle_path("inputs_voc.pt"), weights_only=True)["voc/crop224"][None]
    segmenter = _segmenter(base, **CROP_OPTIONS[base])
    text = segmenter.classifier(_voc_spec()).embeddings
    with torch.no_grad():
        trace = segmenter.method.trace(segmenter.models.clip.image, crop, text)
    key = f"{base}/voc/crop/"
    print(f"\n{base}+resclip crop")
    assert_close_logits(trace.rcs[0], g["voc/crop/attn_rcs"], atol=1e-5, what="RCS")
    assert_close_logits(trace.temp_logits[0].T.reshape(-1, 14, 14), g[key + "temp_logits_grid"], what="temp logits")
    assert_labels_agree(trace.temp_probs[0].argmax(0), g[key + "temp_argmax"], what="temp argmax")
    assert torch.equal(trace.categories[0].to(torch.int16), g[key + "patch_matrix"]), "patch categories"
    if key + "attn_sfr" in g:
        assert_close_logits(trace.sfr[0], g[key + "attn_sfr"], atol=1e-6, what="SFR")
        assert_close_logits(trace.attention[0], g[key + "last_attn"], what="last attention")
        assert_close_logits(trace.tokens[0], g[key + "tokens"], what="tokens")
    logits = F.normalize(trace.tokens[0, 1:], dim=-1) @ text.T
    assert_close_logits(logits.T.reshape(-1, 14, 14), g[key + "logits_grid"], what="crop logits grid")


# --- pieces against direct computations ---------------------------------------------------------------------------

def _check_path_by_hand(categories: torch.Tensor) -> torch.Tensor:
    """The official path rule written pair by pair: points ``round(p_i + (p_j - p_i) s / max_steps)`` for
    ``s <= steps(i, j)`` must all carry ``p_i``'s category."""
    gh, gw = categories.shape
    cells = [(i // gw, i % gw) for i in range(gh * gw)]
    max_steps = max(gh, gw) - 1
    t = torch.linspace(0, 1, max_steps + 1)
    valid = torch.ones(gh * gw, gh * gw, dtype=torch.bool)
    for a, (ya, xa) in enumerate(cells):
        for b, (yb, xb) in enumerate(cells):
            for s in range(max(abs(yb - ya), abs(xb - xa)) + 1):
                y = int(torch.round(ya * (1 - t[s]) + yb * t[s]))
                x = int(torch.round(xa * (1 - t[s]) + xb * t[s]))
                if categories[y, x] != categories[ya, xa]:
                    valid[a, b] = False
                    break
    return valid


def test_path_validity_and_feedback_attention_equal_hand_computation():
    generator = torch.Generator().manual_seed(0)
    categories = torch.randint(0, 3, (2, 4, 6), generator=generator)
    valid = resclip.straight_path_validity(categories)
    for b in range(2):
        assert torch.equal(valid[b], _check_path_by_hand(categories[b]))
    assert 0.2 < valid.float().mean() < 0.9  # a real mix of kept and decayed pairs

    sfr = resclip.feedback_attention(categories, std=1.5)
    n, steps = 24, 5
    cells = torch.tensor([(i // 6, i % 6) for i in range(n)])
    distance = (cells[:, None] - cells[None]).abs().amax(-1)
    for b in range(2):
        flat = categories[b].flatten()
        same = (flat[:, None] == flat[None]).float()
        same = torch.where(valid[b], same, same * torch.exp(-distance / steps))
        size = 11  # int(6 * 1.5 + 1) = 10, made odd
        kernel = torch.exp(-torch.arange(-5, 6).float() ** 2 / (2 * 1.5**2))
        kernel /= kernel.sum()
        padded = F.pad(same, (5, 5))
        blurred = torch.stack([padded[:, j:j + size] @ kernel for j in range(n)], dim=1).clamp_min(0)
        expected = blurred / (blurred.sum(-1, keepdim=True) + 1e-8)
        torch.testing.assert_close(sfr[b, 1:, 1:], expected, atol=1e-6, rtol=1e-5)
        assert sfr[b, 0].abs().sum() == 0 and sfr[b, :, 0].abs().sum() == 0


def test_patch_categories_threshold_mode_and_ties():
    probs = torch.zeros(1, 3, 4, 6)
    probs[0, 2] = 0.9  # query 2 everywhere ...
    probs[0, 1, :, 2:] = 0.95  # ... except the right part: query 1
    probs[0, :, :, 4:] = 0.2  # and a low-confidence strip -> query 0
    probs[0, 1, :2, :2] = 0.95  # left tile: half query 1, half query 2 -> tie -> the smaller (1)
    found = resclip.patch_categories(probs, patch_size=2, threshold=0.5)
    assert found.tolist() == [[[1, 1, 0], [2, 1, 0]]]


@pytest.mark.parametrize("base", ["clip", "sclip", "clearclip", "naclip"])
def test_attention_logits_hooks_reproduce_the_base_attention(base, clip):
    method = create(base)
    with torch.no_grad():
        x = clip.image.embed(torch.randn(2, 3, 64, 64))
        q, k, v = clip.image.qkv(0, x)
        bias = method.attention_bias((4, 4), clip.image.prefix_tokens, x.device)
        attn = sum(torch.softmax(m + (0 if bias is None else bias), dim=-1) for m in method.attention_logits(q, k))
        torch.testing.assert_close(attn @ v, method.attention(q, k, v, (4, 4)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("base", ["clip", "sclip", "clearclip", "naclip"])
def test_resclip_switched_off_is_its_base_and_on_changes_it(base, spread_clip):
    crops = torch.randn(2, 3, 64, 64)
    text = F.normalize(torch.randn(5, spread_clip.image.embed_dim), dim=-1)
    models = Models({"clip": spread_clip})
    with torch.no_grad():
        plain, grid = create(base).patch_features(spread_clip.image, crops)
        off, off_grid = create(f"{base}+resclip", rcs=False, sfr=False,
                               rcs_layers=(1,)).text_patch_features(models, crops, text)
        on, _ = create(f"{base}+resclip", rcs_layers=(1, 2), temp_thd=0.0).text_patch_features(models, crops, text)
    assert grid == off_grid == (4, 4)
    torch.testing.assert_close(off, plain, atol=2e-5, rtol=1e-4)
    assert (on - plain).abs().max() > 1e-2


def test_resclip_attention_mixes_as_the_official_code():
    generator = torch.Generator().manual_seed(1)
    logits = [torch.randn(1, 2, 5, 5, generator=generator) for _ in range(2)]
    rcs = torch.softmax(torch.randn(1, 2, 5, 5, generator=generator), -1)
    sfr = torch.rand(1, 5, 5, generator=generator)
    bias = torch.rand(5, 5, generator=generator)
    attn = resclip.resclip_attention(logits, bias, rcs, sfr, (2.0, 0.4), (1.8, 0.7))
    scaled = (sfr / sfr.max()).half()[:, None]
    mixed = [1.8 * (0.3 * m + (0.7 * scaled).float()) + bias for m in logits]  # 0.7 * SFR rounded to fp16
    expected = 2.0 * (0.6 * sum(torch.softmax(m, -1) for m in mixed) + 0.4 * rcs)
    torch.testing.assert_close(attn, expected, atol=0, rtol=0)
    torch.testing.assert_close(attn.sum(-1), torch.full((1, 2, 5), 2.0 * (0.6 * 2 + 0.4)))


# --- composition ---------------------------------------------------------------------------------------------------

def test_resclip_alone_is_naclip_resclip_and_options_route_to_both():
    method = create("resclip", gaussian_std="3", temp_thd="0.4", rcs_weights="2.0,0.5", rcs="false")
    assert method.name == "naclip+resclip" and type(method.base).__name__ == "NACLIP"
    assert method.base.gaussian_std == 3.0 and method.temp_thd == 0.4 and method.rcs_weights == (2.0, 0.5)
    assert method.rcs is False and method.sfr is True  # typed options: "false" is False
    assert set(create("sclip+resclip").options()) == set(create("resclip").options()) - {"gaussian_std"}
    for bad in ("maskclip+resclip", "itaclip+resclip", "naclip+resclip+resclip"):
        with pytest.raises(UsageError, match="resclip needs"):
            create(bad)
    with pytest.raises(UsageError, match="not a plug-in"):
        create("naclip+sclip")
    with pytest.raises(UsageError, match="rcs_weights"):
        create("resclip", rcs_weights=(1.0,))
    with pytest.raises(UsageError, match="temp_thd must be a number"):
        create("clearclip+resclip", temp_thd="high")


def test_resclip_presets_follow_the_official_configs():
    presets = create("clearclip+resclip").presets
    assert set(presets) == {"voc21", "pc60", "coco-object", "voc20", "cityscapes", "pc59", "ade150", "coco-stuff"}
    voc21, city = presets["voc21"], presets["cityscapes"]
    assert voc21.protocol.crop is None and voc21.protocol.prob_thd == 0.1 and not voc21.protocol.pamr
    assert voc21.options == {"temp_thd": 0.5, "rcs_weights": (2.0, 0.3), "sfr_weights": (2.2, 0.7),
                             "delete_same_entity": True}
    assert city.protocol.short_side == 560 and city.protocol.crop == 224 and city.protocol.logit_scale == 40.0
    assert math.isclose(city.options["temp_thd"], 0.1)


def test_clip_resclip_runs_end_to_end_and_is_described(clip, chelsea):
    """A composition the official repository does not ship (vanilla CLIP base), through the public API."""
    segmenter = Segmenter("clip+resclip", models={"clip": clip}, text_cache=False, preset="pc59", temp_thd=0.0,
                          rcs_layers=(1, 2))
    out = segmenter.segment(chelsea, classes=["cat", "wall|floor"], background=False)
    assert out.labels.shape == chelsea.shape[:2] and np.isin(out.labels, [0, 1]).all()
    assert out.meta["method"] == "clip+resclip" and out.meta["preset"] == "pc59"
    assert out.meta["method_options"]["sfr_weights"] == (1.8, 0.7)
    assert out.meta["protocol"]["logit_scale"] == 40.0


def _option_text(value) -> str:
    """An option value as ``--option KEY=VALUE`` writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


@pytest.mark.parametrize("method", ["sclip+resclip", "naclip+resclip+floss"])
def test_composition_options_round_trip_through_the_command_line(method, clip):
    """Every option of a composition (the plug-ins' and the base's), written as ``--option`` text and parsed back by
    the command line, gives the same typed values; changed values arrive changed (``rcs=false`` is False)."""
    from vocabseg.cli import build_parser
    from vocabseg.cli.common import segmenter_arguments

    def through_cli(options: dict) -> dict:
        argv = ["segment", "a.png", "--out", "out", "--method", method]
        for key, value in options.items():
            argv += ["--option", f"{key}={_option_text(value)}"]
        arguments = segmenter_arguments(build_parser().parse_args(argv))
        return Segmenter(**{**arguments, "models": {"clip": clip}, "text_cache": False}).method.options()

    defaults = create(method).options()
    assert through_cli(defaults) == defaults
    changed = {"rcs": False, "rcs_weights": (2.5, 0.5), "rcs_layers": (1, 2), "temp_thd": 0.3,
               "delete_same_entity": False}
    if "naclip" in method:
        changed |= {"gaussian_std": 3.0, "top_n": 2, "unranked": "default", "expert_logit_scale": 50.0}
    assert through_cli(changed) == {**defaults, **changed}
