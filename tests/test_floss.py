"""FLOSS against the official code's goldens (both protocols, expert classifiers, expert logits, fusion, the ranking
stage), its pieces against direct computations, compositions the official code does not ship, and the command."""

import json

import numpy as np
import pytest
import torch
from oracle import (
    assert_close_logits,
    assert_labels_agree,
    golden,
    golden_meta,
    oracle_path,
    tiny_clip_weights,
    voc_rgb,
)
from PIL import Image

from vocabseg import Segmenter
from vocabseg.cli import main
from vocabseg.data.classes import CLASSES
from vocabseg.errors import UsageError
from vocabseg.methods.floss import method as recipe
from vocabseg.methods.floss import rankings as floss_rankings
from vocabseg.methods.floss.method import expert_fusion, query_templates
from vocabseg.methods.floss.rankings import TemplateRankings, rank_templates
from vocabseg.methods.registry import create
from vocabseg.models.checkpoints import WeightsError
from vocabseg.models.encoder import Models
from vocabseg.text.classes import ClassSpec, read_classes_file

pytestmark = pytest.mark.usefixtures("one_thread")  # heavy CPU work: a second thread only adds contention
GOLDEN = ("floss", "golden_floss_voc.pt")
PROTOCOLS = [("voc20", "voc20"), ("co59", "pc59")]  # (oracle protocol, vocabseg preset)
#: FLOSS's hard-coded VOC20 renames: the shipped ranking's class key -> the query word the golden records it under.
VOC20_RENAMES = {"boat": "ship", "diningtable": "table"}


def _voc20_spec() -> ClassSpec:
    names = read_classes_file(oracle_path("floss", "names_voc20.txt"))
    return ClassSpec(labels=CLASSES["voc20"], names=tuple(names), has_background=False)


def _shipped_ranking() -> dict:
    """The top-4 of the shipped ``template_rankings_naclip_pascalvoc20.json`` in the official layout (class keys as
    the file has them), rebuilt from the template ids the golden records per query word."""
    chosen = golden_meta(*GOLDEN)["template_dicts"]["voc/voc20"]
    return {"model": "naclip", "dataset": "pascalvoc20", "split": "train", "classes": {
        label: {"entropy_ranking": [{"template_id": t, "entropy": 0.1 * i, "pixel_percentage": 1.0, "rank": i + 1}
                                    for i, t in enumerate(chosen[VOC20_RENAMES.get(label, label)])]}
        for label in CLASSES["voc20"]}}


def _segmenter(method="naclip+floss", preset=None, **options) -> Segmenter:
    return Segmenter(method, weights=str(tiny_clip_weights()), device="cpu", text_cache=False, preset=preset,
                     **options)


@pytest.fixture(scope="module")
def oracle_runs():
    """One official-protocol run per protocol, recording the base's window features and the fusion's claims."""
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = _voc20_spec()
        for protocol, preset in PROTOCOLS:
            segmenter = _segmenter(preset=preset, rankings=_shipped_ranking())
            classifier = segmenter.classifier(spec)
            base = segmenter.method.base
            features_of = base.text_patch_features
            windows, claims = [], []

            def record_features(models, crops, text, features_of=features_of, windows=windows):
                features, grid = features_of(models, crops, text)
                windows.extend(features.transpose(1, 2).reshape(features.shape[0], -1, *grid))
                return features, grid

            def record_fusion(*args, claims=claims, original=recipe.expert_fusion):
                fused, claimed = original(*args)
                claims.extend(claimed)
                return fused, claimed

            original_fusion = recipe.expert_fusion
            base.text_patch_features = record_features
            recipe.expert_fusion = record_fusion
            try:
                result = segmenter.results([voc_rgb()], spec)[0]
            finally:
                recipe.expert_fusion = original_fusion
                del base.text_patch_features
            runs[protocol] = (segmenter, classifier, result, torch.stack(windows), torch.stack(claims))
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("protocol", [p for p, _ in PROTOCOLS])
def test_floss_matches_official_protocol(oracle_runs, protocol):
    g = golden(*GOLDEN)
    key = f"voc/{protocol}/"
    segmenter, classifier, result, features, claims = oracle_runs[protocol]
    print(f"\nnaclip+floss {protocol}")
    spec = classifier.spec
    assert segmenter.method.expert_templates(spec) == [tuple(t) for t in g[key + "template_ids"].tolist()]
    assert_close_logits(classifier.embeddings, g[key + "expert_text_features"], atol=1e-6, what="expert classifiers")
    assert torch.equal(classifier.query_class, g["voc/query_idx"])
    experts = torch.einsum("dhw,kqd->kqhw", features[0], classifier.embeddings)
    assert_close_logits(experts, g[key + "window_expert_logits_grid"][0], what="window 0 expert cosines")
    default = torch.einsum("ndhw,qd->nqhw", features, classifier.embeddings[-1])
    assert_close_logits(default, g[key + "default/window_logits_grid"], what="default window cosines")
    assert_labels_agree(claims[0], g[key + "window0_fusion_overlap_count"], minimum=0.999, what="window 0 claims")
    assert_close_logits(result.logits[:, ::2, ::2], g[key + "seg_logits_s2"], what="merged fused probabilities")
    assert_labels_agree(result.labels, g[key + "pred"], what="labels")


