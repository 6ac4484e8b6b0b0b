"""Each benchmark layout built in a temp folder and read back: counts, label mapping, background and ignore rules,
clear errors for wrong layouts; the converters on synthetic raw downloads."""

import pickle

import numpy as np
import pytest
from PIL import Image

from vocabseg.data import classes as C
from vocabseg.data.datasets import DATASET_KEYS, DatasetLayoutError, get_dataset

RNG = np.random.default_rng(0)


def _image(path, h=4, w=5):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _label(path, values, h=4, w=5):
    """A label file holding ``values`` (tiled over h x w): palette PNG, grey PNG or uint16 TIFF by extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.resize(np.asarray(values), (h, w))
    if path.suffix == ".tif":
        Image.fromarray(array.astype(np.uint16)).save(path)
    else:
        voc = "SegmentationClass" in str(path) and "Context" not in str(path)
        image = Image.fromarray(array.astype(np.uint8), mode="P" if voc else "L")
        if voc:  # VOC labels are palette PNGs (the palette must be set, or PIL renumbers the values on save)
            image.putpalette(C.palette("voc21", 256).flatten().tolist())
        image.save(path)
    return array


def build(root, key, ids, values):
    """Write the ``key`` layout under ``root`` with one image and one label (holding ``values``) per id."""
    if key in ("voc21", "voc20"):
        base = root / "VOCdevkit" / "VOC2012"
        for i in ids:
            _image(base / "JPEGImages" / f"{i}.jpg")
            _label(base / "SegmentationClass" / f"{i}.png", values)
        (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    elif key in ("pc60", "pc59"):
        base = root / "VOCdevkit" / "VOC2010"
        for i in ids:
            _image(base / "JPEGImages" / f"{i}.jpg")
            _label(base / "SegmentationClassContext" / f"{i}.png", values)
        (base / "ImageSets" / "SegmentationContext").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    elif key == "pc459":
        base = root / "VOCdevkit" / "VOC2010"
        for i in ids:
            _image(base / "JPEGImages" / f"{i}.jpg")
            _label(base / "annotations_detectron2" / "pc459_val" / f"{i}.tif", values)
    elif key.startswith("coco"):
        base = root / "coco_stuff164k"
        suffix = "_instanceTrainIds.png" if key == "coco-object" else "_labelTrainIds.png"
        for i in ids:
            _image(base / "images" / "val2017" / f"{i}.jpg")
            _label(base / "annotations" / "val2017" / f"{i}{suffix}", values)
    elif key == "cityscapes":
        base = root / "cityscapes"
        for i in ids:
            _image(base / "leftImg8bit" / "val" / "lindau" / f"{i}_leftImg8bit.png")
            _label(base / "gtFine" / "val" / "lindau" / f"{i}_gtFine_labelTrainIds.png", values)
    elif key == "ade150":
        base = root / "ADEChallengeData2016"
        for i in ids:
            _image(base / "images" / "validation" / f"{i}.jpg")
            _label(base / "annotations" / "validation" / f"{i}.png", values)
    elif key == "ade847":
        base = root / "ADE20K_2021_17_01"
        for i in ids:
            _image(base / "images_detectron2" / "validation" / f"{i}.jpg")
            _label(base / "annotations_detectron2" / "validation" / f"{i}.tif", values)
    else:
        raise AssertionError(key)


_FRISBEE = C.CLASSES["coco-stuff"].index("frisbee")
_PERSON = C.CLASSES["coco-stuff"].index("person")
_UNSEEN = C.ZERO_SHOT_SPLITS["coco-stuff"]["unseen"]  # the 15 classes, in label-id order

# raw values written -> evaluated ids expected (255/65535 = ignore)
CASES = {
    "voc21": ([0, 1, 20, 255, 77], [0, 1, 20, 255, 255]),
    "voc20": ([0, 1, 20, 255], [255, 0, 19, 255]),
    "pc60": ([0, 1, 59, 255], [0, 1, 59, 255]),
    "pc59": ([0, 1, 59, 255], [255, 0, 58, 255]),
    "pc459": ([0, 300, 458, 65535, 459], [0, 300, 458, 65535, 65535]),
    "coco-object": ([0, 1, 80], [0, 1, 80]),
    "coco-stuff": ([0, 170, 255, 171], [0, 170, 255, 255]),
    "coco-stuff27": ([_PERSON, 170, 255], [C.FINE_TO_COARSE[_PERSON], C.FINE_TO_COARSE[170], 255]),
    "coco-stuff-unseen15": ([_FRISBEE, _PERSON, 255], [_UNSEEN.index(_FRISBEE), 255, 255]),
    "cityscapes": ([0, 18, 255], [0, 18, 255]),
    "ade150": ([0, 1, 150], [255, 0, 149]),
    "ade847": ([0, 846, 65535], [0, 846, 65535]),
}


def test_every_dataset_has_a_case():
    assert set(CASES) == set(DATASET_KEYS)


@pytest.mark.parametrize("key", list(CASES))
def test_layout_is_read_with_the_benchmark_label_rules(tmp_path, key):
    raw, expected = CASES[key]
    ids = ["a_000001", "b_000002", "c_000003"]
    build(tmp_path, key, ids, raw)
    dataset = get_dataset(key, tmp_path)
    assert len(dataset) == 3 and [s.id.split("/")[-1] for s in dataset.samples] == ids
    assert dataset.num_classes == len(dataset.classes)
    label = dataset.read_label(dataset.samples[1])
    assert label.shape == (4, 5)
    np.testing.assert_array_equal(label.ravel()[: len(raw)], expected)
    assert dataset.ignore_index == (65535 if key in ("pc459", "ade847") else 255)
    image = dataset.read_image(dataset.samples[0])
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    report = dataset.check()
    assert report.samples == 3 and report.labels_read == 3
    bad = {77} if key == "voc21" else {459} if key == "pc459" else {171} if key == "coco-stuff" else set()
    assert set(report.unexpected_values) == bad
    assert report.ok == (not bad)


def test_background_semantics():
    expectations = {"voc21": True, "voc20": False, "pc60": True, "pc59": False, "coco-object": True,
                    "coco-stuff": False, "ade150": False, "cityscapes": False}
    for key, has_bg in expectations.items():
        spec = C.CLASSES[key]
        assert (spec[0] == "background") == has_bg, key


def test_coco_object_has_no_ignore_pixels(tmp_path):
    build(tmp_path, "coco-object", ["x"], [0, 5, 80])
    report = get_dataset("coco-object", tmp_path).check()
    assert report.ignore_pixels == 0 and report.ok


def test_data_root_may_be_the_dataset_folder(tmp_path):
    build(tmp_path, "voc21", ["2007_000001"], [0, 1])
    direct = get_dataset("voc21", tmp_path / "VOCdevkit" / "VOC2012")
    assert len(direct) == 1
    assert len(get_dataset("voc21", tmp_path / "VOCdevkit")) == 1


def test_cityscapes_ids_keep_the_city(tmp_path):
    build(tmp_path, "cityscapes", ["lindau_000000_000019"], [0])
    sample = get_dataset("cityscapes", tmp_path).samples[0]
    assert sample.id == "lindau/lindau_000000_000019"
    assert sample.image.name == "lindau_000000_000019_leftImg8bit.png" and sample.image.is_file()


def test_wrong_layouts_give_clear_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"VOCdevkit/VOC2012.*JPEGImages/"):
        get_dataset("voc21", tmp_path)
    with pytest.raises(DatasetLayoutError, match="not a folder"):
        get_dataset("voc21", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("voc22", tmp_path)
    # VOC images without labels: says which folder is missing
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no SegmentationClass"):
        get_dataset("voc21", tmp_path)
    # split list missing
    (tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"val\.txt is missing"):
        get_dataset("voc21", tmp_path).samples  # noqa: B018
    # PASCAL-Context without converted labels: points at the converter
    (tmp_path / "VOCdevkit" / "VOC2010" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="data prepare pascal-context"):
        get_dataset("pc59", tmp_path)
    # COCO with only the raw pngs: points at the converter
    raw = tmp_path / "coco_stuff164k" / "annotations" / "val2017"
    raw.mkdir(parents=True)
    (tmp_path / "coco_stuff164k" / "images" / "val2017").mkdir(parents=True)
    _label(raw / "000000000139.png", [0])
    with pytest.raises(DatasetLayoutError, match="data prepare coco-stuff"):
        get_dataset("coco-stuff", tmp_path).samples  # noqa: B018
    with pytest.raises(DatasetLayoutError, match="data prepare coco-object"):
        get_dataset("coco-object", tmp_path).samples  # noqa: B018


def test_missing_files_are_reported(tmp_path):
    build(tmp_path, "voc21", ["a", "b", "c"], [0, 1])
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "b.jpg").unlink()
    (tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "c.png").unlink()
    dataset = get_dataset("voc21", tmp_path)
    report = dataset.check()
    assert report.missing_images == ["b"] and report.missing_labels == ["c"] and not report.ok
    text = "\n".join(report.lines())
    assert "missing images: 1 (b)" in text and "the official split has 1449" in text
    with pytest.raises(DatasetLayoutError, match="2 file"):
        dataset.require_complete()


def test_colour_label_images_are_refused(tmp_path):
    build(tmp_path, "voc21", ["a"], [0])
    path = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "a.png"
    Image.new("RGB", (5, 4), (128, 0, 0)).save(path)
    dataset = get_dataset("voc21", tmp_path)
    with pytest.raises(ValueError, match="mode RGB"):
        dataset.read_label(dataset.samples[0])
    assert dataset.check().unreadable == ["a"]


def test_class_specs(tmp_path):
    build(tmp_path, "voc21", ["a"], [0])
    voc = get_dataset("voc21", tmp_path)
    names = voc.query_names("sclip")
    assert voc.has_background and len(names[0]) == 26 and voc.classes[0] == "background"
    assert voc.query_names("voc21.itaclip") == C.name_list("voc21.itaclip") and voc.query_names() == names
    build(tmp_path, "ade847", ["a"], [0])
    ade = get_dataset("ade847", tmp_path)
    names = ade.query_names("sclip")  # no sclip list: falls back to the published one
    assert len(names) == 847 and not ade.has_background and names == C.name_list("ade847.cliptrase")
    build(tmp_path, "coco-stuff27", ["a"], [0])
    coarse = get_dataset("coco-stuff27", tmp_path)
    assert coarse.classes == C.COARSE_27 and coarse.query_names()[0] == (C.COARSE_27[0],)
    unseen = get_dataset("coco-stuff-unseen15", tmp_path)
    assert len(unseen.query_names()) == 15 and unseen.classes[_UNSEEN.index(_FRISBEE)] == "frisbee"
    assert get_dataset("coco-stuff", tmp_path).unseen == C.ZERO_SHOT_SPLITS["coco-stuff"]["unseen"]


def test_data_check_cli(tmp_path, capsys):
    from vocabseg.cli import main

    build(tmp_path, "ade150", ["ADE_val_00000001", "ADE_val_00000002"], [0, 1, 150])
    assert main(["data", "check", "ade150", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 image/label pairs (the official split has 2000)" in out and "OK" in out
    (tmp_path / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000002.jpg").unlink()
    assert main(["data", "check", "ade150", "--data-root", str(tmp_path)]) == 1
    assert "missing images: 1" in capsys.readouterr().out
    assert main(["data", "check", "voc21", "--data-root", str(tmp_path)]) == 2  # layout error, exit 2
    assert main(["data", "list"]) == 0


# --- converters ------------------------------------------------------------------------------------------------------

def test_coco_converters(tmp_path):
    from vocabseg.data.prepare import PrepareError, prepare

    with pytest.raises(PrepareError, match=r"stuffthingmaps_trainval2017\.zip"):
        prepare("coco-stuff", tmp_path, progress=False)
    base = tmp_path / "coco_stuff164k"
    raw = [0, 11, 90, 91, 181, 255, 89, 12]  # person, 2 unused ids, banner, wood, unlabelled, toothbrush, stop sign
    for stem in ("000000000139", "000000000285"):
        _label(base / "annotations" / "val2017" / f"{stem}.png", raw)
        _image(base / "images" / "val2017" / f"{stem}.jpg")
    report = prepare("coco-stuff", tmp_path, progress=False)
    assert report.inputs == {"val2017": 2} and report.written == {"val2017": 2}
    assert any("official split has 5000" in w for w in report.warnings)
    assert any("unexpected raw values [11, 90]" in w for w in report.warnings)
    stuff = get_dataset("coco-stuff", tmp_path)
    np.testing.assert_array_equal(stuff.read_label(stuff.samples[0]).ravel()[:8], [0, 255, 255, 80, 170, 255, 79, 11])
    assert C.CLASSES["coco-stuff"][80] == "banner" and C.CLASSES["coco-stuff"][79] == "toothbrush"
    assert C.CLASSES["coco-stuff"][11] == "stop sign"
    report = prepare("coco-object", tmp_path, progress=False)
    obj = get_dataset("coco-object", tmp_path)
    assert len(obj) == 2
    np.testing.assert_array_equal(obj.read_label(obj.samples[0]).ravel()[:8], [1, 0, 0, 0, 0, 0, 80, 12])
    assert obj.check().ignore_pixels == 0
    # second run skips what exists; the raw pngs are not confused with outputs
    again = prepare("coco-stuff", tmp_path, progress=False)
    assert again.inputs == {"val2017": 2} and again.skipped == {"val2017": 2}


def test_pascal_context_converter(tmp_path):
    from scipy.io import savemat

    from vocabseg.data.prepare import PC59_FROM_459, PrepareError, prepare

    # mmseg's _mapping equals the 59 class names looked up in the 459-class list
    assert list(PC59_FROM_459) == [0] + [C.CLASSES["pc459"].index(n) + 1 for n in C.CLASSES["pc59"]]
    base = tmp_path / "VOCdevkit" / "VOC2010"
    with pytest.raises(PrepareError, match=r"trainval\.tar\.gz"):
        prepare("pascal-context", tmp_path, progress=False)
    ids = ["2008_000002", "2008_000003"]
    # accordion (not in the 59 -> background), aeroplane, bag, wool (last), unlabelled 0
    label_map = np.array([[1, 2, 9, 459, 0]], dtype=np.uint16).repeat(4, axis=0)
    for i in ids:
        (base / "trainval").mkdir(parents=True, exist_ok=True)
        savemat(base / "trainval" / f"{i}.mat", {"LabelMap": label_map})
        _image(base / "JPEGImages" / f"{i}.jpg")
    with pytest.raises(PrepareError, match=r"ImageSets/Main/val\.txt"):
        prepare("pascal-context", tmp_path, splits=["val"], progress=False)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids) + "\n2008_999999\n")
    report = prepare("pascal-context", tmp_path, splits=["val"], progress=False)
    assert report.inputs == {"val": 2} and report.written == {"val": 2}
    assert any("no .mat" in w for w in report.warnings)
    pc60 = get_dataset("pc60", tmp_path)
    assert len(pc60) == 2
    np.testing.assert_array_equal(pc60.read_label(pc60.samples[0])[0], [0, 1, 2, 0, 0])
    pc59 = get_dataset("pc59", tmp_path)
    np.testing.assert_array_equal(pc59.read_label(pc59.samples[0])[0], [255, 0, 1, 255, 255])
    pc459 = get_dataset("pc459", tmp_path)
    np.testing.assert_array_equal(pc459.read_label(pc459.samples[0])[0], [0, 1, 8, 458, 65535])
    assert C.CLASSES["pc459"][8] == "bag" and C.CLASSES["pc459"][458] == "wool"


def test_ade847_converter(tmp_path):
    from vocabseg.data.prepare import PrepareError, prepare

    base = tmp_path / "ADE20K_2021_17_01"
    names = ["-", "abacus", *reversed(C.CLASSES["ade847"]), "zither"]
    folder = "ADE20K_2021_17_01/images/ADE/validation/urban/street"
    index = {"filename": ["ADE_val_00000001.jpg", "ADE_train_00000001.jpg"], "folder": [folder, folder],
             "objectnames": names}
    base.mkdir()
    with open(base / "index_ade20k.pkl", "wb") as handle:
        pickle.dump(index, handle)
    image_dir = base / "images" / "ADE" / "validation" / "urban" / "street"
    _image(image_dir / "ADE_val_00000001.jpg", 6, 8)
    wall = names.index("wall") + 1  # class-mask value = object index + 1
    values = np.array([wall, names.index("abacus") + 1, 0, names.index(C.CLASSES["ade847"][846]) + 1])
    mask = np.resize(values, (6, 8))
    seg = np.zeros((6, 8, 3), dtype=np.uint8)
    seg[..., 0] = (mask // 256) * 10
    seg[..., 1] = mask % 256
    Image.fromarray(seg).save(image_dir / "ADE_val_00000001_seg.png")
    report = prepare("ade847", tmp_path, progress=False)
    assert report.inputs == {"validation": 1}
    ade = get_dataset("ade847", tmp_path)
    assert len(ade) == 1
    np.testing.assert_array_equal(ade.read_label(ade.samples[0]).ravel()[:4], [0, 65535, 65535, 846])
    index["objectnames"] = ["-", "wall"]
    with open(base / "index_ade20k.pkl", "wb") as handle:
        pickle.dump(index, handle)
    with pytest.raises(PrepareError, match="846 of the 847 class names not found"):
        prepare("ade847", tmp_path, progress=False)


def test_ade847_resize_rule():
    from vocabseg.data.prepare import _resize_short

    image = np.zeros((600, 900, 3), dtype=np.uint8)
    labels = np.arange(600 * 900, dtype=np.int32).reshape(600, 900)
    small_image, small_labels = _resize_short(image, labels)
    assert small_image.shape == (512, 768, 3) and small_labels.shape == (512, 768)
    assert set(np.unique(small_labels)) <= set(np.unique(labels))  # nearest: no new values
    same = _resize_short(image[:500], labels[:500])
    assert same[1].shape == (500, 900)


def test_prepare_cli(tmp_path, capsys):
    from vocabseg.cli import main

    assert main(["data", "prepare", "coco-stuff", "--data-root", str(tmp_path)]) == 2
    base = tmp_path / "coco_stuff164k"
    _label(base / "annotations" / "val2017" / "000000000139.png", [0, 255])
    _image(base / "images" / "val2017" / "000000000139.jpg")
    assert main(["data", "prepare", "coco-stuff", "--data-root", str(tmp_path)]) == 0
    assert "1 input(s), 1 written" in capsys.readouterr().out
