import open_clip
import pytest
import torch
import torch.nn.functional as F

from vocabseg.text import classifier as text_mod
from vocabseg.text.classes import default_background_names, parse_classes, read_classes_file
from vocabseg.text.classifier import TextCache, TextClassifier, embed_names
from vocabseg.text.templates import IMAGENET_TEMPLATES


def test_templates_are_the_80_imagenet_ones():
    assert len(IMAGENET_TEMPLATES) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."


def test_parse_classes_synonyms_and_background():
    spec = parse_classes("person|man|woman, dog ,tv|monitor", background=True)
    assert spec.labels == ("background", "person", "dog", "tv")
    assert spec.names[1] == ("person", "man", "woman")
    assert spec.names[0] == default_background_names() and len(spec.names[0]) == 26
    assert spec.query_class[:27] == (0,) * 26 + (1,)
    spec = parse_classes(["sky", "cat"], background="background|wall|sky")
    assert spec.names[0] == ("background", "wall")  # a background word that is also a class is dropped
    spec = parse_classes({"cat": ["cat", "kitten"], "sofa": "sofa|couch"}, background=False)
    assert spec.labels == ("cat", "sofa") and not spec.has_background and spec.names[1] == ("sofa", "couch")


@pytest.mark.parametrize("classes, message", [
    ("", "empty"), (" , ,", "empty"), ([], "empty"), ("cat,dog,Cat", "Duplicate"), ("cat|kitty,kitty", "Duplicate"),
])
def test_bad_class_lists_give_clear_errors(classes, message):
    with pytest.raises(ValueError, match=message):
        parse_classes(classes)


def test_read_classes_file_sclip_format(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("# VOC-like\nperson, person in shirt\n\ncat\n")
    assert read_classes_file(path) == [("person", "person in shirt"), ("cat",)]


def test_name_embedding_is_normalised_mean_of_normalised_templates(clip):
    templates = ("a photo of a {}.", "a {} in the scene.", "art of the {}.")
    got = embed_names(clip.text, ["cat", "dining table"], templates)
    with torch.no_grad():
        expected = []
        for name in ["cat", "dining table"]:
            tokens = open_clip.tokenize([t.format(name) for t in templates])
            e = F.normalize(clip.text.model.encode_text(tokens), dim=-1)
            expected.append(F.normalize(e.mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_text_cache_second_run_does_no_text_forward(clip, tmp_path, monkeypatch):
    cache = TextCache(tmp_path)
    calls = []
    real = clip.text.encode

    def counting(texts):
        calls.append(len(texts))
        return real(texts)

    monkeypatch.setattr(clip.text, "encode", counting)
    spec = parse_classes("cat|kitten,dog", background=False)
    first = TextClassifier.build(clip.text, spec, cache=cache)
    assert sum(calls) == 3 * 80
    calls.clear()
    second = TextClassifier.build(clip.text, spec, cache=cache)
    assert calls == []
    torch.testing.assert_close(first.embeddings, second.embeddings)
    TextClassifier.build(clip.text, parse_classes("cat,dog,horse", background=False), cache=cache)
    assert sum(calls) == 80  # only the new name
    assert first.query_class.tolist() == [0, 0, 1]


def test_text_cache_is_keyed_by_model_and_templates(clip, tmp_path, monkeypatch):
    cache = TextCache(tmp_path)
    embed_names(clip.text, ["cat"], ("a {}.",), cache)
    assert cache.load(clip.text.fingerprint(), ("a {}.",)).keys() == {"cat"}
    assert cache.load(clip.text.fingerprint(), ("the {}.",)) == {}
    assert cache.load("another-model", ("a {}.",)) == {}


def test_damaged_cache_is_rebuilt(clip, tmp_path):
    cache = TextCache(tmp_path)
    embed_names(clip.text, ["cat"], ("a {}.",), cache)
    (file,) = tmp_path.glob("*.pt")
    file.write_bytes(b"not a torch file")
    out = embed_names(clip.text, ["cat"], ("a {}.",), cache)
    assert out.shape == (1, clip.text.embed_dim)
    assert torch.load(file, weights_only=True).keys() == {"cat"}


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VOCABSEG_CACHE", str(tmp_path))
    assert text_mod._default_cache_dir() == tmp_path / "text"
