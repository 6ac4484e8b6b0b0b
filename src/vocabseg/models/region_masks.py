"""Class-agnostic region masks: where methods such as CorrCLIP get them, as one id map per image.

A *region-mask source* is a callable ``(image, image_id) -> ids``: ``image`` is the uint8 ``H,W,3`` RGB tensor,
``image_id`` names it (its file stem, or ``None``), and ``ids`` is an int64 ``H,W`` map at the image size where
``0`` marks unsegmented pixels and every other value one region (CorrCLIP's ``instance_mask`` format).

:func:`mask_source` turns a user's string into a source:

* a folder: CorrCLIP's pre-generated files, ``<folder>/<image_id>.npz`` holding ``instance_mask`` (as the
  ``region_masks`` archives the CorrCLIP authors publish);
* one ``.npz`` file in that format (for a single image);
* ``NAME`` or ``NAME:ARGUMENT``: a generator registered with :func:`register_mask_generator`. ``slic`` is built in:
  SLIC superpixels (scikit-image, ``slic:N`` for N segments, default 64) with no unsegmented pixels: a cheap CPU
  stand-in, not what the published results use. ``sam`` and ``sam2`` (``sam2:WEIGHTS``) are SAM / SAM 2 automatic
  masks (:mod:`vocabseg.models.masks`, cached on disk per image).

Generators that produce overlapping binary masks paint them into an id map with :func:`paint_regions`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vocabseg.errors import UsageError

RegionMaskSource = Callable[[torch.Tensor, "str | None"], torch.Tensor]

_GENERATORS: dict[str, Callable[[str], RegionMaskSource]] = {}


def register_mask_generator(name: str, factory: Callable[[str], RegionMaskSource]) -> None:
    """Make ``NAME[:ARGUMENT]`` a mask source: ``factory(ARGUMENT)`` (``""`` when none is given) builds it."""
    _GENERATORS[name] = factory


def mask_generators() -> tuple[str, ...]:
    return tuple(sorted(_GENERATORS))


def read_instance_mask(path: str | os.PathLike) -> torch.Tensor:
    """CorrCLIP's pre-generated mask file: ``np.load(path)['instance_mask']`` as an int64 ``H,W`` tensor."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "instance_mask" not in data:
                raise UsageError(f"{path} has no 'instance_mask' array (CorrCLIP's region-mask format)")
            ids = data["instance_mask"]
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read region masks {path}: {exc}") from exc
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"{path}: instance_mask must be an integer H x W map (got {ids.dtype} {ids.shape})")
    return torch.from_numpy(ids.astype(np.int64))


def _checked(ids: torch.Tensor, image: torch.Tensor, where: str) -> torch.Tensor:
    if tuple(ids.shape) != tuple(image.shape[:2]):
        raise UsageError(f"region masks {where} are {tuple(ids.shape)}, the image is {tuple(image.shape[:2])}")
    return ids


class MaskFolder:
    """Pre-generated masks ``<folder>/<image_id>.npz`` (CorrCLIP's format)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def __call__(self, image: torch.Tensor, image_id: str | None) -> torch.Tensor:
        if not image_id:
            raise UsageError(f"region masks come from the folder {self.folder}, which needs the image's name: pass "
                             "the image as a file path, or image_id= (the mask file's stem)")
        path = self.folder / f"{image_id}.npz"
        if not path.is_file():
            raise UsageError(f"no region masks for image {image_id!r}: {path} does not exist")
        return _checked(read_instance_mask(path), image, str(path))


class MaskFile:
    """One pre-generated mask file, used for every image (sizes must match)."""

    def __init__(self, path: str | os.PathLike):
        self.ids = read_instance_mask(path)
        self.path = str(path)

    def __call__(self, image: torch.Tensor, image_id: str | None) -> torch.Tensor:
        return _checked(self.ids, image, self.path)


def slic_regions(argument: str = "") -> RegionMaskSource:
    """SLIC superpixels (``n_segments`` = ``argument`` or 64, compactness 10, ids from 1: nothing unsegmented)."""
    n_segments = int(argument) if argument else 64

    def source(image: torch.Tensor, image_id: str | None) -> torch.Tensor:
        from skimage.segmentation import slic

        ids = slic(image.cpu().numpy(), n_segments=n_segments, compactness=10, start_label=1)
        return torch.from_numpy(ids.astype(np.int64))

    return source


register_mask_generator("slic", slic_regions)


def paint_regions(masks: torch.Tensor) -> torch.Tensor:
    """Binary masks ``N,H,W`` -> id map ``H,W``: painted in ascending area order (larger masks overwrite smaller
    ones where they overlap, as CorrCLIP paints SAM's masks), ids ``1..N`` in that order, 0 where none covers."""
    ids = torch.zeros(masks.shape[-2:], dtype=torch.int64, device=masks.device)
    areas = masks.flatten(1).sum(1)
    for rank, index in enumerate(torch.argsort(areas, stable=True).tolist(), start=1):
        ids[masks[index].bool()] = rank
    return ids


def mask_source(spec: str) -> RegionMaskSource:
    """The region-mask source a user names (see the module docstring)."""
    spec = str(spec).strip()
    if not spec:
        raise UsageError("region masks are needed: give a folder of pre-generated .npz masks (CorrCLIP's format, "
                         f"one per image stem), one .npz file, or a generator ({', '.join(mask_generators())})")
    name, _, argument = spec.partition(":")
    if name in _GENERATORS:
        return _GENERATORS[name](argument)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return MaskFolder(path)
    if path.is_file():
        return MaskFile(path)
    raise UsageError(f"unknown region-mask source {spec!r}: not a folder, not a file, and not a generator "
                     f"({', '.join(mask_generators())})")


from vocabseg.models import masks as _automatic_masks  # noqa: E402, F401  (registers the sam and sam2 sources)
