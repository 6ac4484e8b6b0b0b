"""Converters from the raw downloads to the evaluated label files (``vocabseg data prepare NAME``).

* ``coco-stuff``: the raw COCO-Stuff-164k pngs (``stuffthingmaps_trainval2017.zip``, values 0..181 and 255) in
  ``coco_stuff164k/annotations/{val2017,train2017}`` -> ``*_labelTrainIds.png`` (171 train ids, 255 ignore), as
  mmseg's ``coco_stuff164k.py``.
* ``coco-object``: the same raw pngs -> ``*_instanceTrainIds.png``: the 80 things -> 1..80, every other value (the
  stuff classes and the unlabelled 255) -> 0 = background, so there are no ignore pixels (GroupViT/TCL/SCLIP
  ``cvt_coco_object.py``).
* ``pascal-context``: the ``.mat`` files of PASCAL-Context's ``trainval.tar.gz`` (``LabelMap``: ids 1..459 into
  ``labels.txt``) in ``VOCdevkit/VOC2010/trainval`` -> ``SegmentationClassContext/<id>.png`` (PC-60 ids: the 59
  classes of mmseg's ``_mapping`` -> 1..59 in alphabetical order, everything else -> 0) and
  ``annotations_detectron2/pc459_<split>/<id>.tif`` (uint16 ``LabelMap - 1``; 0 -> 65535 ignore, as CAT-Seg's
  ``prepare_pascal_context_459.py``), plus ``ImageSets/SegmentationContext/<split>.txt`` from VOC2010's
  ``ImageSets/Main/<split>.txt``. No Detail API is needed.
* ``ade847``: ``ADE20K_2021_17_01/index_ade20k.pkl`` and the ``*_seg.png`` files -> ``images_detectron2/<split>``
  and ``annotations_detectron2/<split>/*.tif`` (uint16 train ids 0..846, 65535 ignore) as Mask2Former's
  ``prepare_ade20k_full_sem_seg.py``: class mask ``R // 10 * 256 + G`` = object index + 1, images whose short side
  exceeds 512 resized to 512 (bilinear image, nearest labels). The 847 classes are found in ``objectnames`` by name.

Every converter checks what it was given (raw file counts against the official ones, matching images, unexpected
label values) and that it wrote one output per input; it raises :class:`PrepareError` saying what is wrong when the
layout is not as expected.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vocabseg.data import classes as C
from vocabseg.errors import UsageError
from vocabseg.io.outputs import atomic_write

log = logging.getLogger(__name__)


class PrepareError(UsageError):
    """The raw data is not where or what a converter expects."""


@dataclass
class PrepareReport:
    name: str
    root: Path
    inputs: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.name}: {self.root}"]
        for split, count in self.inputs.items():
            out.append(f"  {split}: {count} input(s), {self.written.get(split, 0)} written, "
                       f"{self.skipped.get(split, 0)} already there")
        out += [f"  warning: {w}" for w in self.warnings]
        return out


# --- shared helpers ----------------------------------------------------------------------------------------------

def _find(data_root: Path, candidates: Iterable[str], marker: str, what: str, hint: str) -> Path:
    data_root = Path(data_root).expanduser()
    looked = []
    for rel in candidates:
        folder = data_root / rel if rel != "." else data_root
        looked.append(str(folder / marker))
        if (folder / marker).exists():
            return folder
    raise PrepareError(f"{what}: not found; looked for {', '.join(looked)}. {hint}")


def _save_png(path: Path, labels: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(tmp, format="PNG")


def _save_tif(path: Path, labels: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        Image.fromarray(labels.astype(np.uint16)).save(tmp, format="TIFF")


def _run(jobs: list, worker: Callable, workers: int, desc: str, progress: bool) -> list:
    """Run ``worker(job)`` for every job (in ``workers`` processes when > 1), with a progress bar."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="file", disable=None if progress else True)
    results = []
    try:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers) as pool:
                for result in pool.map(worker, jobs, chunksize=32):
                    results.append(result)
                    bar.update(1)
        else:
            for job in jobs:
                results.append(worker(job))
                bar.update(1)
    finally:
        bar.close()
    return results


def _check_count(report: PrepareReport, split: str, found: int, expected: int | None, what: str) -> None:
    if expected is not None and found != expected:
        report.warnings.append(f"{split}: {found} {what}, the official split has {expected} (partial download?)")


