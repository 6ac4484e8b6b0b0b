"""Evaluate a :class:`~vocabseg.api.Segmenter` over a benchmark split: one confusion matrix, resumable, sharded.

* **Resumable.** Every ``save_every`` images (and on an exception or Ctrl-C) the confusion matrix and the ids of the
  finished images are written atomically to ``<out>/state/rank<r>-of<w>.npz``; ``resume=True`` skips those images
  and starts from that matrix. Integer counts add up in any order, so a resumed run gives exactly the matrix of an
  uninterrupted one. A state written with another method, protocol, class list or dataset is refused.
* **Sharded.** Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes every ``world_size``-th image (strided),
  the matrices are summed with ``all_reduce`` (gloo on CPU, nccl on GPU) and rank 0 writes the results.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vocabseg.data.datasets import Sample, SegDataset
from vocabseg.distributed import DistInfo, all_reduce
from vocabseg.errors import UsageError
from vocabseg.eval.metrics import ConfusionMatrix, Metrics
from vocabseg.io.outputs import atomic_write, write_json
from vocabseg.text.classes import ClassSpec

log = logging.getLogger(__name__)

#: The seconds counter behind every timing figure of a run (a test substitutes a fake one).
clock: Callable[[], float] = time.perf_counter

STATE_VERSION = 1


# --- distributed -------------------------------------------------------------------------------------------------

def _all_reduce(array: np.ndarray, dist_info: DistInfo, op: Literal["sum", "max"] = "sum") -> np.ndarray:
    """An int64 array summed (or maxed) over the ranks."""
    if not dist_info.is_distributed:
        return array
    import torch

    return all_reduce(torch.from_numpy(np.array(array, dtype=np.int64)), dist_info, op).numpy()


def shard(samples: list[Sample], rank: int, world_size: int) -> list[Sample]:
    """The strided share of ``rank``: samples ``rank, rank + world_size, ...``."""
    return samples[rank::world_size]


# --- results -------------------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """The outcome of one evaluation: the merged confusion matrix, its metrics and what produced them."""

    dataset: str
    split: str
    classes: tuple[str, ...]
    confusion: ConfusionMatrix
    metrics: Metrics
    images: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "images": self.images,
            "seconds": round(self.seconds, 2),
            "metrics": self.metrics.summary(),
            **self.info,
            "ignore_index": self.confusion.ignore_index,
            "per_class": self.metrics.per_class(),
        }

    def title(self) -> str:
        preset = self.info.get("preset")
        return (f"{self.info.get('method', '?')} on {self.dataset} ({self.split}, {self.images} images"
                + (f", preset {preset}" if preset else "") + ")")

    def summary_line(self) -> str:
        return ", ".join(f"{k} {_fmt(v)}" for k, v in self.metrics.summary().items())

    def table(self) -> str:
        """Per-class table and summary as plain text."""
        rows = self.metrics.per_class()
        width = max([len(r["class"]) for r in rows] + [5])
        split = bool(self.metrics.unseen)
        head = f"{'id':>4}  {'class':<{width}}  {'IoU':>6}  {'Acc':>6}" + ("  split" if split else "")
        lines = [self.title(), head, "-" * len(head)]
        for r in rows:
            line = f"{r['id']:>4}  {r['class']:<{width}}  {_fmt(r['IoU']):>6}  {_fmt(r['Acc']):>6}"
            lines.append(line + (f"  {r['split']}" if split else ""))
        lines.append("-" * len(head))
        lines.append(self.summary_line())
        return "\n".join(lines)

    def markdown(self) -> str:
        summary = self.metrics.summary()
        lines = [f"# {self.title()}", "", "| " + " | ".join(summary) + " |",
                 "|" + "---:|" * len(summary), "| " + " | ".join(_fmt(v) for v in summary.values()) + " |", ""]
        protocol = self.info.get("protocol")
        if protocol:
            knobs = ", ".join(f"{k}={v}" for k, v in protocol.items())
            lines += [f"Protocol: {knobs}", ""]
        split = bool(self.metrics.unseen)
        lines += ["| id | class | IoU | Acc | GT pixels | predicted pixels |" + (" split |" if split else ""),
                  "|---:|---|---:|---:|---:|---:|" + ("---|" if split else "")]
        for r in self.metrics.per_class():
            lines.append(f"| {r['id']} | {r['class']} | {_fmt(r['IoU'])} | {_fmt(r['Acc'])} | {r['gt_pixels']} | "
                         f"{r['pred_pixels']} |" + (f" {r['split']} |" if split else ""))
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """``results.json``, ``results.md`` and ``confusion.npy`` (rows: ground truth; columns: prediction, the
        last one counting pixels predicted as no class)."""
        out = Path(out_dir)
        paths = {"json": out / "results.json", "markdown": out / "results.md", "confusion": out / "confusion.npy"}
        write_json(paths["json"], self.to_json())
        with atomic_write(paths["markdown"]) as tmp:
            tmp.write_text(self.markdown(), encoding="utf-8")
        with atomic_write(paths["confusion"]) as tmp, open(tmp, "wb") as handle:
            np.save(handle, self.confusion.counts)
        return paths


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- state -------------------------------------------------------------------------------------------------------

def _fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_path(out_dir: str | os.PathLike, dist_info: DistInfo) -> Path:
    return Path(out_dir) / "state" / f"rank{dist_info.rank}-of{dist_info.world_size}.npz"


def save_state(path: Path, counts: np.ndarray, done: list[str], fingerprint: str, config: dict) -> None:
    """Write the state atomically: a crash while writing leaves the previous state in place."""
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, counts=counts, done=np.array(done, dtype=str), fingerprint=np.array(fingerprint),
                 config=np.array(json.dumps(config, default=str)), version=np.array(STATE_VERSION))
        handle.flush()
        os.fsync(handle.fileno())


def load_state(path: Path, config: dict, shape: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """The saved confusion counts and finished image ids; refused, naming every setting that differs, when the
    state belongs to another evaluation."""
    with np.load(path, allow_pickle=False) as data:
        if str(data["fingerprint"]) != _fingerprint(config):
            changed = differences(json.loads(str(data["config"])), json.loads(json.dumps(config, default=str)))
            raise UsageError(f"the saved state {path} belongs to another evaluation ({'; '.join(changed)}); run "
                             "without --resume to start over, or use another --out folder")
        counts = data["counts"].astype(np.int64)
        done = [str(x) for x in data["done"].tolist()]
    if counts.shape != shape:
        raise UsageError(f"the saved state {path} has a confusion matrix of shape {counts.shape}, expected {shape}")
    return counts, done


def differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """``key: saved -> now`` for every leaf setting that differs between two run descriptions."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current)):
            found += differences(saved.get(key), current.get(key), f"{where}.{key}" if where else key)
        return found
    if saved == current:
        return []
    shown = [json.dumps(v) if len(json.dumps(v)) <= 60 else json.dumps(v)[:57] + "..." for v in (saved, current)]
    return [f"{where or 'setting'}: {shown[0]} -> {shown[1]}"]


