"""Benchmark datasets read from their standard folder layouts, with each benchmark's background/ignore rules.

Each dataset lists ``(image, label)`` pairs of a split and turns a raw label file into the *evaluated* label map:
ids ``0 .. C-1`` in the order of :data:`vocabseg.data.classes.CLASSES`, and :attr:`SegDataset.ignore_index` (255;
65535 for PC-459 and ADE-847, which have more than 255 classes) for pixels that are not scored.

================  ==================================================================  ===============================
key               files (under ``--data-root``)                                        background / ignore
================  ==================================================================  ===============================
voc21             ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass}``, split list     bg = class 0, scored; 255 ignored
                  ``ImageSets/Segmentation/val.txt``
voc20             same files                                                           reduce_zero_label: bg 0 -> 255,
                                                                                       classes shift down by one
pc60              ``VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext}``,          bg = class 0, scored
                  ``ImageSets/SegmentationContext/val.txt``
pc59              same files                                                           reduce_zero_label
pc459             ``VOCdevkit/VOC2010/annotations_detectron2/pc459_val/*.tif``         ids 0..458; 65535 ignored
                  (CAT-Seg layout; ``vocabseg data prepare pascal-context``)
coco-object       ``coco_stuff164k/{images,annotations}/val2017``,                      bg = class 0 (all stuff and the
                  ``*_instanceTrainIds.png``                                            unlabelled pixels): no ignore
coco-stuff        ``coco_stuff164k/annotations/val2017/*_labelTrainIds.png``           255 ignored, no bg class
coco-stuff27      the same files, each of the 171 classes mapped to its coarse group   255 ignored
coco-stuff-       the same files, only the 15 unseen classes (IFSeg's 15-way protocol;  every other pixel ignored
unseen15          not comparable to the GZSS hIoU of ``coco-stuff``)
cityscapes        ``cityscapes/{leftImg8bit,gtFine}/val/<city>/``,                      255 ignored
                  ``*_gtFine_labelTrainIds.png``
ade150            ``ADEChallengeData2016/{images,annotations}/validation``             reduce_zero_label: 0 ("other")
                                                                                       -> 255
ade847            ``ADE20K_2021_17_01/{images,annotations}_detectron2/validation``,     ids 0..846; 65535 ignored
                  ``*.tif`` (Mask2Former layout; ``vocabseg data prepare ade847``)
================  ==================================================================  ===============================

Label values outside a dataset's range (other than its raw ignore value) are treated as ignore and reported by
:meth:`SegDataset.check`. ``--data-root`` may be the folder holding the dataset folders (mmseg's ``data/``) or the
dataset folder itself (e.g. ``.../VOCdevkit/VOC2012``).

Zero-shot splits: ``coco-stuff`` (156 seen / 15 unseen), ``voc20`` (15 / 5) and ``ade847`` (572 / 275) carry their
unseen class ids (:data:`vocabseg.data.classes.ZERO_SHOT_SPLITS`); the evaluation then also reports mIoU(seen),
mIoU(unseen) and hIoU from the one confusion matrix over all classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vocabseg.data import classes as C
from vocabseg.errors import UsageError

__all__ = ["DATASET_KEYS", "DatasetLayoutError", "Sample", "SegDataset", "get_dataset"]


class DatasetLayoutError(UsageError):
    """The data root does not hold the dataset in the expected layout; the message says what was looked for."""


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    label: Path


@dataclass
class CheckReport:
    """What ``vocabseg data check`` found."""

    dataset: str
    split: str
    root: Path
    samples: int
    expected: int | None
    missing_images: list[str] = field(default_factory=list)
    missing_labels: list[str] = field(default_factory=list)
    labels_read: int = 0
    unexpected_values: dict[int, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    class_pixels: np.ndarray | None = None
    ignore_pixels: int = 0

    @property
    def ok(self) -> bool:
        return self.samples > 0 and not (self.missing_images or self.missing_labels or self.unreadable
                                         or self.unexpected_values)

    def lines(self) -> list[str]:
        out = [f"{self.dataset} ({self.split}) at {self.root}"]
        count = f"  {self.samples} image/label pairs"
        if self.expected is not None:
            count += (f" (the official split has {self.expected})" if self.samples != self.expected
                      else " (matches the official split)")
        out.append(count)
        for what, ids in (("images", self.missing_images), ("labels", self.missing_labels),
                          ("unreadable files", self.unreadable)):
            if ids:
                shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
                out.append(f"  missing {what}: {len(ids)} ({shown})" if what != "unreadable files"
                           else f"  unreadable files: {len(ids)} ({shown})")
        if self.labels_read:
            out.append(f"  label values checked in {self.labels_read} label file(s)")
            if self.unexpected_values:
                values = ", ".join(f"{v} ({n} px)" for v, n in sorted(self.unexpected_values.items())[:10])
                out.append(f"  unexpected label values (read as ignore): {values}")
            if self.class_pixels is not None:
                present = int((self.class_pixels > 0).sum())
                out.append(f"  classes present: {present} of {len(self.class_pixels)}; ignore pixels: "
                           f"{self.ignore_pixels}")
        out.append("  OK" if self.ok else "  PROBLEMS FOUND")
        return out


def _lut(size: int, table: dict[int, int], ignore: int) -> np.ndarray:
    lut = np.full(size, ignore, dtype=np.int64)
    for raw, value in table.items():
        lut[raw] = value
    return lut


@dataclass(frozen=True)
class _Spec:
    """How one benchmark lies on disk and how its raw labels become evaluated ids."""

    key: str
    classes: tuple[str, ...]
    roots: tuple[str, ...]  # candidate dataset folders, relative to --data-root
    markers: tuple[str, ...]  # paths (with {split}) that identify the dataset folder
    image: str  # image path relative to the dataset folder, with {split} and {id}
    label: str  # label path, with {split} and {id}
    split_file: str | None = None  # list of ids; None: list the label files matching ``label_glob``
    label_glob: str | None = None  # with {split}; the id is the path relative to the glob's folder minus ``suffix``
    split_names: tuple[tuple[str, str], ...] = ()  # our split name -> the folder's name
    expected: tuple[tuple[str, int], ...] = ()
    raw_ids: Callable[[], dict[int, int]] | None = None  # raw value -> evaluated id (default: identity)
    raw_extra: tuple[int, ...] = ()  # raw values mapped to ignore on purpose (reduce_zero_label's 0)
    raw_ignore: int = 255
    ignore_index: int = 255
    prepare_hint: str = ""
    names_dataset: str | None = None  # dataset whose query names to use (default: key)
    name_ids: tuple[int, ...] | None = None  # for subsets: the ids of our classes in ``names_dataset``


def _identity(n: int) -> Callable[[], dict[int, int]]:
    return lambda: {i: i for i in range(n)}


def _reduce_zero(n: int) -> Callable[[], dict[int, int]]:
    """mmseg's reduce_zero_label: 0 -> ignore, v -> v - 1."""
    return lambda: {i + 1: i for i in range(n)}


