"""Benchmark class lists, text-query name lists, zero-shot splits, class hierarchies and colour palettes: the one
module that reads the data files under ``lists/``.

Files: ``classes.json`` (canonical class names per benchmark), ``names/<dataset>.<source>.txt`` (query-name lists:
one class per line in label-id order, synonyms separated by ``|``; the list id is ``<dataset>.<source>``),
``splits.json`` (zero-shot splits by class name), ``hierarchy.json`` (COCO-Stuff's 27 coarse classes and IFSeg's
coarse words) and ``palettes.json`` (official colours). Names are in **label-id order**, i.e. the order of the ids in
the ground-truth maps a benchmark is evaluated on.

Where each list comes from:

* ``CLASSES`` (canonical display names):

  - VOC21/VOC20, PC60/PC59, COCO-Stuff-171, Cityscapes-19 and ADE-150: the ``METAINFO`` class tuples of
    mmsegmentation 1.x (``mmseg/datasets/{voc,pascal_context,coco_stuff,cityscapes,ade}.py``, Apache-2.0). VOC20
    and PC59 are VOC21 and PC60 without ``background`` (``reduce_zero_label``); PC60/PC59 use the alphabetical
    order of mmseg's PASCAL-Context converter. mmseg writes ADE's ``"bed "`` with a trailing space; here it is
    ``"bed"`` (in every style; the space does not change the CLIP tokens).
  - COCO-Object: ``background`` followed by the 80 COCO things in standard order (the first 80 COCO-Stuff classes),
    as in the SCLIP-family ``COCOObjectDataset``.
  - PC-459: the PASCAL-Context ``labels.txt`` order (alphabetical, with ``unknown`` among them), as registered by
    the detectron2-based open-vocabulary repos (CAT-Seg, CLIPtrase, ProxyCLIP).
  - ADE-847: the ADE20K-Full ``trainId`` order of Mask2Former's ``register_ade20k_full.py``; each name keeps its
    WordNet synonyms (``"building, edifice"``), as in CAT-Seg, ZegFormer and CLIPtrase.
  - COCO-Stuff-27: the 27 COCO-Stuff supercategories (Caesar et al. hierarchy, IFSeg appendix Table 15) in the
    order used by PiCIE/STEGO for unsupervised COCO-Stuff-27 (12 thing groups, then 15 stuff groups).
    ``FINE_TO_COARSE`` maps each of the 171 classes to one of them.

* name lists ``<dataset>.<source>``: the text queries of each class (several names are synonyms; a class scores the
  maximum over its names). The sources reproduce the name files of the method repositories:

  - ``"sclip"``: SCLIP's ``configs/cls_*.txt`` (NACLIP uses the same files; they also serve MaskCLIP and vanilla
    CLIP). VOC: ``ship`` and ``table`` for boat and dining table, clothing synonyms for person, five television
    names for tvmonitor, and 26 stuff names as the background class of VOC21 and COCO-Object (which adds ``body``
    to person). PC60 uses the literal ``background``. COCO-Stuff, Cityscapes and ADE-150 use the mmseg names with
    the spaces removed (``trafficlight``, ``chestofdrawers``), as written in those files.
  - ``"clearclip"``: single names, the literal ``background`` for VOC21/PC60/COCO-Object. VOC21 is ClearCLIP's
    published ``cls_voc21.txt``; the other ClearCLIP files were not available to check, so VOC20 is VOC21 without
    background (as in ProxyCLIP, by the same authors), PC60/PC59/COCO-Object use the literal ``background`` and
    single names, and COCO-Stuff/Cityscapes/ADE-150 reuse the SCLIP lists (already single names).
  - ``"itaclip"``: ITACLIP's ``configs/cls_*.txt`` (only VOC21, PC60, COCO-Object, COCO-Stuff and Cityscapes are
    published): a 44-name background for VOC21, ``person in hat``, and ``avian``/``feline``/``seat``/
    ``motorcycle`` synonyms.
  - ``"ifseg"``: IFSeg's ``--category-list`` words of its run scripts (COCO-Stuff with "concrete wall", "other
    floor" ...; ADE-150 as mmseg), and coarse COCO-Stuff-27 words after the paper's Table 15.
  - ``"cliptrase"``: CLIPtrase's ``configs/dataset_cfg.py``, which has single names and appends a background list
    after the classes of VOC21, PC60 and COCO-Object; here that list is class 0's names, kept as published,
    including the duplicated ``bed`` and ``beachhill`` (two strings fused by a missing comma). VOC20/VOC21 name the
    television class ``tv`` and PC59/PC60 name the table ``diningtable``; ADE-847 names are whole synonym strings
    used as one query each. No Cityscapes or COCO-Stuff-27 list is published.
  - ``"maskclip"``: MaskCLIP's ``tools/maskclip_utils/prompt_engineering.py`` for the four benchmarks of its own
    protocol (VOC20, PC59, COCO-Stuff, Cityscapes): single names with spaces (``dining table``, ``potted plant``,
    ``tv monitor``) and COCO-Stuff's cleaned stuff names (``tile ceiling``, ``marble floor``).
  - ``"proxyclip"``: ProxyCLIP's ``configs/cls_*.txt`` (synonyms separated by ``"; "`` there): the 26 SCLIP stuff
    names as VOC21's background, single names (``ship``, ``table``, ``tvmonitor``), and a 17-name background for
    COCO-Object. Only its VOC21, VOC20 and COCO-Object files were available; the other datasets use the SCLIP lists.
  - ``"corrclip"``: CorrCLIP's files: ProxyCLIP's lists with ``people`` for ``person`` (seen in its VOC21, PC59 and
    Cityscapes files; applied to VOC20 and PC60 as well). COCO-Object, COCO-Stuff and ADE-150 use ProxyCLIP's.

* ``ZERO_SHOT_SPLITS``: the unseen classes of the ZegFormer splits used by ZegFormer, ZSSeg, FreeSeg, MAFT and
  IFSeg: COCO-Stuff 156/15, VOC20 15/5 (the last five VOC classes) and ADE-847 572/275 (unseen = the classes
  marked ``"rare"``, i.e. in at most 10 training images, in ZegFormer's ``register_ade20k_full_zero_freq.py``).
  The seen classes are all the others.

* ``palette``: the VOC bit-shift palette (VOC21; VOC20 drops its black), mmseg's ADE-150 palette (PC60/PC59 use its
  first 60 colours, as mmseg does) and the official Cityscapes train-id colours; any other dataset, and any colour
  past the end of an official palette, comes from the bit-shift palette.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from vocabseg.errors import UsageError

LISTS = Path(__file__).with_name("lists")
BACKGROUND = "background"


def _json(name: str):
    return json.loads((LISTS / name).read_text(encoding="utf-8"))


#: Canonical class names of every benchmark, in label-id order.
CLASSES: dict[str, tuple[str, ...]] = {key: tuple(names) for key, names in _json("classes.json").items()}
DATASETS: tuple[str, ...] = tuple(CLASSES)


@functools.cache
def name_lists() -> tuple[str, ...]:
    """The ids of every shipped name list (``voc21.sclip``, ...)."""
    return tuple(sorted(p.stem for p in (LISTS / "names").glob("*.txt")))


@functools.cache
def name_list(list_id: str) -> tuple[tuple[str, ...], ...]:
    """The query names of name list ``list_id`` (``<dataset>.<source>``): one tuple per class, in label-id order."""
    path = LISTS / "names" / f"{list_id}.txt"
    if not path.is_file():
        raise UsageError(f"no name list {list_id!r}; shipped lists: {', '.join(name_lists())}")
    names = tuple(tuple(line.split("|")) for line in path.read_text(encoding="utf-8").splitlines())
    dataset = list_id.split(".")[0]
    if dataset in CLASSES and len(names) != len(CLASSES[dataset]):
        raise RuntimeError(f"name list {list_id} has {len(names)} classes, {dataset} {len(CLASSES[dataset])}")
    return names


#: The source whose list a benchmark's queries come from when none is named (the SCLIP/NACLIP name files).
DEFAULT_SOURCE = "sclip"


def sources(dataset: str) -> tuple[str, ...]:
    """The sources of the name lists shipped for ``dataset``, :data:`DEFAULT_SOURCE` first."""
    found = [i.split(".", 1)[1] for i in name_lists() if i.split(".", 1)[0] == dataset]
    return tuple(sorted(found, key=lambda source: (source != DEFAULT_SOURCE, source)))


def query_names(dataset: str, source: str) -> tuple[tuple[str, ...], ...]:
    """The text-query names of ``dataset``'s classes in the list of ``source`` (one tuple per class)."""
    if dataset not in CLASSES:
        raise UsageError(f"Unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}.")
    if source not in sources(dataset):
        raise UsageError(f"No {source!r} name list for {dataset!r}; lists for {dataset!r}: "
                         f"{', '.join(sources(dataset)) or 'none'}.")
    return name_list(f"{dataset}.{source}")


