"""Automatic class-agnostic masks: SAM / SAM 2 mask generation, cached on disk per image.

* :class:`MaskGenerator` runs the official packages' own generators (``segment_anything``'s
  ``SamAutomaticMaskGenerator``, ``sam2``'s ``SAM2AutomaticMaskGenerator``): a grid of point prompts decoded in
  batches of ``points_per_batch`` on the model's device, filtered by predicted IoU and stability, deduplicated by
  box NMS. Its defaults are CorrCLIP's (SAM 2 Hiera-L, 16x16 points, IoU and stability thresholds 0.4, one mask
  per point, fp16 autocast on a GPU).
* Masks are cached per image under ``$VOCABSEG_CACHE/masks`` (default ``~/.cache/vocabseg/masks``), keyed by the
  image's pixels, the generator's settings and a fingerprint of the model's weights, and written atomically: an
  evaluation pays for each image once, and any change of image, settings or weights computes anew.
* As region-mask sources (:mod:`vocabseg.models.region_masks`, e.g. CorrCLIP's ``--option masks=sam2``): ``sam`` /
  ``sam2`` and ``sam:WEIGHTS`` / ``sam2:WEIGHTS`` paint the masks into CorrCLIP's id map
  (:func:`~vocabseg.models.region_masks.paint_regions`: ascending area, as CorrCLIP does), fp16 on a GPU.

Layouts: images uint8 ``H,W,3`` RGB; masks bool ``N,H,W``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vocabseg.errors import UsageError
from vocabseg.io.cache import cache_dir
from vocabseg.io.outputs import atomic_write
from vocabseg.models.factory import load_model, resolve_device
from vocabseg.models.sam import DEFAULT_SAM2, Sam2Model, SamModel

log = logging.getLogger(__name__)

KINDS = ("sam", "sam2")


@dataclass(frozen=True)
class MaskSettings:
    """The automatic generator's settings (the packages' own arguments; defaults: CorrCLIP's)."""

    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.4
    stability_score_thresh: float = 0.4
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    multimask_output: bool = False  # SAM 2 only: SAM always decodes three masks per point


