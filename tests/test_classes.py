"""Facts about the benchmark class lists, name files, zero-shot splits and palettes in ``vocabseg.data.classes``."""

from __future__ import annotations

import numpy as np
import pytest

from vocabseg.data.classes import (
    CLASSES,
    COARSE_27,
    DATASETS,
    FINE_TO_COARSE,
    ZERO_SHOT_SPLITS,
    name_list,
    name_lists,
    palette,
    query_names,
    sources,
)

SCLIP_BACKGROUND = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed", "building",
    "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair", "floor", "hill", "rail",
    "fence",
)  # fmt: skip


@pytest.mark.parametrize(
    ("dataset", "length", "first", "last"),
    [
        ("voc21", 21, "background", "tvmonitor"),
        ("voc20", 20, "aeroplane", "tvmonitor"),
        ("pc60", 60, "background", "wood"),
        ("pc59", 59, "aeroplane", "wood"),
        ("pc459", 459, "accordion", "wool"),
        ("coco-object", 81, "background", "toothbrush"),
        ("coco-stuff", 171, "person", "wood"),
        ("coco-stuff27", 27, "electronic", "water"),
        ("cityscapes", 19, "road", "bicycle"),
        ("ade150", 150, "wall", "flag"),
        ("ade847", 847, "wall", "adding machine, totalizer, totaliser"),
    ],
)
def test_class_lists(dataset, length, first, last):
    names = CLASSES[dataset]
    assert len(names) == length
    assert (names[0], names[-1]) == (first, last)
    assert len(set(names)) == length
    assert all(name == name.strip() and name for name in names)


def test_datasets_are_the_class_keys():
    assert set(DATASETS) == set(CLASSES)
    assert len(DATASETS) == len(set(DATASETS)) == 12  # with coco-stuff-unseen15, IFSeg's 15-way protocol


def test_label_order_landmarks():
    assert CLASSES["voc21"][15] == "person"
    assert CLASSES["pc60"][1:5] == ("aeroplane", "bag", "bed", "bedclothes")  # alphabetical converter order
    assert CLASSES["pc59"] == CLASSES["pc60"][1:]
    assert CLASSES["voc20"] == CLASSES["voc21"][1:]
    assert CLASSES["coco-object"][1:] == CLASSES["coco-stuff"][:80]
    assert CLASSES["coco-stuff"][79:81] == ("toothbrush", "banner")
    assert CLASSES["cityscapes"][6:8] == ("traffic light", "traffic sign")
    assert CLASSES["ade150"][7] == "bed"  # mmseg writes "bed " with a trailing space
    assert CLASSES["ade150"][44] == "chest of drawers"
    assert CLASSES["ade847"][1] == "building, edifice"
    assert CLASSES["ade847"][300] == "altar, communion table, lord's table"
    assert list(CLASSES["pc459"]) == sorted(CLASSES["pc459"])
    assert set(CLASSES["pc59"]) <= set(CLASSES["pc459"])


def test_every_query_list_matches_its_class_list():
    assert len(name_lists()) > 40
    for list_id in name_lists():
        dataset = list_id.split(".")[0]
        names = name_list(list_id)
        assert dataset in CLASSES
        assert len(names) == len(CLASSES[dataset]), list_id
        assert all(isinstance(group, tuple) and group for group in names), list_id
        assert all(isinstance(name, str) and name == name.strip() and name for group in names for name in group)


def test_published_style_coverage():
    assert {d for d in CLASSES if "sclip" in sources(d)} == {
        "voc21", "voc20", "pc60", "pc59", "coco-object", "coco-stuff", "cityscapes", "ade150",
    }  # fmt: skip
    assert {d for d in CLASSES if "itaclip" in sources(d)} == {"voc21", "pc60", "coco-object", "coco-stuff",
                                                               "cityscapes"}
    assert "cliptrase" in sources("ade847") and "cliptrase" in sources("pc459")
    assert sources("voc21")[0] == "sclip"  # the default list comes first


def test_sclip_voc21():
    names = query_names("voc21", "sclip")
    assert names[0] == SCLIP_BACKGROUND
    assert names[4] == ("ship",)
    assert names[11] == ("table",)
    assert names[15] == (
        "person", "person in shirt", "person in jeans", "person in dress", "person in sweater", "person in skirt",
        "person in jacket",
    )  # fmt: skip
    assert names[20] == ("television monitor", "tv monitor", "monitor", "television", "screen")
    assert names[16] == ("pottedplant",)
    assert query_names("voc20", "sclip") == names[1:]


def test_sclip_other_datasets():
    assert query_names("coco-object", "sclip")[0] == SCLIP_BACKGROUND
    assert query_names("coco-object", "sclip")[1][-1] == "body"
    assert query_names("pc60", "sclip")[0] == ("background",)
    assert query_names("coco-stuff", "sclip")[9] == ("trafficlight",)
    assert query_names("coco-stuff", "sclip")[80] == ("banner",)
    assert query_names("ade150", "sclip")[44] == ("chestofdrawers",)
    assert query_names("cityscapes", "sclip")[7] == ("trafficsign",)