_SPLITS = _json("splits.json")
#: Zero-shot splits: ``{dataset: {"unseen": class ids}}``; the seen classes are all the others.
ZERO_SHOT_SPLITS: dict[str, dict[str, tuple[int, ...]]] = {
    dataset: {"unseen": tuple(sorted(CLASSES[dataset].index(name) for name in split["unseen"]))}
    for dataset, split in _SPLITS["zero_shot_unseen"].items()
}
#: The 15 unseen COCO-Stuff classes in the order IFSeg's prompt lists them.
COCO_UNSEEN_ORDER: tuple[str, ...] = tuple(_SPLITS["coco_unseen_order"])

_HIERARCHY = _json("hierarchy.json")
#: COCO-Stuff's 27 coarse classes and, for each of the 171 fine classes, the index of its coarse class.
COARSE_27: tuple[str, ...] = tuple(_HIERARCHY["coco-stuff27"]["coarse"])
FINE_TO_COARSE: tuple[int, ...] = tuple(
    next(i for i, coarse in enumerate(COARSE_27) if fine in _HIERARCHY["coco-stuff27"]["members"][coarse])
    for fine in CLASSES["coco-stuff"])
#: IFSeg's coarse words (paper Table 15): coarse class -> fine words, as printed.
IFSEG_COARSE_WORDS: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in _HIERARCHY["ifseg_coarse_words"].items()}