# --- COCO-Stuff / COCO-Object ------------------------------------------------------------------------------------

#: Raw COCO-Stuff values that are not classes: 10 unused thing ids and the unused id 90 (COCO ids are raw + 1).
COCO_UNUSED_RAW = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_EXPECTED = {"val2017": 5000, "train2017": 118287}


def coco_stuff_lut() -> np.ndarray:
    """Raw COCO-Stuff value (0..181, 255) -> 171 train ids (mmseg ``clsID_to_trID``); 255 elsewhere."""
    used = [v for v in range(182) if v not in COCO_UNUSED_RAW]
    assert len(used) == 171
    lut = np.full(256, 255, dtype=np.uint8)
    lut[used] = np.arange(171, dtype=np.uint8)
    return lut


def coco_object_lut() -> np.ndarray:
    """Raw COCO-Stuff value -> COCO-Object ids: the 80 things -> 1..80, everything else (stuff, 255) -> 0."""
    stuff = coco_stuff_lut()
    lut = np.zeros(256, dtype=np.uint8)
    things = np.flatnonzero(stuff < 80)
    lut[things] = stuff[things] + 1
    return lut


def _convert_coco(job: tuple[str, str, str]) -> tuple[str, list[int]]:
    src, dst, kind = job
    raw = np.asarray(Image.open(src))
    if raw.ndim != 2:
        raise PrepareError(f"{src}: expected a single-channel id png (the raw COCO-Stuff annotation), got shape "
                           f"{raw.shape}")
    lut = coco_object_lut() if kind == "object" else coco_stuff_lut()
    values = np.unique(raw)
    odd = [int(v) for v in values if (v > 181 and v != 255) or v in COCO_UNUSED_RAW]
    _save_png(Path(dst), lut[raw])
    return dst, odd


def _prepare_coco(kind: str, data_root, splits=None, overwrite=False, workers=1, progress=True) -> PrepareReport:
    suffix = "_instanceTrainIds.png" if kind == "object" else "_labelTrainIds.png"
    root = _find(data_root, ("coco_stuff164k", "coco_stuff", "."), "annotations", "COCO-Stuff annotations",
                 "Unzip stuffthingmaps_trainval2017.zip into coco_stuff164k/annotations/ (giving val2017/ and "
                 "train2017/ folders of raw pngs) and the COCO images into coco_stuff164k/images/.")
    report = PrepareReport(f"coco-{kind}", root)
    names = ["val2017", "train2017"] if splits is None else [_coco_split(s) for s in splits]
    present = [s for s in names if (root / "annotations" / s).is_dir()]
    if not present:
        raise PrepareError(f"no {' or '.join(names)} folder in {root / 'annotations'}: unzip "
                           "stuffthingmaps_trainval2017.zip there")
    for split in present:
        folder = root / "annotations" / split
        raw = sorted(p for p in folder.glob("*.png") if not p.name.endswith(("TrainIds.png",)))
        if not raw:
            raise PrepareError(f"{folder} has no raw COCO-Stuff pngs (like 000000000139.png); unzip "
                               "stuffthingmaps_trainval2017.zip there")
        report.inputs[split] = len(raw)
        _check_count(report, split, len(raw), COCO_EXPECTED.get(split), "raw annotation pngs")
        images = root / "images" / split
        if not images.is_dir():
            report.warnings.append(f"{split}: no image folder {images}; evaluation needs the COCO images there")
        else:
            missing = [p.stem for p in raw if not (images / f"{p.stem}.jpg").is_file()]
            if missing:
                report.warnings.append(f"{split}: {len(missing)} annotation(s) without an image in {images} "
                                       f"(e.g. {missing[0]}.jpg)")
        jobs = [(str(p), str(p.with_name(p.stem + suffix)), kind) for p in raw]
        todo = [j for j in jobs if overwrite or not Path(j[1]).is_file()]
        report.skipped[split] = len(jobs) - len(todo)
        results = _run(todo, _convert_coco, workers, f"{kind} {split}", progress)
        odd = sorted({v for _, values in results for v in values})
        if odd:
            report.warnings.append(f"{split}: unexpected raw values {odd} (mapped to "
                                   f"{'0' if kind == 'object' else '255'})")
        report.written[split] = len(results)
        outputs = len(list(folder.glob("*" + suffix)))
        if outputs != len(raw):
            raise PrepareError(f"{folder}: {len(raw)} raw pngs but {outputs} {suffix} files after conversion")
    if kind == "object" and set(present) == {"val2017", "train2017"}:
        total = sum(report.inputs.values())
        if total != 123287:
            report.warnings.append(f"train+val: {total} annotations, cvt_coco_object.py expects 123,287")
    return report