def _coco_coarse() -> dict[int, int]:
    return dict(enumerate(C.FINE_TO_COARSE))


_COCO_UNSEEN = C.ZERO_SHOT_SPLITS["coco-stuff"]["unseen"]


def _coco_unseen15() -> dict[int, int]:
    return {fine: index for index, fine in enumerate(_COCO_UNSEEN)}


_VOC_ROOTS = ("VOCdevkit/VOC2012", "VOC2012", ".")
_PC_ROOTS = ("VOCdevkit/VOC2010", "VOC2010", ".")
_COCO_ROOTS = ("coco_stuff164k", "coco_stuff", ".")
_ADE_SPLITS = (("val", "validation"), ("train", "training"))
_COCO_SPLITS = (("val", "val2017"), ("train", "train2017"))
_PC_HINT = ("PASCAL-Context labels are made from the .mat files of trainval.tar.gz: run "
            "`vocabseg data prepare pascal-context --data-root DATA_ROOT`.")
_COCO_HINT = "run `vocabseg data prepare {what} --data-root DATA_ROOT` on the raw COCO-Stuff pngs first."

_VOC = dict(roots=_VOC_ROOTS, markers=("JPEGImages", "SegmentationClass"), image="JPEGImages/{id}.jpg",
            label="SegmentationClass/{id}.png", split_file="ImageSets/Segmentation/{split}.txt",
            expected=(("val", 1449), ("train", 1464)))
_PC = dict(roots=_PC_ROOTS, markers=("JPEGImages", "SegmentationClassContext"), image="JPEGImages/{id}.jpg",
           label="SegmentationClassContext/{id}.png", split_file="ImageSets/SegmentationContext/{split}.txt",
           expected=(("val", 5105), ("train", 4998)), prepare_hint=_PC_HINT)


def _coco(suffix: str, what: str) -> dict:
    return dict(roots=_COCO_ROOTS, markers=("images/{split}", "annotations/{split}"), image="images/{split}/{id}.jpg",
                label="annotations/{split}/{id}" + suffix, label_glob="annotations/{split}/*" + suffix,
                split_names=_COCO_SPLITS, expected=(("val", 5000), ("train", 118287)),
                prepare_hint=_COCO_HINT.format(what=what))


