"""Every last-block recipe against a direct computation from q/k/v, head by head, on a tiny random CLIP."""

import math

import pytest
import torch
import torch.nn.functional as F
from reference import heads, softmax_rows

from vocabseg.methods import registry
from vocabseg.methods.last_block.method import gaussian_prior
from vocabseg.models.encoder import SCALE_PLUS_OFFSET, Models
from vocabseg.text.classes import parse_classes
from vocabseg.text.classifier import TextClassifier


def _direct_last_block(model, images, attention, residual, ffn):
    """Reference: explicit per-head matmuls over the raw parameters of open_clip's last block."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    qs, ks, vs = heads(last, x)
    outs = [attention(q, k, 1 / math.sqrt(q.shape[-1])) @ v for q, k, v in zip(qs, ks, vs, strict=True)]
    o = last.attn.out_proj(torch.cat(outs, dim=-1))
    x = x + o if residual else o
    if ffn:
        x = x + last.mlp(last.ln_2(x))
    feats = visual.ln_post(x) @ visual.proj
    return F.normalize(feats[:, 1:], dim=-1)


RECIPES = {
    "clip": (lambda q, k, s: softmax_rows(s * q @ k.transpose(-1, -2)), True, True),
    "maskclip": (lambda q, k, s: torch.eye(q.shape[-2]), True, True),
    "sclip": (lambda q, k, s: softmax_rows(s * q @ q.transpose(-1, -2)) + softmax_rows(s * k @ k.transpose(-1, -2)),
              True, True),
    "clearclip": (lambda q, k, s: softmax_rows(s * q @ q.transpose(-1, -2)), False, False),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_equals_direct_computation(name, clip, tiny_model):
    attention, residual, ffn = RECIPES[name]
    images = torch.randn(2, 3, 64, 80)  # 4 x 5 grid: positional embedding interpolated
    method = registry.create(name)
    with torch.no_grad():
        ours, grid = method.patch_features(clip.image, images)
        pos = clip.image.positions(4, 5, SCALE_PLUS_OFFSET)
        saved = tiny_model.visual.positional_embedding
        tiny_model.visual.positional_embedding = torch.nn.Parameter(pos, requires_grad=False)
        try:
            reference = _direct_last_block(tiny_model, images, attention, residual, ffn)
        finally:
            tiny_model.visual.positional_embedding = saved
    assert grid == (4, 5)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_naclip_equals_direct_computation_with_gaussian_prior(clip, tiny_model):
    images = torch.randn(1, 3, 64, 64)
    sigma = 1.5
    gh = gw = 4
    prior = torch.zeros(17, 17)
    for i in range(16):
        for j in range(16):
            yi, xi, yj, xj = i // gw, i % gw, j // gw, j % gw
            prior[1 + i, 1 + j] = math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * sigma**2))
    torch.testing.assert_close(gaussian_prior((gh, gw), sigma), prior)

    def attention(q, k, s):
        return softmax_rows(s * k @ k.transpose(-1, -2) + prior)

    with torch.no_grad():
        ours, _ = registry.create("naclip", gaussian_std=sigma).patch_features(clip.image, images)
        reference = _direct_last_block(tiny_model, images, attention, residual=False, ffn=False)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_tiny_model_attention_is_not_uniform(clip):
    """The recipe tests only mean something if attention maps are peaked."""
    with torch.no_grad():
        encoder = clip.image
        x = encoder.run_blocks(encoder.embed(torch.randn(1, 3, 64, 64)), 0, encoder.num_blocks - 1)
        q, k, _ = encoder.qkv(encoder.num_blocks - 1, x)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    entropy = -(attn * attn.clamp_min(1e-12).log()).sum(-1).mean()
    assert entropy < 0.8 * math.log(attn.shape[-1])


def test_vanilla_recipe_equals_plain_forward(clip):
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, _ = registry.create("clip").patch_features(clip.image, images)
        plain = F.normalize(clip.image.head(clip.image.run_blocks(clip.image.embed(images)))[:, 1:], dim=-1)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)


def test_unknown_method_and_option_errors(clip):
    from vocabseg import Segmenter

    with pytest.raises(ValueError, match="unknown method"):
        registry.create("nope")
    with pytest.raises(ValueError, match=r"unknown setting.*strides"):
        Segmenter("sclip", models={"clip": clip}, strides=3)
    with pytest.raises(ValueError, match="no preset"):
        Segmenter("sclip", models={"clip": clip}, preset="mars")
    seg = Segmenter("naclip", models={"clip": clip}, gaussian_std=2.0, crop=0)
    assert seg.method.gaussian_std == 2.0 and not seg.protocol.crop


@pytest.mark.parametrize("value, match", [("abc", "gaussian_std must be a number"), (-5, "must be positive")])
def test_bad_option_values_are_usage_errors(clip, value, match):
    from vocabseg import Segmenter
    from vocabseg.errors import UsageError

    with pytest.raises(UsageError, match=match):
        Segmenter("naclip", models={"clip": clip}, gaussian_std=value)


@pytest.mark.parametrize("word, expected", [("false", False), ("0", False), ("no", False), ("yes", True), ("1", True)])
def test_boolean_options_accept_words(word, expected):
    assert registry.create("itaclip", closing=word).closing is expected
    assert registry.create("cliptrase", clustering=word).clustering is expected


def test_presets_follow_the_spec_tables():
    sclip = registry.method_class("sclip").presets
    assert sclip["voc21"].protocol.logit_scale == 65 and sclip["voc21"].protocol.area_thd == 0.1
    assert sclip["coco-stuff"].protocol.short_side == 448 and sclip["cityscapes"].protocol.short_side == 560
    naclip = registry.method_class("naclip").presets
    assert not naclip["voc21"].protocol.crop and naclip["ade150"].protocol.crop == 224
    assert all(p.protocol.pamr for p in naclip.values())
    clear = registry.method_class("clearclip").presets
    assert clear["voc21"].protocol.prob_thd == 0.5 and clear["cityscapes"].protocol.crop == 224
    assert clear["pc59"].protocol.crop == 448 and clear["pc59"].protocol.stride == 224
    spec = sclip["voc21"].class_spec()
    assert spec.has_background and len(spec.labels) == 21 and len(spec.names[0]) == 26


def test_clearclip_pads_crops_to_whole_patches_and_crops_the_logits_back(clip):
    text = F.normalize(torch.randn(3, clip.image.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    classifier = TextClassifier(parse_classes("a,b,c", background=False), text, torch.arange(3))
    models = Models({"clip": clip})
    crops = torch.randn(2, 3, 50, 37, generator=torch.Generator().manual_seed(1))
    clearclip = registry.create("clearclip")
    out = clearclip.crop_function(models, classifier, clearclip.default_protocol)(crops)
    padded = F.pad(crops, (5, 6, 7, 7))  # 37 -> 48 (5 left, 6 right), 50 -> 64 (7 and 7), zeros after normalising
    expected = clearclip.crop_logits(models, padded, text)[..., 7:57, 5:42]
    assert out.shape == (2, 3, 50, 37)
    torch.testing.assert_close(out, expected)
    whole = crops[..., :48, :32]  # whole patches: nothing to pad
    torch.testing.assert_close(clearclip.crop_function(models, classifier, clearclip.default_protocol)(whole),
                               clearclip.crop_logits(models, whole, text))
    sclip = registry.create("sclip")  # SCLIP's code does not pad: the patch convolution floors the grid
    torch.testing.assert_close(sclip.crop_function(models, classifier, sclip.default_protocol)(crops),
                               sclip.crop_logits(models, crops, text))


@pytest.mark.parametrize("build", [
    lambda: registry.create("naclip", gaussian_std="nan"),
    lambda: registry.create("naclip", gaussian_std=0),
    lambda: registry.method_class("naclip")(gaussian_std=-1.0),  # direct construction is checked too
], ids=["nan", "zero", "direct"])
def test_option_ranges_are_checked_on_construction(build):
    from vocabseg.errors import UsageError

    with pytest.raises(UsageError, match=r"gaussian_std must be positive \(got"):
        build()


def test_ranges_are_listed_with_the_options(capsys):
    from vocabseg.cli import main

    assert main(["methods", "naclip"]) == 0
    assert "option gaussian_std=5.0 (float, positive)" in capsys.readouterr().out


def test_crop_smaller_than_the_main_models_patch_is_refused():
    from conftest import TINY_CFG, make_tiny_clip

    from vocabseg import Segmenter
    from vocabseg.errors import UsageError
    from vocabseg.models.openclip import from_open_clip

    cfg = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "patch_size": 32}}
    clip32 = from_open_clip(make_tiny_clip(cfg=cfg), name="tiny-p32", source="test")
    with pytest.raises(UsageError, match="crop 24 is smaller than one 32-pixel patch of tiny-p32: give at least 32"):
        Segmenter("sclip", models={"clip": clip32}, crop=24, stride=12, text_cache=False)
    assert Segmenter("sclip", models={"clip": clip32}, crop=32, stride=16, text_cache=False).protocol.crop == 32
