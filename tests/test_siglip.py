"""Issue 13 item 9: the model layer is open. A SigLIP2-style open_clip model (a timm ViT without a class token and
with an attention-pooling head, a text tower with last-token pooling and a Hugging Face tokenizer), built at random
from its config, runs the last-block methods end to end through ``--weights FILE --arch NAME``, with its own
normalisation and tokenizer, reading each patch token out through the pooling head alone. Methods that read a class
token refuse it with a clear message.

The real SigLIP tokenizers download from the Hugging Face hub (and are cached there); here a tiny word-level
tokenizer is built locally in the same format.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracle import oracle_path

from vocabseg import Segmenter
from vocabseg.errors import UsageError

ARCH = ""  # set by the fixture: the local folder holding the config
WORDS = ["<pad>", "<eos>", "<unk>", "a", "photo", "of", "the", "cat", "dog", "sky", "sofa", "couch", "plant", "wall"]


def _register_timm_tower() -> str:
    """A tiny SigLIP-style timm ViT: no class token, attention-pool ('map') head, patch 16."""
    import timm
    from timm.models import vision_transformer

    name = "vit_test_tiny_patch16_siglip"
    if name not in timm.list_models(name):
        @timm.models.register_model
        def vit_test_tiny_patch16_siglip(pretrained=False, **kwargs):
            settings = dict(patch_size=16, embed_dim=64, depth=2, num_heads=2, class_token=False,
                            global_pool="map", img_size=64)
            return vision_transformer._create_vision_transformer(name, pretrained=False, **{**settings, **kwargs})
    return name


@pytest.fixture(scope="module")
def siglip_file(tmp_path_factory):
    """The random model saved as a state dict, its open_clip config and tokenizer registered (as a user's
    ``open_clip.add_model_config`` and the hub's tokenizer files would make them available)."""
    import open_clip
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    folder = tmp_path_factory.mktemp("siglip")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (folder / "model").mkdir()
    tokenizer.save(str(folder / "model" / "tokenizer.json"))
    (folder / "model" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "<eos>",
        "unk_token": "<unk>", "model_max_length": 16}))
    config = {
        "embed_dim": 64, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 64, "timm_model_name": _register_timm_tower(), "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": len(WORDS), "hf_tokenizer_name": str(folder / "model"),
                     "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 64, "heads": 2, "layers": 2,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
    }
    # the layout of a Hugging Face hub model (hf-hub:timm/ViT-B-16-SigLIP2), read from a local folder
    (folder / "model" / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": config, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    global ARCH
    ARCH = f"local-dir:{folder / 'model'}"
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None)
    path = folder / "siglip2-tiny.pt"
    torch.save(model.state_dict(), path)
    return path


LAST_BLOCK = ("clip", "maskclip", "sclip", "clearclip", "naclip")


@pytest.mark.parametrize("method", LAST_BLOCK)
def test_last_block_methods_run_on_a_siglip2_style_model(method, siglip_file, one_thread):
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    seg = Segmenter(method, weights=str(siglip_file), arch=ARCH, device="cpu", text_cache=False,
                    short_side=64, crop=48, stride=32)
    encoder = seg.models.clip.image
    assert encoder.prefix_tokens == 0 and encoder.patch_size == 16
    assert encoder.normalization.mean == encoder.normalization.std == (0.5, 0.5, 0.5)  # SigLIP's, not OpenAI's
    out = seg.segment(image, ["cat", "dog|sofa"], background=["wall", "sky"])
    assert out.labels.shape == (70, 90) and out.scores.shape == (3, 70, 90)
    assert np.isfinite(out.logits).all()
    assert out.meta["models"]["clip"]["arch"] == ARCH


def test_its_own_tokenizer_and_text_pooling_build_the_classifier(siglip_file):
    import open_clip

    seg = Segmenter("sclip", weights=str(siglip_file), arch=ARCH, device="cpu", text_cache=False)
    text = seg.models.clip.text
    assert type(text.tokenizer).__name__ == "HFTokenizer"
    model = open_clip.create_model(ARCH, pretrained=None)
    model.load_state_dict(torch.load(siglip_file, weights_only=True))
    tokens = open_clip.get_tokenizer(ARCH)(["a photo of the cat"])
    assert tokens[0, :5].tolist() == [WORDS.index(w) for w in ("a", "photo", "of", "the", "cat")]
    expected = torch.nn.functional.normalize(model.eval().encode_text(tokens), dim=-1)
    ours = torch.nn.functional.normalize(text.encode(["a photo of the cat"]), dim=-1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_each_patch_token_is_read_out_through_the_pooling_head_alone(siglip_file):
    """Validation of the per-token readout: attention pooling over N identical tokens equals pooling over one, so
    for a token map whose tokens are all the same the readout of every token must equal the model's own pooled
    image embedding of that map; and distinct tokens must give distinct readouts (no mixing across tokens)."""
    seg = Segmenter("clip", weights=str(siglip_file), arch=ARCH, device="cpu", text_cache=False)
    encoder = seg.models.clip.image
    visual = encoder.model
    token = torch.randn(1, 1, 64)
    same = token.expand(1, 9, 64)
    with torch.no_grad():
        pooled = seg.models.clip.image.readout(same)
        trunk_pooled = visual.forward_head(visual.norm(same))
    assert pooled.shape == (1, 9, 64)
    assert torch.allclose(pooled, pooled[:, :1].expand_as(pooled), atol=1e-6)
    with torch.no_grad():
        mixed = encoder.readout(torch.cat([token, -token], dim=1))
        alone = encoder.readout(-token)
    torch.testing.assert_close(mixed[:, 1:], alone, rtol=0, atol=1e-6)
    assert trunk_pooled.shape[-1] == 64


@pytest.mark.parametrize("method", ["scclip", "sfp", "cliptrase", "cass", "maft"])
def test_methods_that_read_a_class_token_refuse_it(method, siglip_file):
    models = {"clip": str(siglip_file)}
    if method == "cass":
        models["dino"] = str(oracle_path("cass", "tiny_dino_vit8w128.pt"))
    with pytest.raises(UsageError, match="class token"):
        Segmenter(method, models=models, arch=ARCH, device="cpu", text_cache=False)
