"""Parity checks shared by the goldens of methods on the SCLIP-lineage harness (SC-CLIP, SFP, PEARL): the oracle
photo and names, P(336), the official windows, per-query logits and label maps through the public API; and a tiny
CLIP whose image encoder has no class token."""

from __future__ import annotations

import functools

import torch
from oracle import (
    assert_close_logits,
    assert_labels_agree,
    oracle_path,
    tiny_clip,
    voc_class_spec,
    voc_rgb,
)

from vocabseg import Segmenter
from vocabseg.models.encoder import CLIP
from vocabseg.pipeline import windows
from vocabseg.pipeline.postprocess import max_over_names
from vocabseg.pipeline.preprocess import preprocess
from vocabseg.text.classifier import TextClassifier

#: The oracle's protocol names -> vocabseg preset names.
PRESET_OF = {"voc21": "voc21", "context59": "pc59", "coco_object": "coco-object"}


def crop224() -> torch.Tensor:
    """The oracle's common window ``1,3,224,224`` (``inputs_voc.pt: voc/crop224``: the top-left 224 crop of the
    P(336) input)."""
    return torch.load(oracle_path("inputs_voc.pt"), weights_only=True)["voc/crop224"][None]


@functools.cache
def voc_classifier() -> TextClassifier:
    """The text classifier of :func:`voc_class_spec` (80 templates), built once."""
    return TextClassifier.build(tiny_clip().text, voc_class_spec(), cache=None)


def segmenter(method: str, preset: str | None = None, **overrides) -> Segmenter:
    """A segmenter on the tiny CLIP whose classifier for the oracle's classes is :func:`voc_classifier`."""
    seg = Segmenter(method, models={"clip": tiny_clip()}, preset=preset, text_cache=False, **overrides)
    seg._classifiers[voc_class_spec()] = voc_classifier()
    return seg


def check_text(seg: Segmenter, golden: dict) -> None:
    classifier = seg.classifier(voc_class_spec())
    assert classifier.query_class.tolist() == golden["voc/query_idx"].tolist()
    assert_close_logits(classifier.embeddings, golden["voc/text_features"], 1e-5, "text features")


def check_windows(seg: Segmenter, boxes: torch.Tensor, grids: torch.Tensor, what: str = "window grids") -> None:
    """All official windows ``(y1, x1, y2, x2)`` of the P(336) input in one batch -> per-window cosine grids
    ``n,Q,gh,gw`` (normalised patch features @ text)."""
    x = preprocess(torch.from_numpy(voc_rgb()), 336)
    boxes_ours = windows.sliding_windows(*x.shape[-2:], seg.protocol.crop, seg.protocol.stride) \
        if seg.protocol.crop else [windows.Window(0, x.shape[-2], 0, x.shape[-1])]
    assert [[w.y1, w.x1, w.y2, w.x2] for w in boxes_ours] == boxes.tolist()
    crops = torch.cat([x[:, :, w.y1:w.y2, w.x1:w.x2] for w in boxes_ours])
    text = seg.classifier(voc_class_spec()).embeddings
    with torch.inference_mode():
        features, grid = seg.method.patch_features(seg.models.clip.image, crops)
    ours = (features @ text.T).transpose(1, 2).reshape(len(boxes_ours), len(text), *grid)
    assert_close_logits(ours, grids, 1e-4, what)


def check_logits(seg: Segmenter, golden_s2: torch.Tensor, what: str = "merged logits") -> torch.Tensor:
    """Per-query raw logits ``Q,H,W`` of ``method.predict`` and the per-class ``out.logits`` of ``segment`` against
    the official merged logits (stored every second row and column); returns the per-query logits."""
    spec = voc_class_spec()
    classifier = seg.classifier(spec)
    logits = seg.results([voc_rgb()], spec)[0].logits
    assert_close_logits(logits[:, ::2, ::2], golden_s2, 1e-4, what)
    out = seg.segment(voc_rgb(), spec)
    official = max_over_names(golden_s2, classifier.query_class, spec.num_classes)
    assert_close_logits(out.logits[:, ::2, ::2], official, 1e-4, what + " (per class, segment)")
    return logits


def check_labels(seg: Segmenter, pred: torch.Tensor, what: str = "labels") -> None:
    assert_labels_agree(seg.segment(voc_rgb(), voc_class_spec()).labels, pred, 0.995, what)


def check_preset(method: str, meta: dict) -> None:
    """Each oracle protocol (logit scale, thresholds, P(336), W(224, 112)) is the method's preset of that name."""
    for protocol, values in meta["protocols"].items():
        preset = segmenter(method, PRESET_OF[protocol]).protocol
        assert (preset.short_side, preset.crop, preset.stride) == (336, 224, 112)
        assert (preset.logit_scale, preset.prob_thd, preset.area_thd) == (
            values["logit_scale"], values["prob_thd"], values["area_thd"]), protocol


def run_cli(tmp_path, method: str, *arguments: str) -> dict:
    """``vocabseg segment`` of the oracle photo with the tiny CLIP; returns the JSON sidecar."""
    import json

    from oracle import oracle_path, tiny_clip_weights

    from vocabseg.cli import main

    out = tmp_path / "out"
    code = main(["segment", str(oracle_path("voc.png")), "--method", method, "--weights", str(tiny_clip_weights()),
                 "--device", "cpu", "--no-text-cache", "--classes", "aeroplane,person|person in shirt",
                 "--background", "sky|wall|floor", "--out", str(out), *arguments])
    assert code == 0 and (out / "voc.png").is_file()
    return json.loads((out / "voc.json").read_text())


@functools.cache
def class_free_clip() -> CLIP:
    """A tiny random CLIP whose image encoder has no prefix token (a timm ViT without class token, average-pooled,
    read out per token by a linear map into the oracle's tiny text space), as SigLIP's is."""
    import timm
    from conftest import make_tiny_clip

    from vocabseg.models.openclip import from_open_clip
    from vocabseg.models.timm_vit import TimmViT

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=2, class_token=False, global_pool="avg",
        num_classes=0)
    encoder = TimmViT(vit, "class-free", "test", readout=torch.nn.Linear(64, 32), embed_dim=32)
    return CLIP(encoder, from_open_clip(make_tiny_clip(), name="tiny", source="test").text, "class-free", "test")