@pytest.mark.parametrize("protocol, preset", PROTOCOLS)
def test_plain_naclip_baseline_of_the_golden(protocol, preset):
    """The golden's ``default`` run: NACLIP with the 80-template classifier under FLOSS's protocol."""
    g = golden(*GOLDEN)
    protocol_options = create("floss").presets[preset].protocol
    segmenter = _segmenter("naclip", crop=protocol_options.crop, logit_scale=100.0, pamr=False, prob_thd=0.0)
    out = segmenter.segment(voc_rgb(), _voc20_spec())
    assert_labels_agree(out.labels, g[f"voc/{protocol}/default/pred"], what=f"NACLIP baseline labels ({protocol})")


def test_fusion_of_the_official_expert_logits():
    g = golden(*GOLDEN)
    for protocol, _ in PROTOCOLS:
        probs = torch.softmax(100 * g[f"voc/{protocol}/window_expert_logits_grid"][0], dim=1)
        size = tuple(g[f"voc/{protocol}/window0_fusion_overlap_count"].shape)
        fused, claims = expert_fusion(probs[None, :-1], probs[None, -1], size)
        assert torch.equal(claims[0].to(torch.uint8), g[f"voc/{protocol}/window0_fusion_overlap_count"])
        assert set(claims.unique().tolist()) >= {0, 1, 2}  # default, exact and conflict pixels all occur
        assert torch.allclose(fused.sum(1), torch.ones(1, *size), atol=1e-5)


def _fusion_by_hand(expert_probs, default_probs):
    """The official rules pixel by pixel on already upsampled ``E,Q,H,W`` / ``Q,H,W`` probabilities."""
    e_count, _, h, w = expert_probs.shape
    out = torch.empty_like(default_probs)
    for y in range(h):
        for x in range(w):
            claimers = [e for e in range(e_count) if int(expert_probs[e, :, y, x].argmax()) == e]
            if not claimers:
                out[:, y, x] = default_probs[:, y, x]
                continue
            best = claimers[0]
            for e in claimers[1:]:
                if expert_probs[e, e, y, x] > expert_probs[best, best, y, x]:
                    best = e
            out[:, y, x] = expert_probs[best, :, y, x]
    return out


def test_expert_fusion_equals_the_rules_pixel_by_pixel():
    generator = torch.Generator().manual_seed(0)
    experts = torch.softmax(3 * torch.randn(1, 4, 4, 5, 6, generator=generator), dim=2)
    experts[0, :, :, 0, 0] = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1],
                                           [0.7, 0.1, 0.1, 0.1]])  # at (0, 0) experts 1 and 2 claim with the
    # same own probability: the first one wins
    default = torch.softmax(torch.randn(1, 4, 5, 6, generator=generator), dim=1)
    fused, claims = expert_fusion(experts, default, (5, 6))  # size unchanged: no interpolation
    torch.testing.assert_close(fused[0], _fusion_by_hand(experts[0], default[0]), atol=0, rtol=0)
    assert claims[0, 0, 0] == 2 and torch.equal(fused[0, :, 0, 0], experts[0, 1, :, 0, 0])
    assert {0, 1, 2}.issubset(set(claims.unique().tolist()))


# --- the ranking stage --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol, preset", PROTOCOLS)
def test_ranking_stage_statistics_match_official(protocol, preset):
    """The official ``EntropyMetric`` statistics of the first 8 templates (one pass), and template 0's class map."""
    g = golden(*GOLDEN)
    key = f"voc/{protocol}/metric/"
    segmenter = _segmenter(preset=preset, rankings=None)
    spec = _voc20_spec()
    classifiers = floss_rankings.template_classifiers(segmenter.models.clip.text, spec)[:8]
    with torch.no_grad():
        probabilities = list(floss_rankings.template_class_probabilities(
            segmenter.method.base, segmenter.models, torch.from_numpy(voc_rgb()), classifiers, spec,
            segmenter.protocol, templates_per_pass=8))
    assert_labels_agree(probabilities[0].argmax(0), g[key + "pred_template0"], what="template 0 class map")
    sums, counts = map(np.stack, zip(*(floss_rankings.entropy_statistics(p) for p in probabilities), strict=True))
    official_sums, official_counts = g[key + "entropy_sum"][:8].numpy(), g[key + "pixel_count"][:8].numpy()
    pixels = 188 * 250
    worst_count = np.abs(counts - official_counts).max()
    mean, official_mean = (np.divide(s, np.maximum(c, 1)) for s, c in ((sums, counts), (official_sums,
                                                                                       official_counts)))
    worst_mean = np.abs(mean - official_mean).max()
    print(f"\nranking stage {protocol}: pixel counts differ by <= {worst_count:.0f} of {pixels}, "
          f"mean entropies by <= {worst_mean:.2e}")
    assert worst_count <= 0.0002 * pixels  # a handful of argmax ties flip at the 1e-6 level of the logits
    assert worst_mean <= 2e-3