def _coco_split(split: str) -> str:
    return {"val": "val2017", "train": "train2017"}.get(split, split)


def prepare_coco_stuff(data_root, splits=None, overwrite=False, workers=1, progress=True) -> PrepareReport:
    return _prepare_coco("stuff", data_root, splits, overwrite, workers, progress)


def prepare_coco_object(data_root, splits=None, overwrite=False, workers=1, progress=True) -> PrepareReport:
    return _prepare_coco("object", data_root, splits, overwrite, workers, progress)


# --- PASCAL-Context ------------------------------------------------------------------------------------------------

#: mmseg ``tools/dataset_converters/pascal_context.py`` ``_mapping``: the 459-class ids of background (0) and the
#: 59 classes; sorted, position = PC-60 id.
PC59_FROM_459 = (
    0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144, 158,
    159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360, 366,
    368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)
PC_EXPECTED = {"val": 5105, "train": 4998}


def pc60_lut() -> np.ndarray:
    """459-class id (1-based, ``LabelMap`` value) -> PC-60 id; everything outside the 59 classes -> 0."""
    lut = np.zeros(65536, dtype=np.uint8)
    lut[list(PC59_FROM_459[1:])] = np.arange(1, 60, dtype=np.uint8)
    return lut


def pc459_labels(label_map: np.ndarray) -> np.ndarray:
    """``LabelMap`` (1..459) -> PC-459 ids 0..458, with 65535 where the map is 0 (unlabelled)."""
    label_map = label_map.astype(np.int64)
    return np.where(label_map > 0, label_map - 1, 65535).astype(np.uint16)


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    from scipy.io import loadmat

    data = loadmat(str(path))
    if "LabelMap" not in data:
        raise PrepareError(f"{path}: no LabelMap in this .mat file (keys: "
                           f"{', '.join(k for k in data if not k.startswith('__'))}); expected PASCAL-Context's "
                           "trainval/*.mat")
    return np.asarray(data["LabelMap"])


def _convert_pc(job: tuple[str, str, str | None]) -> tuple[str, list[int]]:
    src, dst60, dst459 = job
    label_map = read_label_map(src)
    odd = [int(v) for v in np.unique(label_map) if v > 459]
    _save_png(Path(dst60), pc60_lut()[np.clip(label_map, 0, 65535)])
    if dst459:
        _save_tif(Path(dst459), pc459_labels(label_map))
    return src, odd


def _pascal_context_ids(root: Path, lists: Path, split: str, mats: dict[str, Path], report: PrepareReport
                        ) -> list[str]:
    """The ids of ``split`` that have a .mat annotation (from the first split list found); counts and warnings go
    to ``report``."""
    ids = None
    for candidate in (lists / f"{split}.txt", root / "ImageSets" / "Main" / f"{split}.txt",
                      root / f"pascalcontext_{split}.txt"):
        if candidate.is_file():
            ids = [line.split()[0] for line in candidate.read_text().splitlines() if line.strip()]
            break
    if ids is None:
        raise PrepareError(f"no {split} list: need VOC2010's ImageSets/Main/{split}.txt under {root} (from "
                           "VOCtrainval_03-May-2010.tar) or ImageSets/SegmentationContext/{split}.txt")
    without = [i for i in ids if i not in mats]
    if without:
        report.warnings.append(f"{split}: {len(without)} listed image(s) have no .mat (e.g. {without[0]}); left out")
    ids = [i for i in ids if i in mats]
    if not ids:
        raise PrepareError(f"{split}: none of the listed images has a .mat file in {root / 'trainval'}")
    report.inputs[split] = len(ids)
    _check_count(report, split, len(ids), PC_EXPECTED.get(split), ".mat annotations")
    missing = [i for i in ids if not (root / "JPEGImages" / f"{i}.jpg").is_file()]
    if missing:
        report.warnings.append(f"{split}: {len(missing)} image(s) missing from {root / 'JPEGImages'} "
                               f"(e.g. {missing[0]}.jpg)")
    return ids