class MaskGenerator:
    """Automatic SAM / SAM 2 masks of whole images, cached on disk.

    ``kind``: ``"sam"`` or ``"sam2"``, the model kind of :mod:`vocabseg.models.factory`. ``weights``: a tag or file
    of :func:`vocabseg.models.sam.load_sam` / :func:`~vocabseg.models.sam.load_sam2` (``None``: the kind's default),
    loaded through the factory (shared), or a loaded :class:`~vocabseg.models.sam.SamModel` /
    :class:`~vocabseg.models.sam.Sam2Model`. ``cache``: a folder, ``None`` for the default one, or ``False`` for
    none. ``precision`` ``"fp16"``/``"bf16"`` autocasts on a GPU (CorrCLIP runs SAM 2 in fp16).
    """

    def __init__(self, kind: str = "sam2", weights=None, device: str | torch.device | None = "cpu",
                 settings: MaskSettings | None = None, cache: str | os.PathLike | bool | None = None,
                 precision: str = "fp32"):
        if kind not in KINDS:
            raise UsageError(f"unknown mask generator {kind!r}; available: {', '.join(KINDS)}")
        self.kind, self.weights = kind, weights
        self.device = weights.device if isinstance(weights, SamModel | Sam2Model) else resolve_device(device)
        self.settings = settings or MaskSettings()
        self.cache_dir = None if cache is False else Path(cache) if cache not in (None, True) else cache_dir("masks")
        self.precision = precision
        self._generator = None

    def model(self) -> SamModel | Sam2Model:
        """The SAM / SAM 2 the masks come from."""
        if isinstance(self.weights, SamModel | Sam2Model):
            return self.weights
        return load_model(self.kind, self.weights, self.device)

    def _network(self) -> torch.nn.Module:
        model = self.model()
        if isinstance(model, SamModel):
            model.require_decoder("automatic mask generation")
        return model.model

    def generator(self):
        """The package's automatic mask generator over the (shared) model."""
        if self._generator is None:
            options = {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "multimask_output"}
            if self.kind == "sam":
                from segment_anything import SamAutomaticMaskGenerator

                self._generator = SamAutomaticMaskGenerator(self._network(), **options)
            else:
                from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

                self._generator = SAM2AutomaticMaskGenerator(
                    self._network(), multimask_output=self.settings.multimask_output, **options)
        return self._generator

    def key(self, image: np.ndarray) -> str:
        """The cache key of an image: its pixels, the settings, the generator kind and the weights' content."""
        digest = hashlib.sha256()
        digest.update(str((image.shape, str(image.dtype))).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        digest.update(json.dumps({"kind": self.kind, "weights": self.model().fingerprint(),
                                  **dataclasses.asdict(self.settings)}, sort_keys=True).encode())
        return digest.hexdigest()[:32]

    def masks(self, image: np.ndarray) -> np.ndarray:
        """Bool masks ``N,H,W`` of a uint8 ``H,W,3`` image (from the cache when it holds them)."""
        image = np.ascontiguousarray(image)
        file = self.cache_dir / f"{self.key(image)}.npz" if self.cache_dir else None
        if file is not None and file.is_file():
            try:
                return _read_cached(file)
            except Exception as exc:  # a damaged cache entry is recomputed, never fatal
                log.warning("ignoring unreadable mask cache %s: %s", file, exc)
        masks = self.compute(image)
        if file is not None:
            _write_cached(file, masks)
        return masks

    @torch.inference_mode()
    def compute(self, image: np.ndarray) -> np.ndarray:
        """Run the generator (no cache): bool masks ``N,H,W`` in the package's order."""
        device = self.device
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda"):
            records = self.generator().generate(image)
        if not records:
            return np.zeros((0, *image.shape[:2]), dtype=bool)
        return np.stack([np.asarray(r["segmentation"], dtype=bool) for r in records])


def _write_cached(file: Path, masks: np.ndarray) -> None:
    with atomic_write(file) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, bits=np.packbits(masks.reshape(len(masks), -1), axis=1),
                            shape=np.asarray(masks.shape, dtype=np.int64))


def _read_cached(file: Path) -> np.ndarray:
    with np.load(file, allow_pickle=False) as data:
        shape = tuple(int(s) for s in data["shape"])
        bits = data["bits"]
    count = int(np.prod(shape[1:]))
    return np.unpackbits(bits, axis=1, count=count).astype(bool).reshape(shape)


#: The weights each automatic source uses when none is named: CorrCLIP's SAM 2, SAM's largest.
DEFAULT_WEIGHTS = {"sam": "vit_h", "sam2": DEFAULT_SAM2}


def automatic_source(kind: str):
    """A region-mask source factory: ``argument`` = weights (default :data:`DEFAULT_WEIGHTS`); masks generated on
    the image's device (fp16 on a GPU, as CorrCLIP), cached, painted into an id map."""
    from vocabseg.models.region_masks import paint_regions

    def factory(argument: str):
        generators: dict[str, MaskGenerator] = {}

        def source(image: torch.Tensor, image_id: str | None) -> torch.Tensor:
            device = str(image.device)
            if device not in generators:
                generators[device] = MaskGenerator(kind, argument or DEFAULT_WEIGHTS[kind], device, precision="fp16")
            masks = generators[device].masks(image.cpu().numpy())
            if not len(masks):
                return torch.zeros(image.shape[:2], dtype=torch.int64)
            return paint_regions(torch.from_numpy(masks))

        return source

    return factory


def _register() -> None:
    from vocabseg.models.region_masks import register_mask_generator

    for kind in KINDS:
        register_mask_generator(kind, automatic_source(kind))


_register()
