"""IFSeg on OFA against the official code (``shared/oracle/ifseg_ofa``): tokenisation, every stored stage of the
forward pass on the VOC photo, kNN smoothing, label maps through ``Segmenter("ifseg").segment``.

Tolerances are the oracle README's section 10: stage outputs ``allclose(rtol=1e-4, atol=1e-4)``, logits ``atol 1e-4``,
kNN probabilities to 1e-6 outside the tokens it marks as tie-influenced, label maps >= 99.5 % equal.
"""

import functools
import json

import pytest
import torch
from oracle import assert_close_logits, assert_labels_agree, golden, oracle_path, voc_rgb

from vocabseg import Segmenter
from vocabseg.methods.ifseg.knn import knn_indices, smooth_over_neighbours
from vocabseg.methods.ifseg.ofa import category_prompt, grid_to_image, knn_probabilities, preprocess, segmentation_pass
from vocabseg.models.ofa import OFATokenizer, load_ofa

VOC5 = ["person", "bus", "dining table", "potted plant", "tv monitor"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _voc() -> dict[str, torch.Tensor]:
    return {k[len("voc/"):]: v for k, v in golden("ifseg_ofa", "golden_voc.pt").items() if k.startswith("voc/")}


@functools.cache
def _tokenizer() -> OFATokenizer:
    return OFATokenizer.from_folder(oracle_path("ifseg_ofa", "bpe"))


@functools.cache
def _model():
    return load_ofa(oracle_path("ifseg_ofa", "tiny_ifseg_ofa_d64.pt")).model


@functools.cache
def _forward():
    """Our pass on the VOC photo, with the inputs of the first encoder and decoder layers recorded."""
    model, recorded = _model(), {}

    def record(name, output=False):
        def hook(module, args, *out):
            recorded[name] = out[0] if output else args[0]
        return hook

    hooks = [model.encoder.layers[0].register_forward_pre_hook(record("enc_in")),
             model.decoder.layers[0].register_forward_pre_hook(record("dec_in")),
             model.encoder.register_forward_hook(record("enc", output=True)),
             model.decoder.register_forward_hook(record("dec", output=True))]
    prompt = category_prompt(_tokenizer(), VOC5)
    with torch.no_grad():
        embeddings = model.embed_words(list(prompt.word_tokens))
        seg = segmentation_pass(model, preprocess(torch.from_numpy(voc_rgb())), prompt.tokens, embeddings)
    for hook in hooks:
        hook.remove()
    return seg, embeddings, prompt, recorded


@pytest.mark.parametrize("name", ["voc5", "coco_unseen15", "ade150", "coco_fine171"])
def test_tokenisation_ids_are_the_official_ones(name):
    lists = json.loads(oracle_path("ifseg_ofa", "tokenization.json").read_text())["lists"][name]
    words = lists["id2rawtext(with unknown)"][:-1]
    prompt = category_prompt(_tokenizer(), words)
    assert prompt.tokens.tolist() == lists["src_tokens"]
    assert [t.tolist() for t in prompt.word_tokens] == [c["dict_ids"] for c in lists["categories"][:-1]]
    assert [_tokenizer().tokens(" " + c["word"]) for c in lists["categories"]] == [
        c["gpt2_tokens"] for c in lists["categories"]]
    assert torch.cat(prompt.word_tokens).tolist() == lists["embedding_bag_input"]["ids"]


def test_hugging_face_vocabulary_layout_gives_the_same_ids(tmp_path):
    """``vocab.json`` (tokens -> dictionary indices, as BART's and OFA-Sys/ofa-base's) with ``merges.txt``, built
    here from the fairseq files, tokenises every official list to the same ids."""
    import gzip

    bpe = oracle_path("ifseg_ofa", "bpe")
    encoder = json.loads(gzip.decompress((bpe / "encoder.json.gz").read_bytes()))
    lines = gzip.decompress((bpe / "dict.txt.gz").read_bytes()).decode().splitlines()
    index = {int(line.split()[0]): 4 + i for i, line in enumerate(lines) if line.split()[0].isdigit()}
    vocab = {token: index[gpt2] for token, gpt2 in encoder.items() if gpt2 in index}
    vocab.update({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_bytes(gzip.decompress((bpe / "vocab.bpe.gz").read_bytes()))
    hf = OFATokenizer.from_folder(tmp_path)
    for lists in json.loads(oracle_path("ifseg_ofa", "tokenization.json").read_text())["lists"].values():
        words = lists["id2rawtext(with unknown)"][:-1]
        assert category_prompt(hf, words).tokens.tolist() == lists["src_tokens"]


def test_preprocessing_is_the_official_resize_and_normalisation():
    voc = _voc()
    x = preprocess(torch.from_numpy(voc_rgb()))
    expected = (voc["resized_rgb_uint8"].permute(2, 0, 1).float().div(255) - 0.5) / 0.5
    assert torch.equal(x[0], expected)


def _close(ours, theirs, what):
    diff = float((ours - theirs).abs().max())
    print(f"{what}: max |diff| {diff:.2e}")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=what)


def test_every_stored_stage_of_the_forward_pass():
    voc = _voc()
    seg, embeddings, prompt, recorded = _forward()
    assert prompt.tokens.tolist() == voc["src_tokens"].tolist()
    assert list(seg.grid) == voc["image_embed_shape"].tolist()
    features = seg.features[0]
    _close(features.norm(dim=-1), voc["resnet_layer3_l2norm"], "ResNet layer3 L2 norms")
    _close(features.mean(0), voc["resnet_layer3_channel_mean"], "ResNet layer3 channel means")
    rows = features.reshape(*seg.grid, -1)[voc["resnet_layer3_rows"]]
    _close(rows, voc["resnet_layer3_of_rows"], "ResNet layer3 rows")
    model = _model()
    with torch.no_grad():
        projected = model.encoder.project_features(features.T.reshape(1, -1, *seg.grid))[0]
    _close(projected, voc["image_proj_out"], "image_proj")
    _close(recorded["enc_in"][0], voc["enc_layer0_input"], "encoder layer 0 input")
    _close(recorded["enc"].hidden[0], voc["enc_out"], "encoder output")
    _close(recorded["dec_in"][0], voc["dec_layer0_input"], "decoder layer 0 input")
    _close(recorded["dec"][0], voc["dec_out"], "decoder output")
    assert_close_logits(embeddings, voc["seg_embed_tokens"], atol=1e-6, what="category embeddings")
    assert_close_logits(seg.logits[0], voc["seg_logits"][:-1], what="seg logits")


def test_knn_smoothing_replays_the_official_neighbours_bit_for_bit():
    voc = _voc()
    probs = torch.softmax(voc["seg_logits"], dim=-1)[:-1]
    smoothed = smooth_over_neighbours(probs[None], voc["knn_topk_indices"][None], 25)[0]
    assert torch.equal(smoothed, voc["knn_prob"][:-1])
    assert voc["knn_prob"][-1].abs().max() == 0  # the appended "fake eos" row


def test_knn_neighbours_and_probabilities_outside_ties():
    voc = _voc()
    seg = _forward()[0]
    tie = voc["knn_tie_influenced"]
    ours = knn_indices(seg.features, 3)[0]
    differ = (ours.sort(1).values != voc["knn_topk_indices"].sort(1).values).any(1) & ~tie
    unit = torch.nn.functional.normalize(seg.features[0], dim=-1)
    top4 = (unit[differ] @ unit.T).topk(4).values
    print(f"neighbour sets differ at {int(differ.sum())} untied token(s); their 3rd-4th cosine gaps "
          f"{(top4[:, 2] - top4[:, 3]).tolist()}")
    assert ((top4[:, 2] - top4[:, 3]) < 1e-4).all(), "a neighbour set differs although the 3rd/4th cosines differ"
    assert int(differ.sum()) <= 2
    probs = knn_probabilities(seg.logits, seg.features)[0]
    diff = float((probs - voc["knn_prob"][:-1])[~tie].abs().max())
    print(f"kNN probabilities outside the {int(tie.sum())} tie-influenced tokens: max |diff| {diff:.2e}")
    assert diff <= 1e-6


@pytest.fixture(scope="module")
def segmenters():
    weights = str(oracle_path("ifseg_ofa", "tiny_ifseg_ofa_d64.pt"))
    return {knn: Segmenter("ifseg", weights=weights, device="cpu", knn=knn) for knn in (True, False)}


def test_segment_reproduces_the_official_label_maps(segmenters):
    voc = _voc()
    smoothed = segmenters[True].segment(voc_rgb(), classes=VOC5, background=False)
    raw = segmenters[False].segment(voc_rgb(), classes=VOC5, background=False)
    assert_labels_agree(smoothed.labels, voc["pred_knn"], what="labels (kNN)")
    assert_labels_agree(raw.labels, voc["pred_raw"], what="labels (raw)")
    assert_close_logits(raw.logits[:, :48, :64], voc["upsampled_logits_crop"], what="upsampled logits (crop)")
    assert_close_logits(smoothed.logits[:, :48, :64], voc["upsampled_logits_crop"], what="upsampled logits, kNN run")
    grid = tuple(voc["image_embed_shape"].tolist())
    tied = grid_to_image(voc["knn_tie_influenced"].float()[None, :, None], grid, voc["pred_knn"].shape)[0, 0]
    untied = tied[:48, :64] == 0
    crop = torch.as_tensor(smoothed.scores[:, :48, :64])
    assert untied.float().mean() > 0.3  # 41 % of the crop
    assert_close_logits(crop[:, untied], voc["upsampled_knn_prob_crop"][:, untied], atol=1e-6,
                        what="upsampled kNN probabilities (crop, pixels free of tie-influenced tokens)")


def test_prompt_follows_the_given_class_order(segmenters):
    """Without a trained checkpoint the prompt lists the classes as given: another order is another prompt."""
    seg = segmenters[True]
    forward = seg.classifier(seg.class_spec(VOC5, background=False))
    backward = seg.classifier(seg.class_spec(VOC5[::-1], background=False))
    assert forward.prompt.tolist() == _voc()["src_tokens"].tolist()
    assert forward.prompt.tolist() != backward.prompt.tolist()
    assert torch.equal(forward.embeddings, backward.embeddings.flip(0))


def test_eval_runs_the_coco_stuff_unseen15_protocol_with_the_official_words(tmp_path):
    """`vocabseg eval --method ifseg --dataset coco-stuff-unseen15`: the ifseg preset (official words such as
    "concrete wall", short side 512, kNN), 15 classes, every other pixel ignored."""
    import numpy as np
    from PIL import Image

    from vocabseg.cli import main
    from vocabseg.data.classes import CLASSES

    images, labels = tmp_path / "coco_stuff" / "images" / "val2017", tmp_path / "coco_stuff" / "annotations" / "val2017"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    Image.fromarray(voc_rgb()[:96, :128]).save(images / "000000000001.jpg")
    label = np.full((96, 128), CLASSES["coco-stuff"].index("person"), dtype=np.uint8)
    label[:, 64:] = CLASSES["coco-stuff"].index("grass")
    label[:40, :] = CLASSES["coco-stuff"].index("wall-concrete")
    Image.fromarray(label).save(labels / "000000000001_labelTrainIds.png")
    out = tmp_path / "results"
    assert main(["eval", "--method", "ifseg", "--dataset", "coco-stuff-unseen15", "--data-root", str(tmp_path),
                 "--weights", str(oracle_path("ifseg_ofa", "tiny_ifseg_ofa_d64.pt")), "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == "coco-stuff-unseen15" and len(results["classes"]) == 15
    assert ["concrete wall"] in results["names"] and results["method_options"]["knn"] is True
    assert results["models"]["ofa"]["arch"].startswith("ofa-d64")
    assert results["protocol"]["short_side"] == 512
    pixels = sum(c["gt_pixels"] for c in results["per_class"])
    assert pixels == int((label != CLASSES["coco-stuff"].index("person")).sum())  # person is not unseen: ignored
