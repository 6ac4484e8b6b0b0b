"""ProxyCLIP against the official code's outputs (``shared/oracle/proxyclip``: tiny CLIP + tiny DINO ViT-B/8, VOC
photo, ``cfg_voc21`` protocol), end to end through the public API and stage by stage on the first window."""

import pytest
import torch
import torch.nn.functional as F
from oracle import (
    assert_close_logits,
    assert_labels_agree,
    golden,
    oracle_class_spec,
    oracle_path,
    tiny_clip,
    voc_rgb,
)

from vocabseg import Segmenter
from vocabseg.methods.proxyclip.method import (
    dino_input,
    dino_patch_tokens,
    proxy_attention,
    proxy_block_output,
    proxy_image_features,
)
from vocabseg.pipeline import postprocess
from vocabseg.pipeline.preprocess import preprocess

RUN = "voc/voc21/"
WIN = RUN + "win0/"


@pytest.fixture(scope="module")
def gold():
    return golden("proxyclip", "golden_proxyclip_voc21.pt")


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter("proxyclip", models={"clip": tiny_clip(), "dino": str(oracle_path("vfm", "tiny_dino_vitb8.pt"))},
                     device="cpu", text_cache=False, preset="voc21")


@pytest.fixture(scope="module")
def spec():
    return oracle_class_spec("proxyclip", "names_voc21.txt")


@pytest.fixture(scope="module")
def window(segmenter):
    """The first window of the official run (``[0:336, 0:336]`` of the 336x447 input)."""
    x = preprocess(torch.from_numpy(voc_rgb()), segmenter.protocol.short_side,
                   normalization=segmenter.models.clip.image.normalization)
    return x[:, :, :336, :336]


def test_end_to_end_logits_and_labels(segmenter, spec, gold, one_thread):
    classifier = segmenter.classifier(spec)
    assert_close_logits(classifier.embeddings, gold[RUN + "text_features"], atol=1e-5, what="text classifier")
    assert classifier.query_class.tolist() == gold[RUN + "query_idx"].tolist()
    out = segmenter.segment(voc_rgb(), spec)
    per_class = postprocess.max_over_names(gold[RUN + "seg_logits_s2"], gold[RUN + "query_idx"], spec.num_classes)
    assert_close_logits(out.logits[:, ::2, ::2], per_class, what="seg_logits (max over names)")
    assert_labels_agree(out.labels, gold[RUN + "pred"])
    assert out.meta["models"]["dino"]["source"].endswith("tiny_dino_vitb8.pt")
    raw = segmenter.results([voc_rgb()], spec)[0]
    assert_close_logits(raw.logits[:, ::2, ::2], gold[RUN + "seg_logits_s2"], what="seg_logits (per query)")


def test_preset_is_the_official_voc21_config(segmenter):
    p = segmenter.protocol
    assert (p.short_side, p.crop, p.stride, p.logit_scale, p.prob_thd, p.pamr) == (336, 336, 112, 40.0, 0.2, False)
    assert segmenter.method.crop_multiple == 56
    assert segmenter.class_spec().names[0][:3] == ("sky", "wall", "tree") and len(segmenter.class_spec().names) == 21


def test_dino_tokens_of_the_first_window(segmenter, window, gold, one_thread):
    dino = segmenter.models.dino
    with torch.no_grad():
        tokens = dino.head(dino.run_blocks(dino.embed(dino_input(window, dino))))[0]
        patches, grid = dino_patch_tokens(dino, window)
    assert gold[WIN + "box"].tolist() == [0, 0, 336, 336]
    assert_close_logits(tokens, gold[WIN + "dino_tokens"], atol=2e-5, what="DINO tokens (1765x128)")
    assert grid == (42, 42) and torch.equal(patches[0], tokens[1:])


def test_proxy_attention_rows(gold):
    attention = proxy_attention(gold[WIN + "dino_tokens"][None, 1:], beta=1.2, gamma=3.0)[0]
    rows = gold[WIN + "proxy_attn_row_idx"]
    assert_close_logits(attention[rows], gold[WIN + "proxy_attn_rows"], atol=1e-6, what="proxy attention rows")
    assert torch.equal(attention[rows] > 0, gold[WIN + "proxy_attn_rows"] > 0)  # the same -inf mask


def test_last_block_and_logit_grid_of_the_first_window(segmenter, window, gold, one_thread):
    """From the official DINO tokens on: the last block's output, features and grid logits (the official recorder
    kept ``image_features`` after its in-place L2 normalisation, so they are compared normalised)."""
    encoder = segmenter.models.clip.image
    attention = proxy_attention(gold[WIN + "dino_tokens"][None, 1:])
    with torch.no_grad():
        x = encoder.run_blocks(encoder.embed(window), 0, encoder.num_blocks - 1)
        block = proxy_block_output(encoder, x, attention, (21, 21), (42, 42))[0]
        features = proxy_image_features(encoder, window, attention, (42, 42))[0]
    assert_close_logits(block, gold[WIN + "custom_attn_out"], atol=1e-5, what="last block out_proj(A V)")
    assert_close_logits(F.normalize(features, dim=-1), gold[WIN + "image_features"], atol=1e-5,
                        what="image features (normalised)")
    grid = (F.normalize(features, dim=-1) @ gold[RUN + "text_features"].T).T.reshape(-1, 42, 42)
    assert_close_logits(grid, gold[WIN + "logits_grid"], atol=1e-5, what="logits grid (Q,42,42)")


def test_batched_images_equal_single_images(segmenter, one_thread):
    """Windows of several images share DINO and CLIP passes; the proxy attention's mean is per window."""
    photo = voc_rgb()
    images = [photo, photo[:, ::-1].copy(), photo[:150, :200].copy()]
    batching = Segmenter("proxyclip", models=segmenter.models, text_cache=False, preset="voc21", window_batch=4)
    batched = batching.segment_batch(images, ["person", "chair", "table"])
    for image, together in zip(images, batched, strict=True):
        alone = segmenter.segment(image, ["person", "chair", "table"])
        assert_close_logits(together.logits, torch.from_numpy(alone.logits), atol=1e-5, what="batched vs alone")
        assert (together.labels == alone.labels).all()


def test_demo_offers_it_with_a_dino_and_passes_its_options(segmenter):
    from vocabseg.demo.server import DemoApp

    assert "proxyclip" not in DemoApp(segmenter.models.clip, text_cache=False).methods  # no DINO named
    app = DemoApp(segmenter.models.clip, text_cache=False, models={"dino": segmenter.models.dino},
                  method_options={"beta": 1.5})
    proxy = app.segmenter("proxyclip")
    assert proxy.method.beta == 1.5 and proxy.models.dino is segmenter.models.dino
    assert app.segmenter("sclip").method.name == "sclip"  # options it does not have are not passed


def test_dino_is_a_model_not_an_option(segmenter):
    from vocabseg.errors import UsageError

    assert segmenter.describe(segmenter.class_spec())["models"]["dino"]["arch"] == "DINO ViT-w128-d4/8"
    with pytest.raises(UsageError, match="dino"):
        Segmenter("proxyclip", models=segmenter.models, text_cache=False, dino="dino_vitb8")