@pytest.mark.parametrize("protocol", [p for p, _ in PROTOCOLS])
def test_rankings_from_official_statistics_equal_the_official_file(protocol):
    g = golden(*GOLDEN)
    key = f"voc/{protocol}/metric/"
    official = golden_meta(*GOLDEN)["rankings"][f"voc/{protocol}"]
    rankings = floss_rankings.rankings_from_statistics(
        g[key + "entropy_sum"].numpy(), g[key + "pixel_count"].numpy(), 188 * 250, CLASSES["voc20"], "naclip",
        official["dataset"])
    ids = torch.tensor([[s.template_id for s in scores] for scores in rankings.classes.values()])
    assert torch.equal(ids, g[key + "ranking"].long())
    assert rankings.to_json() == official  # keys, order, ranks, entropies and pixel shares
    assert TemplateRankings.from_json(official) == rankings


def test_rankings_strip_spaces_and_lookup_follows_classes_then_queries(tmp_path):
    stats = np.array([[2.0, 0.0], [1.0, 3.0], [0.0, 0.0]])  # T=3 templates, C=2 classes
    counts = np.array([[4.0, 0.0], [4.0, 3.0], [0.0, 0.0]])
    rankings = floss_rankings.rankings_from_statistics(stats, counts, 10, ["space suit", "rocket"])
    assert list(rankings.classes) == ["spacesuit", "rocket"]  # the official ranking stage removes spaces
    # ascending entropy; never-predicting templates (entropy 0, 0%) sort first and are skipped by readers
    assert [s.template_id for s in rankings.classes["spacesuit"]] == [2, 1, 0]
    assert rankings.templates("space suit", 4) == (1, 0)
    assert rankings.classes["rocket"][-1].pixel_percentage == pytest.approx(30.0)
    rankings.save(tmp_path / "r.json")
    assert TemplateRankings.load(tmp_path / "r.json") == rankings
    spec = ClassSpec(labels=("space suit", "background"), names=(("space suit", "astronaut suit"), ("rocket",)),
                     has_background=False)
    assert query_templates(rankings, spec, top_n=1) == [(1,), (1,), (1,)]  # "rocket" found by its query word
    with pytest.raises(UsageError, match="not a FLOSS template ranking"):
        TemplateRankings.from_json({"classes": {"x": {}}})


def test_unranked_classes_raise_or_take_the_default_classifier():
    """The golden's own VOC20 ranking has a class no template predicts: the official fusion raises on it."""
    own = golden_meta(*GOLDEN)["rankings"]["voc/voc20"]
    spec = _voc20_spec()
    empty = [q for q, t in zip(spec.queries, query_templates(TemplateRankings.from_json(own), spec), strict=True)
             if t is None]
    assert len(empty) == 1
    with pytest.raises(UsageError, match="unranked=default"):
        _segmenter(rankings=own).classifier(spec)
    classifier = _segmenter(rankings=own, unranked="default").classifier(spec)
    row = spec.queries.index(empty[0])
    torch.testing.assert_close(classifier.embeddings[row], classifier.embeddings[-1])
    assert classifier.embeddings.shape == (len(spec.queries) + 1, len(spec.queries), 64)


def test_official_rankings_download_cache_and_errors(tmp_path, monkeypatch):
    def offline(url, dst, progress=True):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match="could not download the official FLOSS ranking"):
        floss_rankings.official_rankings("naclip", "pascalvoc20", cache_dir=tmp_path)
    cached = tmp_path / floss_rankings.OFFICIAL_COMMIT[:12] / "naclip" / "template_rankings_naclip_pascalvoc20.json"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(_shipped_ranking()))
    assert floss_rankings.official_rankings("naclip", "pascalvoc20", cache_dir=tmp_path).dataset == "pascalvoc20"
    with pytest.raises(UsageError, match="ships rankings for models"):
        floss_rankings.official_rankings("sclip", "pascalvoc20")
    with pytest.raises(UsageError, match="vocabseg floss-rank --method sclip"):
        create("sclip+floss", rankings="official:pascalvoc20")
    with pytest.raises(UsageError, match="needs template rankings"):
        _segmenter().classifier(_voc20_spec())