def save_prediction(path: Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """A palette PNG of the predicted ids (16-bit grey PNG when there are more than 255 classes)."""
    from PIL import Image

    from vocabseg.io import outputs

    if len(palette) <= 255 and labels.max(initial=0) <= 255:
        outputs.save_image(path, outputs.label_image(labels, palette))
    else:
        outputs.save_image(path, Image.fromarray(labels.astype(np.uint16)))


class _SampleReader:
    """Map-style dataset of (index, image, label) for a DataLoader's worker processes."""

    def __init__(self, dataset: SegDataset, samples: list[Sample]):
        self.dataset, self.samples = dataset, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        return index, self.dataset.read_image(sample), self.dataset.read_label(sample)


def _as_tensors(item):
    """In a worker: arrays as tensors, which reach the main process through shared memory instead of a pipe."""
    import torch

    index, image, label = item
    return index, torch.from_numpy(image), torch.from_numpy(label)


def _read_samples(dataset: SegDataset, samples: list[Sample], workers: int):
    """Yield ``(sample, image, label)`` in order, decoded by ``workers`` background processes when > 0."""
    reader = _SampleReader(dataset, samples)
    if workers <= 0:
        for index in range(len(reader)):
            _, image, label = reader[index]
            yield samples[index], image, label
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(reader, batch_size=None, num_workers=workers, collate_fn=_as_tensors, prefetch_factor=4)
    for index, image, label in loader:
        yield samples[index], image.numpy(), label.numpy()


def _batches(items, size: int, waits: list[float]):
    """Groups of ``size`` items; the seconds spent waiting for each group (decoding, or workers that fall behind
    the model) are appended to ``waits``."""
    iterator = iter(items)
    while True:
        start = clock()
        batch = list(itertools.islice(iterator, size))
        waits.append(clock() - start)
        if not batch:
            return
        yield batch


def dataset_class_spec(dataset: SegDataset, segmenter, names: str | None = None) -> ClassSpec:
    """The benchmark's classes with the query names of list ``names`` (a list id or its source); by default the
    preset's list when the preset is for this benchmark, else the benchmark's default list."""
    preset = segmenter.preset
    if names is None and preset is not None and preset.dataset == dataset.key:
        names = preset.names
    return ClassSpec(labels=dataset.classes, names=dataset.query_names(names), has_background=dataset.has_background)


def evaluate(
    segmenter,
    dataset: SegDataset,
    *,
    out_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    save_preds: str | os.PathLike | None = None,
    resume: bool = False,
    save_every: int = 20,
    names: str | None = None,
    progress: bool = True,
    callback: Callable[[int, Sample], None] | None = None,
    dist_info: DistInfo | None = None,
    batch_images: int = 1,
    workers: int = 0,
) -> EvalResult:
    """Evaluate ``segmenter`` on ``dataset`` and return the merged result (on every rank).

    ``out_dir`` holds the resumable state (and, written by the caller, the results); without it nothing is saved
    and ``resume`` is unavailable. ``limit`` evaluates the first N images of the split. ``callback(done, sample)``
    runs after each finished image (tests use it to simulate a crash). ``names`` picks the query-name list
    (default: the segmenter's preset's style, else ``"sclip"``). ``batch_images`` images are segmented together
    (their windows share forward passes); ``workers`` background processes decode images and labels ahead.
    """

    dist_info = dist_info or DistInfo()
    spec = dataset_class_spec(dataset, segmenter, names)
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be positive, got {limit}")
    samples = dataset.samples[:limit] if limit is not None else dataset.samples
    dataset.require_complete(samples)
    mine = shard(samples, dist_info.rank, dist_info.world_size)
    config = {**segmenter.describe(spec), "dataset": dataset.key, "split": dataset.split,
              "world_size": dist_info.world_size, "rank": dist_info.rank}
    run = _Run(ConfusionMatrix(dataset.num_classes, dataset.ignore_index), config,
               state_path(out_dir, dist_info) if out_dir is not None else None, save_every)
    run.restore(resume, {s.id for s in mine})
    todo = [s for s in mine if s.id not in run.resumed]
    if dataset.num_classes > 255 and not spec.has_background and segmenter.protocol.prob_thd > 0:
        log.warning("prob_thd > 0 with %d classes: pixels below it are labelled 255, which is a class here",
                    dataset.num_classes)
    bar = _progress_bar(len(mine), len(mine) - len(todo), dataset.key, progress and dist_info.is_main)
    start = clock()
    waits: list[float] = []  # seconds spent waiting for each batch of decoded images
    palette = dataset.palette()
    try:
        for batch in _batches(_read_samples(dataset, todo, workers), max(batch_images, 1), waits):
            results = segmenter.segment_batch([image for _, image, _ in batch], spec, maps=False,
                                              image_ids=[Path(sample.image).stem for sample, _, _ in batch])
            for (sample, _, gt), result in zip(batch, results, strict=True):
                if save_preds is not None:
                    save_prediction(Path(save_preds) / f"{sample.id}.png", result.labels, palette)
                run.add(sample, result.labels, gt)
                bar.update(1)
                if callback is not None:
                    callback(len(run.done), sample)
    except BaseException:
        run.interrupted()
        raise
    finally:
        bar.close()
    run.checkpoint()
    return _result(run, dataset, dist_info, clock() - start, waits)


def _progress_bar(total: int, done: int, key: str, shown: bool):
    """A tqdm bar over the images (a disabled one when not ``shown``: other ranks, ``progress=False``)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=f"eval {key}", unit="img", disable=None if shown else True,
                dynamic_ncols=True)


class _Run:
    """The state of one rank's evaluation: the confusion matrix, the finished images, and their saved copy."""

    def __init__(self, confusion: ConfusionMatrix, config: dict, path: Path | None, save_every: int):
        self.confusion, self.config, self.path, self.save_every = confusion, config, path, save_every
        self.fingerprint = _fingerprint(config)
        self.done: list[str] = []
        self.resumed: set[str] = set()
        self.unsaved = 0

    def restore(self, resume: bool, selection: set[str]) -> None:
        """Continue from the saved state (``resume``) or warn that it will be replaced."""
        path = self.path
        if not resume:
            if path is not None and path.is_file():
                log.warning("starting over; the earlier run's state in %s is replaced (pass --resume to continue it)",
                            path.parent)
            return
        if path is None:
            raise UsageError("resuming needs the output folder of the interrupted run (--out)")
        if path.is_file():
            self.confusion.counts[...], self.done = load_state(path, self.config, self.confusion.counts.shape)
            log.info("resuming: %d image(s) already evaluated on this rank", len(self.done))
        else:
            others = sorted(p.name for p in path.parent.glob("rank*-of*.npz")) if path.parent.is_dir() else []
            if others:
                raise UsageError(f"the saved state in {path.parent} ({', '.join(others)}) was written by a run with "
                                 f"another number of processes; resume with the same number as before")
            log.warning("no saved state at %s: starting from the beginning", path)
        self.resumed = set(self.done)
        extra = self.resumed - selection
        if extra:
            raise UsageError(f"the saved state in {path.parent} counts {len(extra)} image(s) outside this selection "
                             f"(e.g. {sorted(extra)[0]}); resume with the same or a larger --limit, or start over")

    def add(self, sample: Sample, labels: np.ndarray, gt: np.ndarray) -> None:
        if labels.shape != gt.shape:
            raise UsageError(f"{sample.id}: the prediction is {labels.shape} but the label {sample.label} is "
                             f"{gt.shape}; image and label sizes differ")
        self.confusion.update(labels, gt)
        self.done.append(sample.id)
        self.unsaved += 1
        if self.unsaved >= self.save_every:
            self.checkpoint()

    def checkpoint(self) -> None:
        if self.path is not None:
            save_state(self.path, self.confusion.counts, self.done, self.fingerprint, self.config)
        self.unsaved = 0

    def interrupted(self) -> None:
        if self.unsaved:
            self.checkpoint()
            log.warning("interrupted after %d image(s) on this rank; state saved, continue with --resume",
                        len(self.done))


def _result(run: _Run, dataset: SegDataset, dist_info: DistInfo, seconds: float, waits: list[float]) -> EvalResult:
    """The merged result of every rank, with the run's timing figures."""
    # this rank's wait for the first batch (start-up: worker processes, first decode), and the share of the time
    # after it spent waiting for images (near 0 when decoding keeps up with the model)
    startup = waits[0] if waits else 0.0
    steady = seconds - startup
    wait_fraction = round(sum(waits[1:]) / steady, 4) if len(waits) > 2 and steady > 0 else None
    counts = _all_reduce(run.confusion.counts, dist_info)
    processed = len(run.done) - len(run.resumed)  # images run in this session (not resumed)
    totals = _all_reduce(np.array([len(run.done), processed], dtype=np.int64), dist_info)
    milliseconds = _all_reduce(np.array([int(seconds * 1000)], dtype=np.int64), dist_info, op="max")
    seconds = float(milliseconds[0]) / 1000  # the slowest rank's time
    merged = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, counts)
    metrics = merged.compute(dataset.classes, dataset.unseen)
    config = run.config
    info = {key: config[key] for key in ("method", "method_options", "preset", "protocol", "models", "names",
                                         "world_size")}
    info.update({"data_root": str(dataset.data_root), "classes": list(dataset.classes),
                 "seconds_per_image": round(seconds * dist_info.world_size / max(int(totals[1]), 1), 4),
                 "data_wait_fraction": wait_fraction, "startup_seconds": round(startup, 3),
                 "date": _dt.datetime.now().isoformat(timespec="seconds"), "vocabseg_version": _version()})
    if dataset.unseen:
        info["unseen_classes"] = list(dataset.unseen)
    return EvalResult(dataset.key, dataset.split, dataset.classes, merged, metrics, int(totals[0]), seconds, info)


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vocabseg")
    except PackageNotFoundError:  # running from a source tree
        return None