def _bitshift_palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map: bit ``3*j + c`` of the label sets bit ``7 - j`` of channel ``c``."""
    labels = np.arange(n, dtype=np.int64)
    colours = np.zeros((n, 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            colours[:, channel] |= ((labels >> (3 * j + channel)) & 1) << (7 - j)
    return colours.astype(np.uint8)


@functools.cache
def _official_palettes() -> dict[str, np.ndarray]:
    table = {key: np.frombuffer(bytes.fromhex("".join(colours)), np.uint8).reshape(-1, 3)
             for key, colours in _json("palettes.json").items()}
    ade = table["ade150"]
    return {"voc21": _bitshift_palette(21), "voc20": _bitshift_palette(21)[1:], "ade150": ade, "pc60": ade[:60],
            "pc59": ade[1:60], "cityscapes": table["cityscapes"]}


def distinct_palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours for a custom class list: black for index 0 (background), then hues a golden-ratio
    step apart with alternating brightness, so that neighbouring classes never share a hue family (the VOC
    bit-shift colours put class 1 (128,0,0) next to class 7 (192,0,0)); distinct for every ``n <= 256``."""
    import colorsys

    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(1, n):
        hue = ((i - 1) * 0.6180339887) % 1.0
        saturation = (0.85, 0.6, 0.95)[i % 3]
        value = (0.95, 0.75, 0.55)[(i // 3) % 3]
        colours[i] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    return colours


def palette(dataset: str | None, n: int) -> np.ndarray:
    """An ``(n, 3)`` uint8 RGB palette: ``dataset``'s official colours where known, else the VOC bit-shift colours.

    ``dataset=None`` (a custom vocabulary) gives :func:`distinct_palette`. Colours past the end of an official
    palette are the bit-shift colours of the same indices.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    if dataset is not None and dataset not in CLASSES:
        raise UsageError(f"Unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)} (or None).")
    colours = _bitshift_palette(n) if dataset is not None else distinct_palette(n)
    official = _official_palettes().get(dataset) if dataset is not None else None
    if official is not None:
        k = min(n, len(official))
        colours[:k] = official[:k]
    return colours