# --- composition and the command -----------------------------------------------------------------------------------

def test_floss_presets_and_composition_with_resclip():
    presets = create("floss").presets
    assert set(presets) == {"voc20", "pc59", "cityscapes", "ade150", "coco-stuff"}
    assert presets["voc20"].protocol.crop is None and presets["cityscapes"].protocol.short_side == 560
    assert presets["pc59"].options == {"rankings": "official:pascalco59"}
    chain = create("naclip+resclip+floss").presets["voc20"]
    assert chain.protocol == presets["voc20"].protocol  # FLOSS's harness ...
    assert chain.options["rcs_weights"] == (2.0, 0.6) and chain.options["temp_thd"] == 0.1  # ... ResCLIP's weights
    with pytest.raises(UsageError, match="floss needs a base"):
        create("itaclip+floss")
    assert create("clearclip+floss", rankings=_shipped_ranking()).crop_multiple == 16  # the base's crops


@pytest.mark.parametrize("method", ["sclip+floss", "naclip+resclip+floss"])
def test_unshipped_compositions_rank_fuse_and_describe(method, clip, chelsea):
    """Bases the official FLOSS does not ship, end to end: rankings from the ranking stage, then fusion."""
    options = {"rcs_layers": (1, 2), "temp_thd": 0.0} if "resclip" in method else {}
    segmenter = Segmenter(method, models={"clip": clip}, text_cache=False, crop=64, stride=32, short_side=64,
                          **options)
    spec = segmenter.class_spec(["cat", "wall|floor", "sofa"], background=False)
    rankings = rank_templates(segmenter.method.base, Models({"clip": clip}), [chelsea], spec, segmenter.protocol,
                              model=segmenter.method.base.name)
    assert rankings.model == method.removesuffix("+floss") and set(rankings.classes) == {"cat", "wall", "sofa"}
    segmenter = Segmenter(method, models={"clip": clip}, text_cache=False, crop=64, stride=32, short_side=64,
                          rankings=rankings.to_json(), unranked="default", **options)
    out = segmenter.segment(chelsea, spec)
    assert out.meta["method"] == method and out.meta["method_options"]["top_n"] == 4
    assert out.meta["method_options"]["rankings"].startswith("given as data: 3 classes, model " + rankings.model)
    json.dumps(out.sidecar())  # the description stays JSON
    assert out.labels.shape == chelsea.shape[:2] and np.isin(out.labels, [0, 1, 2]).all()
    assert out.logits.min() >= 0 and out.logits.max() <= 1 + 1e-6  # FLOSS's "logits" are fused probabilities
    experts = segmenter.classifier(spec).embeddings
    assert experts.shape == (5, 4, clip.text.embed_dim)
    assert any(not torch.allclose(expert, experts[-1]) for expert in experts[:-1])


def test_floss_rank_command_then_segment(tiny_weights, chelsea, tmp_path):
    Image.fromarray(chelsea[:96, :128]).save(tmp_path / "a.png")
    Image.fromarray(chelsea[100:196, 200:328]).save(tmp_path / "b.png")
    rankings = tmp_path / "rankings.json"
    code = main(["floss-rank", str(tmp_path), "--classes", "cat,wall|floor", "--out", str(rankings),
                 "--weights", str(tiny_weights), "--device", "cpu", "--short-side", "64", "--no-text-cache"])
    assert code == 0
    data = json.loads(rankings.read_text())
    assert data["model"] == "naclip" and data["dataset"] == "custom" and set(data["classes"]) == {"cat", "wall"}
    assert sorted(e["template_id"] for e in data["classes"]["cat"]["entropy_ranking"]) == list(range(80))
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "a.png"), "--classes", "cat,wall|floor", "--no-background",
                 "--method", "sclip+floss", "--option", f"rankings={rankings}", "--option", "unranked=default",
                 "--weights", str(tiny_weights), "--device", "cpu", "--short-side", "64", "--out", str(out)])
    assert code == 0
    meta = json.loads((out / "a.json").read_text())
    assert meta["method"] == "sclip+floss" and meta["method_options"]["rankings"] == str(rankings)
    assert main(["floss-rank", str(tmp_path), "--classes", "cat", "--out", str(rankings)]) == 2  # exists: usage
    assert main(["floss-rank", str(tmp_path), "--out", str(tmp_path / "r2.json")]) == 2  # no classes