def prepare_pascal_context(data_root, splits=None, overwrite=False, workers=1, progress=True) -> PrepareReport:
    root = _find(data_root, ("VOCdevkit/VOC2010", "VOC2010", "."), "trainval", "PASCAL-Context .mat files",
                 "Extract PASCAL-Context's trainval.tar.gz into VOCdevkit/VOC2010 (giving VOC2010/trainval/*.mat) "
                 "next to VOC2010's JPEGImages/ and ImageSets/.")
    report = PrepareReport("pascal-context", root)
    mats = {p.stem: p for p in (root / "trainval").glob("*.mat")}
    if not mats:
        raise PrepareError(f"{root / 'trainval'} has no .mat files; extract PASCAL-Context's trainval.tar.gz there")
    splits = list(splits or ("val", "train"))
    lists = root / "ImageSets" / "SegmentationContext"
    for split in splits:
        ids = _pascal_context_ids(root, lists, split, mats, report)
        dir60 = root / "SegmentationClassContext"
        dir459 = root / "annotations_detectron2" / f"pc459_{split}"
        jobs = [(str(mats[i]), str(dir60 / f"{i}.png"), str(dir459 / f"{i}.tif")) for i in ids]
        todo = [j for j in jobs if overwrite or not (Path(j[1]).is_file() and Path(j[2]).is_file())]
        report.skipped[split] = len(jobs) - len(todo)
        dir60.mkdir(parents=True, exist_ok=True)
        dir459.mkdir(parents=True, exist_ok=True)
        results = _run(todo, _convert_pc, workers, f"pascal-context {split}", progress)
        odd = sorted({v for _, values in results for v in values})
        if odd:
            report.warnings.append(f"{split}: LabelMap values above 459: {odd[:10]}")
        report.written[split] = len(results)
        with atomic_write(lists / f"{split}.txt") as tmp:
            tmp.write_text("".join(f"{i}\n" for i in ids))
        written = sum((dir60 / f"{i}.png").is_file() and (dir459 / f"{i}.tif").is_file() for i in ids)
        if written != len(ids):
            raise PrepareError(f"{split}: {len(ids)} inputs but only {written} complete outputs")
    return report


# --- ADE20K-Full (847) ---------------------------------------------------------------------------------------------

class _IndexUnpickler(pickle.Unpickler):
    """Reads ``index_ade20k.pkl`` (dicts, lists, numpy arrays) without running arbitrary code."""

    _ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")})

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"index_ade20k.pkl refers to {module}.{name}, which is not allowed")


def read_ade_index(path: Path) -> dict:
    with open(path, "rb") as handle:
        return _IndexUnpickler(handle).load()


def ade847_id_map(objectnames: list[str]) -> dict[int, int]:
    """Class-mask value (object index + 1) -> ADE-847 train id, matching the 847 names in ``objectnames``."""
    index: dict[str, list[int]] = {}
    for position, name in enumerate(objectnames):
        index.setdefault(str(name).strip(), []).append(position)
    mapping, missing, ambiguous = {}, [], []
    for train_id, name in enumerate(C.CLASSES["ade847"]):
        positions = index.get(name, [])
        if not positions:
            missing.append(name)
        elif len(positions) > 1:
            ambiguous.append(name)
        else:
            mapping[positions[0] + 1] = train_id
    if missing or ambiguous:
        raise PrepareError(f"index_ade20k.pkl: {len(missing)} of the 847 class names not found "
                           f"({', '.join(missing[:5])}) and {len(ambiguous)} ambiguous; is this ADE20K_2021_17_01?")
    return mapping