_SPECS: dict[str, _Spec] = {
    spec.key: spec
    for spec in (
        _Spec("voc21", C.CLASSES["voc21"], **_VOC, raw_ids=_identity(21)),
        _Spec("voc20", C.CLASSES["voc20"], **_VOC, raw_ids=_reduce_zero(20), raw_extra=(0,)),
        _Spec("pc60", C.CLASSES["pc60"], **_PC, raw_ids=_identity(60)),
        _Spec("pc59", C.CLASSES["pc59"], **_PC, raw_ids=_reduce_zero(59), raw_extra=(0,)),
        _Spec("pc459", C.CLASSES["pc459"], roots=_PC_ROOTS,
              markers=("JPEGImages", "annotations_detectron2/pc459_{split}"), image="JPEGImages/{id}.jpg",
              label="annotations_detectron2/pc459_{split}/{id}.tif",
              label_glob="annotations_detectron2/pc459_{split}/*.tif", expected=(("val", 5105),),
              raw_ids=_identity(459), raw_ignore=65535, ignore_index=65535, prepare_hint=_PC_HINT),
        _Spec("coco-object", C.CLASSES["coco-object"], **_coco("_instanceTrainIds.png", "coco-object"),
              raw_ids=_identity(81)),
        _Spec("coco-stuff", C.CLASSES["coco-stuff"], **_coco("_labelTrainIds.png", "coco-stuff"),
              raw_ids=_identity(171)),
        _Spec("coco-stuff27", C.CLASSES["coco-stuff27"], **_coco("_labelTrainIds.png", "coco-stuff"),
              raw_ids=_coco_coarse),
        _Spec("coco-stuff-unseen15", tuple(C.CLASSES["coco-stuff"][i] for i in _COCO_UNSEEN),
              **_coco("_labelTrainIds.png", "coco-stuff"), raw_ids=_coco_unseen15, raw_extra=tuple(range(171)),
              names_dataset="coco-stuff",
              name_ids=_COCO_UNSEEN),
        _Spec("cityscapes", C.CLASSES["cityscapes"], roots=("cityscapes", "."),
              markers=("leftImg8bit/{split}", "gtFine/{split}"), image="leftImg8bit/{split}/{id}_leftImg8bit.png",
              label="gtFine/{split}/{id}_gtFine_labelTrainIds.png",
              label_glob="gtFine/{split}/*/*_gtFine_labelTrainIds.png", expected=(("val", 500), ("train", 2975)),
              raw_ids=_identity(19),
              prepare_hint="create the *_gtFine_labelTrainIds.png files with cityscapesscripts "
                           "(`csCreateTrainIdLabelImgs`)."),
        _Spec("ade150", C.CLASSES["ade150"], roots=("ADEChallengeData2016", "ade/ADEChallengeData2016", "."),
              markers=("images/{split}", "annotations/{split}"), image="images/{split}/{id}.jpg",
              label="annotations/{split}/{id}.png", label_glob="annotations/{split}/*.png", split_names=_ADE_SPLITS,
              expected=(("val", 2000), ("train", 20210)), raw_ids=_reduce_zero(150), raw_extra=(0,)),
        _Spec("ade847", C.CLASSES["ade847"], roots=("ADE20K_2021_17_01", "."),
              markers=("images_detectron2/{split}", "annotations_detectron2/{split}"),
              image="images_detectron2/{split}/{id}.jpg", label="annotations_detectron2/{split}/{id}.tif",
              label_glob="annotations_detectron2/{split}/*.tif", split_names=_ADE_SPLITS,
              expected=(("val", 2000),), raw_ids=_identity(847), raw_ignore=65535, ignore_index=65535,
              prepare_hint="run `vocabseg data prepare ade847 --data-root DATA_ROOT` on the ADE20K_2021_17_01 "
                           "download first."),
    )
}

#: Every dataset key `vocabseg eval --dataset` accepts.
DATASET_KEYS: tuple[str, ...] = tuple(_SPECS)


def layout(key: str) -> _Spec:
    """The layout facts of benchmark ``key`` (folders, label files, classes, ignore value)."""
    if key not in _SPECS:
        raise UsageError(f"unknown dataset {key!r}; available: {', '.join(DATASET_KEYS)}")
    return _SPECS[key]