def test_clearclip_uses_literal_background_and_single_names():
    for dataset in ("voc21", "pc60", "coco-object"):
        assert query_names(dataset, "clearclip")[0] == ("background",)
    voc = query_names("voc21", "clearclip")
    assert all(len(group) == 1 for group in voc)
    assert (voc[4], voc[11], voc[15], voc[20]) == (("ship",), ("table",), ("person",), ("tvmonitor",))
    assert query_names("coco-object", "clearclip")[1] == ("person",)


def test_itaclip_voc21():
    names = query_names("voc21", "itaclip")
    assert len(names[0]) == 44 and len(set(names[0])) == 44
    assert names[0][:3] == ("sky", "wall", "tree") and names[0][-1] == "sea"
    assert names[3] == ("bird", "avian")
    assert names[8] == ("cat", "feline")
    assert names[9] == ("chair", "seat")
    assert names[14] == ("motorbike", "motorcycle")
    assert names[15][-2:] == ("person in hat", "body")
    assert query_names("coco-object", "itaclip")[0] == SCLIP_BACKGROUND


def test_cliptrase_background_lists_as_published():
    voc_bg = query_names("voc21", "cliptrase")[0]
    assert len(voc_bg) == 33
    assert voc_bg[0] == "background"
    assert voc_bg.count("bed") == 2
    assert "beachhill" in voc_bg
    assert query_names("pc60", "cliptrase")[0] == ("background",)
    coco_bg = query_names("coco-object", "cliptrase")[0]
    assert len(coco_bg) == 16 + 91
    assert coco_bg[16:] == CLASSES["coco-stuff"][80:]
    assert query_names("voc20", "cliptrase")[-1] == ("tv",)
    assert query_names("pc59", "cliptrase")[49] == ("diningtable",)


def test_query_names_errors_list_what_exists():
    with pytest.raises(ValueError, match="cliptrase"):
        query_names("ade847", "sclip")
    with pytest.raises(ValueError, match="voc21"):
        query_names("no-such-dataset", "sclip")


def test_coco_stuff_zero_shot_split():
    unseen = ZERO_SHOT_SPLITS["coco-stuff"]["unseen"]
    assert len(unseen) == len(set(unseen)) == 15
    assert {CLASSES["coco-stuff"][i] for i in unseen} == {
        "frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow", "road",
        "wall-concrete", "tree", "grass", "river", "clouds", "playingfield",
    }  # fmt: skip


def test_voc_and_ade847_zero_shot_splits():
    assert ZERO_SHOT_SPLITS["voc20"]["unseen"] == (15, 16, 17, 18, 19)
    assert [CLASSES["voc20"][i] for i in ZERO_SHOT_SPLITS["voc20"]["unseen"]] == [
        "pottedplant", "sheep", "sofa", "train", "tvmonitor",
    ]  # fmt: skip
    rare = ZERO_SHOT_SPLITS["ade847"]["unseen"]
    assert len(rare) == len(set(rare)) == 275  # 572 seen / 275 unseen
    assert all(0 <= i < 847 for i in rare)
    assert {CLASSES["ade847"][i] for i in (166, 176, 846)} <= {CLASSES["ade847"][i] for i in rare}
    assert CLASSES["ade847"][166] == "catwalk"


def test_fine_to_coarse():
    assert len(COARSE_27) == len(set(COARSE_27)) == 27
    assert len(FINE_TO_COARSE) == 171
    assert set(FINE_TO_COARSE) == set(range(27))
    stuff = CLASSES["coco-stuff"]
    coarse_of = {name: COARSE_27[FINE_TO_COARSE[i]] for i, name in enumerate(stuff)}
    assert coarse_of["person"] == "person"
    assert coarse_of["giraffe"] == "animal"
    assert coarse_of["tv"] == "electronic"
    assert coarse_of["clouds"] == "sky"
    assert coarse_of["wood"] == "solid"
    assert coarse_of["carpet"] == "floor"
    assert coarse_of["light"] == "furniture-stuff"
    # Things map to the first 12 coarse classes, stuff to the last 15.
    assert all(c < 12 for c in FINE_TO_COARSE[:80]) and all(c >= 12 for c in FINE_TO_COARSE[80:])


def test_voc_palette():
    pal = palette("voc21", 21)
    assert pal.shape == (21, 3) and pal.dtype == np.uint8
    assert pal[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert pal[20].tolist() == [0, 64, 128]
    assert palette("voc20", 20)[0].tolist() == [128, 0, 0]
    assert len({tuple(c) for c in palette(None, 256).tolist()}) == 256


def test_official_palettes_and_fallback():
    from vocabseg.data.classes import _bitshift_palette

    assert palette("ade150", 150)[:2].tolist() == [[120, 120, 120], [180, 120, 120]]
    assert palette("cityscapes", 19)[0].tolist() == [128, 64, 128]
    assert palette("pc60", 60).tolist() == palette("ade150", 60).tolist()
    assert palette("coco-stuff", 171).tolist() == _bitshift_palette(171).tolist()  # benchmarks keep VOC's rule
    extended = palette("cityscapes", 25)
    assert extended.shape == (25, 3)
    assert extended[19:].tolist() == _bitshift_palette(25)[19:].tolist()
    assert palette(None, 0).shape == (0, 3)
    with pytest.raises(ValueError):
        palette("no-such-dataset", 3)