def _resize_short(image: np.ndarray, labels: np.ndarray, max_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mask2Former's rule: a short side above ``max_size`` becomes ``max_size`` (bilinear image, nearest labels)."""
    import torch
    import torch.nn.functional as F

    h, w = labels.shape
    if w >= h > max_size:
        size = (max_size, round(w / float(h) * max_size))
    elif h >= w > max_size:
        size = (round(h / float(w) * max_size), max_size)
    else:
        return image, labels
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
    y = F.interpolate(torch.from_numpy(labels.astype(np.float64))[None, None], size=size, mode="nearest")
    return x[0].permute(1, 2, 0).to(torch.uint8).numpy(), y[0, 0].numpy().astype(labels.dtype)


def _convert_ade(job: tuple[str, str, str, dict]) -> tuple[str, list[int]]:
    src, dst_image, dst_label, id_map = job
    from vocabseg.io.images import load_image

    seg = np.asarray(Image.open(src.replace(".jpg", "_seg.png")).convert("RGB"))
    class_mask = (seg[:, :, 0] // 10).astype(np.int32) * 256 + seg[:, :, 1].astype(np.int32)
    image = load_image(src)
    image, class_mask = _resize_short(image, class_mask)
    lut_keys = np.array(sorted(id_map), dtype=np.int64)
    lut_vals = np.array([id_map[k] for k in lut_keys], dtype=np.int64)
    out = np.full(class_mask.shape, 65535, dtype=np.uint16)
    pos = np.searchsorted(lut_keys, class_mask)
    pos = np.clip(pos, 0, len(lut_keys) - 1)
    hit = lut_keys[pos] == class_mask
    out[hit] = lut_vals[pos[hit]]
    with atomic_write(dst_image) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=95)
    _save_tif(Path(dst_label), out)
    return src, []


def prepare_ade847(data_root, splits=None, overwrite=False, workers=1, progress=True) -> PrepareReport:
    root = _find(data_root, ("ADE20K_2021_17_01", "ade/ADE20K_2021_17_01", "."), "index_ade20k.pkl",
                 "ADE20K-Full index", "Unzip ADE20K_2021_17_01.zip under the data root (it holds index_ade20k.pkl "
                 "and images/ADE/{training,validation}).")
    report = PrepareReport("ade847", root)
    index = read_ade_index(root / "index_ade20k.pkl")
    for key in ("filename", "folder", "objectnames"):
        if key not in index:
            raise PrepareError(f"{root / 'index_ade20k.pkl'} has no {key!r}; is this the ADE20K_2021_17_01 index?")
    id_map = ade847_id_map(list(index["objectnames"]))
    wanted = {"val": "validation", "train": "training"}
    splits = [wanted.get(s, s) for s in (splits or ("val",))]
    for split in splits:
        tag = "val" if split == "validation" else "train"
        jobs = []
        missing = []
        for folder, filename in zip(index["folder"], index["filename"], strict=True):
            if filename.split("_")[1] != tag:
                continue
            folder = str(folder)
            marker = "ADE20K_2021_17_01/"
            rel = folder.split(marker, 1)[1] if marker in folder else folder
            src = root / rel / filename
            if not src.is_file() or not Path(str(src).replace(".jpg", "_seg.png")).is_file():
                missing.append(str(src))
                continue
            stem = Path(filename).stem
            jobs.append((str(src), str(root / "images_detectron2" / split / f"{stem}.jpg"),
                         str(root / "annotations_detectron2" / split / f"{stem}.tif"), id_map))
        report.inputs[split] = len(jobs)
        if missing:
            report.warnings.append(f"{split}: {len(missing)} indexed image(s) or _seg.png missing "
                                   f"(e.g. {missing[0]})")
        if not jobs:
            raise PrepareError(f"no {split} images found under {root} (looked for the files listed in "
                               "index_ade20k.pkl)")
        _check_count(report, split, len(jobs), 2000 if tag == "val" else None, "images")
        todo = [j for j in jobs if overwrite or not (Path(j[1]).is_file() and Path(j[2]).is_file())]
        report.skipped[split] = len(jobs) - len(todo)
        report.written[split] = len(_run(todo, _convert_ade, workers, f"ade847 {split}", progress))
        written = len(list((root / "annotations_detectron2" / split).glob("*.tif")))
        if written < len(jobs):
            raise PrepareError(f"{split}: {len(jobs)} inputs but {written} label files written")
    return report


CONVERTERS: dict[str, Callable[..., PrepareReport]] = {
    "coco-object": prepare_coco_object,
    "coco-stuff": prepare_coco_stuff,
    "pascal-context": prepare_pascal_context,
    "ade847": prepare_ade847,
}


def prepare(name: str, data_root, splits=None, overwrite: bool = False, workers: int = 1,
            progress: bool = True) -> PrepareReport:
    """Run the converter ``name`` (one of :data:`CONVERTERS`) on the raw files under ``data_root``."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; available: {', '.join(CONVERTERS)}")
    return CONVERTERS[name](data_root, splits=splits, overwrite=overwrite, workers=workers, progress=progress)