class SegDataset:
    """One split of a benchmark on disk: ``samples``, ``read_image``, ``read_label`` (evaluated ids), ``check``."""

    def __init__(self, key: str, data_root: str | os.PathLike, split: str = "val"):
        self.spec = spec = layout(key)
        self.key = key
        self.split = split
        self.data_root = Path(data_root).expanduser()
        self.folder_split = dict(spec.split_names).get(split, split)
        self.classes: tuple[str, ...] = spec.classes
        self.num_classes = len(spec.classes)
        self.ignore_index = spec.ignore_index
        self.has_background = self.classes[0] == C.BACKGROUND
        split_info = C.ZERO_SHOT_SPLITS.get(key)
        self.unseen: tuple[int, ...] | None = tuple(split_info["unseen"]) if split_info else None
        self.expected: int | None = dict(spec.expected).get(split)
        self.root = self._find_root()
        self._lut_cache: np.ndarray | None = None
        self._samples: list[Sample] | None = None
        self.missing_images: list[str] = []
        self.missing_labels: list[str] = []

    # --- layout -----------------------------------------------------------------------------------------------

    def _fmt(self, template: str, sample_id: str = "") -> str:
        return template.format(split=self.folder_split, id=sample_id)

    def _find_root(self) -> Path:
        if not self.data_root.is_dir():
            raise DatasetLayoutError(f"{self.key}: data root {self.data_root} is not a folder")
        markers = [self._fmt(m) for m in self.spec.markers]
        best: tuple[int, Path, list[str]] | None = None
        for rel in self.spec.roots:
            candidate = (self.data_root / rel) if rel != "." else self.data_root
            missing = [m for m in markers if not (candidate / m).is_dir()]
            if not missing:
                return candidate
            found = len(markers) - len(missing)
            if candidate.is_dir() and (best is None or found > best[0]):
                best = (found, candidate, missing)
        looked = ", ".join(str(self.data_root / r) if r != "." else str(self.data_root) for r in self.spec.roots)
        message = (f"{self.key} ({self.split}): no dataset found under {self.data_root}. Looked in {looked} for "
                   f"the folders {', '.join(m + '/' for m in markers)}.")
        if best is not None and best[0] > 0:
            message += f" {best[1]} has {len(markers) - len(best[2])} of them but no {', '.join(best[2])}."
        if self.spec.prepare_hint:
            message += " " + self.spec.prepare_hint
        raise DatasetLayoutError(message.replace("DATA_ROOT", str(self.data_root)))

    def _list_ids(self) -> list[str]:
        spec = self.spec
        if spec.split_file is not None:
            path = self.root / self._fmt(spec.split_file)
            if not path.is_file():
                message = f"{self.key}: the split list {path} is missing (one image id per line)."
                if spec.prepare_hint:
                    message += " " + spec.prepare_hint.replace("DATA_ROOT", str(self.data_root))
                raise DatasetLayoutError(message)
            return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        pattern = self._fmt(spec.label_glob)
        folder, glob = pattern.split("*", 1)
        base = self.root / folder.rstrip("/")
        suffix = glob.split("*")[-1]
        ids = sorted(str(p.relative_to(base))[: -len(suffix)] for p in base.glob("*" + glob))
        if not ids:
            message = f"{self.key}: no label files {pattern} under {self.root}."
            if spec.prepare_hint:
                message += " " + spec.prepare_hint.replace("DATA_ROOT", str(self.data_root))
            raise DatasetLayoutError(message)
        return ids

    @property
    def samples(self) -> list[Sample]:
        """All samples of the split (including ones with a missing file: see ``missing_images/labels``)."""
        if self._samples is None:
            samples = [Sample(i, self.root / self._fmt(self.spec.image, i), self.root / self._fmt(self.spec.label, i))
                       for i in self._list_ids()]
            self.missing_images = [s.id for s in samples if not s.image.is_file()]
            self.missing_labels = [s.id for s in samples if not s.label.is_file()]
            self._samples = samples
        return self._samples

    def __len__(self) -> int:
        return len(self.samples)

    def require_complete(self, samples: list[Sample] | None = None) -> None:
        """Raise a :class:`DatasetLayoutError` naming the missing files, if any sample lacks its image or label."""
        samples = self.samples if samples is None else samples
        missing = [str(p) for s in samples for p in (s.image, s.label) if not p.is_file()]
        if missing:
            shown = "\n  ".join(missing[:5]) + ("\n  ..." if len(missing) > 5 else "")
            raise DatasetLayoutError(f"{self.key}: {len(missing)} file(s) missing:\n  {shown}\n"
                                     f"Run `vocabseg data check {self.key} --data-root {self.data_root}`.")

    # --- labels -----------------------------------------------------------------------------------------------

    @property
    def lut(self) -> np.ndarray:
        """Raw label value -> evaluated id (ignore for every other value)."""
        if self._lut_cache is None:
            table = (self.spec.raw_ids or _identity(self.num_classes))()
            size = 65536 if self.spec.raw_ignore > 255 or self.num_classes > 255 else 256
            self._lut_cache = _lut(size, table, self.ignore_index)
        return self._lut_cache

    def expected_raw_values(self) -> np.ndarray:
        """Boolean table over raw values: True for values with a meaning (a class, a value the benchmark maps to
        ignore on purpose, or the raw ignore value)."""
        table = (self.spec.raw_ids or _identity(self.num_classes))()
        known = np.zeros(len(self.lut), dtype=bool)
        known[list(table)] = True
        known[list(self.spec.raw_extra)] = True
        if self.spec.raw_ignore < len(known):
            known[self.spec.raw_ignore] = True
        return known

    def read_raw_label(self, path: Path) -> np.ndarray:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I;16", "I;16L", "I;16B", "I", "1"):
                raise ValueError(f"{path}: label image has mode {image.mode}; expected class ids in a palette, "
                                 "grey or 16-bit image (not colours)")
            return np.asarray(image).astype(np.int64)

    def to_eval_ids(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values -> evaluated ids (``int32``; ``ignore_index`` where not scored)."""
        lut = self.lut
        raw = raw.astype(np.int64)
        inside = (raw >= 0) & (raw < len(lut))
        out = np.full(raw.shape, self.ignore_index, dtype=np.int32)
        out[inside] = lut[raw[inside]]
        return out

    def read_label(self, sample: Sample) -> np.ndarray:
        """The evaluated label map ``H,W`` of ``sample``."""
        return self.to_eval_ids(self.read_raw_label(sample.label))

    def read_image(self, sample: Sample) -> np.ndarray:
        from vocabseg.io.images import load_image

        return load_image(sample.image)

    # --- classes ------------------------------------------------------------------------------------------------

    def query_names(self, names: str | None = None) -> tuple[tuple[str, ...], ...]:
        """The text queries of this benchmark's classes (one tuple per class): the name list ``names`` (a list id
        such as ``voc21.sclip``, or only its source, ``sclip``) when given and published, else the first published
        list of the benchmark, else the class names themselves (ADE-847's WordNet strings as one query each)."""
        names_key = self.spec.names_dataset or self.key
        lists = [names.split(".", 1)[1] if names and "." in names else names] if names else []
        lists += list(C.sources(names_key))
        found = next((C.query_names(names_key, source) for source in lists if source in C.sources(names_key)),
                     tuple((label,) for label in C.CLASSES[names_key]))
        if self.spec.name_ids is not None:
            found = tuple(found[i] for i in self.spec.name_ids)
        return found

    def palette(self) -> np.ndarray:
        return C.palette(self.key if self.key in C.CLASSES else None, self.num_classes)

    # --- check --------------------------------------------------------------------------------------------------

    def check(self, max_labels: int | None = 200, progress: bool = False) -> CheckReport:
        """Count samples, find missing files, and read up to ``max_labels`` labels (evenly spread; None: all) to
        find values outside the dataset's range."""
        samples = self.samples
        report = CheckReport(self.key, self.split, self.root, len(samples), self.expected,
                             list(self.missing_images), list(self.missing_labels))
        readable = [s for s in samples if s.label.is_file()]
        if max_labels is None or max_labels >= len(readable):
            chosen = readable
        elif max_labels <= 0:
            chosen = []
        else:
            chosen = [readable[int(i)] for i in np.linspace(0, len(readable) - 1, max_labels).round()]
        known = self.expected_raw_values()
        pixels = np.zeros(self.num_classes, dtype=np.int64)
        unexpected: dict[int, int] = {}
        iterator = chosen
        if progress:
            from tqdm import tqdm

            iterator = tqdm(chosen, desc="check labels", unit="file", disable=None)
        for sample in iterator:
            try:
                raw = self.read_raw_label(sample.label)
            except (OSError, ValueError):
                report.unreadable.append(sample.id)
                continue
            values, counts = np.unique(raw, return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                if not (0 <= value < len(known) and known[value]):
                    unexpected[value] = unexpected.get(value, 0) + count
            ids = self.to_eval_ids(raw)
            valid = ids != self.ignore_index
            pixels += np.bincount(ids[valid], minlength=self.num_classes)[: self.num_classes]
            report.ignore_pixels += int((~valid).sum())
            report.labels_read += 1
        report.unexpected_values = unexpected
        report.class_pixels = pixels if report.labels_read else None
        return report


def get_dataset(key: str, data_root: str | os.PathLike, split: str = "val") -> SegDataset:
    """The dataset ``key`` (one of :data:`DATASET_KEYS`) under ``data_root``."""
    return SegDataset(key, data_root, split)
