"""Proposal sources for MAFT: soft masks ``N,H,W`` at image size, optionally with generator class scores.

Inference sources (:func:`generate_proposals`, all images of a batch at once): ``file`` (instance PNG or NPZ),
``kmeans`` (k-means on dense CLIP features), ``slic`` (SLIC superpixels), ``cliptrase`` (the CLIPtrase method's
clusters), ``sam`` and ``sam2`` (automatic masks, :mod:`vocabseg.models.masks`, cached per image). The sources that
run CLIP (``kmeans``, ``cliptrase``) run on the method's CLIP under the protocol's precision, images of one size in
one forward pass. Training: :func:`perturb_gt` (spec A.11.2 (d)).
"""

from __future__ import annotations

import functools
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods import registry
from vocabseg.models.encoder import Models
from vocabseg.pipeline import windows

ProposalSource = Literal["kmeans", "slic", "file", "cliptrase", "sam", "sam2"]
SOURCES: tuple[str, ...] = typing.get_args(ProposalSource)


@dataclass
class Proposals:
    """Soft masks ``N,H,W`` in ``[0, 1]``; ``scores`` ``N,C``: the generator's own class probabilities (or None).

    ``padded`` ``N,Hp,Wp``: the masks on the input padded at the bottom and right (image at the top left), when the
    source has values there (a Mask2Former generator predicts masks over the padded input); else None.
    """

    masks: torch.Tensor
    scores: torch.Tensor | None = None
    source: str = ""
    padded: torch.Tensor | None = None


def masks_from_logits(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask2Former mask logits ``N,h,w`` -> soft masks ``N,H,W``: bilinear resize with ``align_corners=True`` to
    ``size``, then sigmoid (MAFT's ``mask_results``)."""
    upsampled = F.interpolate(mask_logits[None].float(), size=tuple(size), mode="bilinear", align_corners=True)[0]
    return upsampled.sigmoid()


def generator_probs(class_logits: torch.Tensor) -> torch.Tensor:
    """Mask2Former class logits ``N,C+1`` (void last) -> ``A^p`` ``N,C``: softmax over all ``C+1``, void dropped
    (the rows are not renormalised)."""
    return class_logits.float().softmax(-1)[:, :-1]


def _stack(masks: list[np.ndarray], height: int, width: int) -> torch.Tensor:
    if not masks:
        return torch.zeros(0, height, width)
    return torch.from_numpy(np.stack(masks).astype(np.float32))


def _resize_masks(masks: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    if masks.shape[0] == 0:
        return masks.new_zeros(0, *size)
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(masks[None].float(), size=size, mode=mode, **kwargs)[0]


def _dedupe(masks: list[np.ndarray], limit: int) -> list[np.ndarray]:
    """Drop repeated masks, keep the largest ``limit``."""
    seen, kept = set(), []
    for m in sorted(masks, key=lambda m: -int(m.sum())):
        key = np.packbits(m).tobytes()
        if m.any() and key not in seen:
            seen.add(key)
            kept.append(m)
    return kept[:limit]


# --- training: perturbed ground truth ----------------------------------------------------------------------------

def perturb_gt(labels: np.ndarray, rng: np.random.Generator, ignore: int = 255, max_proposals: int = 32
               ) -> np.ndarray:
    """Boolean proposals ``N,H,W`` from a label map: each class mask as is, dilated, eroded, merged with another
    class, cut by a random line, plus random boxes, so proposals' IoUs with the ground truth spread out."""
    from scipy import ndimage

    height, width = labels.shape
    classes = [c for c in np.unique(labels) if c != ignore]
    gts = [labels == c for c in classes]
    out = []
    for i, g in enumerate(gts):
        out.append(g)
        radius = int(rng.integers(2, max(3, min(height, width) // 16) + 1))
        out.append(ndimage.distance_transform_edt(~g) <= radius)
        eroded = ndimage.distance_transform_edt(g) > radius
        if eroded.any():
            out.append(eroded)
        if len(gts) > 1:
            j = int(rng.choice([k for k in range(len(gts)) if k != i]))
            out.append(g | gts[j])
        ys, xs = np.nonzero(g)
        if rng.random() < 0.5:
            cut = np.arange(height)[:, None] < rng.integers(ys.min(), ys.max() + 1)
        else:
            cut = np.arange(width)[None, :] < rng.integers(xs.min(), xs.max() + 1)
        out.append(g & cut)
    for _ in range(max(1, len(gts) // 2)):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        y1, x1 = rng.integers(y0 + 1, height + 1), rng.integers(x0 + 1, width + 1)
        box = np.zeros((height, width), dtype=bool)
        box[y0:y1, x0:x1] = True
        out.append(box)
    kept = _dedupe(out, max_proposals)
    return np.stack(kept) if kept else np.zeros((0, height, width), dtype=bool)


# --- inference sources -------------------------------------------------------------------------------------------

def read_proposal_file(path: str | os.PathLike, size: tuple[int, int] | None = None,
                       canvas: tuple[int, int] | None = None) -> Proposals:
    """Proposals from a file, resized to ``size`` when given.

    * NPZ with ``masks`` ``N,H,W`` (bool or [0, 1]) and optional ``scores`` ``N,C`` (class probabilities);
    * NPZ with a Mask2Former generator's raw outputs (e.g. FreeSeg's, which MAFT classifies): ``mask_logits``
      ``N,h,w`` (``pred_masks``, over the input padded to ``canvas``, usually at a quarter of its resolution) and
      optional ``class_logits`` ``N,C+1`` (``pred_logits``, void last). As in MAFT, the masks are the sigmoid of the
      logits resized (``align_corners=True``) to ``canvas`` (default ``size``), cropped to ``size``; the scores
      are :func:`generator_probs`. ``size`` is then required;
    * a CorrCLIP mask file: NPZ with ``instance_mask`` ``H,W`` (0 = no region, every other value one proposal);
    * a PNG of instance ids (0 = no proposal, every other value one proposal).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"proposal file not found: {path}")
    scores = None
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: torch.from_numpy(data[k].astype(np.float32)) for k in data.files if k != "instance_mask"}
            is_instance_map = "instance_mask" in data.files
        if is_instance_map:  # CorrCLIP's pre-generated region masks
            from vocabseg.models.region_masks import read_instance_mask

            ids = read_instance_mask(path).numpy()
            masks = _stack([ids == v for v in np.unique(ids) if v != 0], *ids.shape)
        elif "mask_logits" in arrays and "masks" not in arrays:
            return _generator_outputs(path, arrays, size, canvas)
        elif "masks" not in arrays:
            raise UsageError(f"{path} has no 'masks' array (expected masks N,H,W and optional scores N,C, "
                             "mask_logits N,h,w and optional class_logits N,C+1, or CorrCLIP's instance_mask H,W)")
        else:
            masks, scores = arrays["masks"], arrays.get("scores")
        if masks.dim() != 3 or (scores is not None and scores.shape[0] != masks.shape[0]):
            raise UsageError(f"{path}: masks must be N,H,W and scores N,C with the same N")
        mode = "bilinear"
    else:
        from PIL import Image

        ids = np.asarray(Image.open(path))
        if ids.ndim != 2:
            raise UsageError(f"{path}: an instance PNG must be single-channel (one id per pixel)")
        masks = _stack([ids == v for v in np.unique(ids) if v != 0], *ids.shape)
        mode = "nearest"
    if size is not None:
        masks = _resize_masks(masks, size, mode)
    return Proposals(masks.clamp(0, 1), scores, "file")


def _generator_outputs(path: Path, arrays: dict[str, torch.Tensor], size: tuple[int, int] | None,
                       canvas: tuple[int, int] | None) -> Proposals:
    logits, class_logits = arrays["mask_logits"], arrays.get("class_logits")
    if logits.dim() != 3 or (class_logits is not None and class_logits.shape[0] != logits.shape[0]):
        raise UsageError(f"{path}: mask_logits must be N,h,w and class_logits N,C+1 with the same N")
    if size is None:
        raise UsageError(f"{path}: mask logits need the image size to be placed on")
    canvas = tuple(canvas or size)
    if canvas[0] < size[0] or canvas[1] < size[1]:
        raise UsageError(f"{path}: the padded input {canvas} is smaller than the image {tuple(size)}")
    padded = masks_from_logits(logits, canvas)
    scores = None if class_logits is None else generator_probs(class_logits)
    return Proposals(padded[:, : size[0], : size[1]], scores, "file", padded)


def kmeans(features: torch.Tensor, k: int, iterations: int = 30) -> torch.Tensor:
    """Lloyd's k-means of ``N,D`` features from farthest-point seeds (deterministic); returns assignments ``N``."""

    def nearest(centres: torch.Tensor) -> torch.Tensor:  # argmin of squared distance, without the |x|^2 term
        return (features @ centres.T - 0.5 * (centres * centres).sum(1)).argmax(1)

    squared = (features * features).sum(1)
    seeds = [int(((features - features.mean(0)) ** 2).sum(1).argmax())]
    for _ in range(k - 1):
        distance = squared[:, None] - 2 * features @ features[seeds].T + squared[seeds][None]
        seeds.append(int(distance.amin(1).argmax()))
    centres = features[seeds]
    assignment = nearest(centres)
    for _ in range(iterations):
        onehot = F.one_hot(assignment, k).to(features.dtype)
        counts = onehot.sum(0)[:, None]
        centres = torch.where(counts > 0, onehot.T @ features / counts.clamp_min(1), centres)
        updated = nearest(centres)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return assignment


def group_by_size(images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``images`` grouped by their height and width (first appearance order)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    return list(groups.values())


def kmeans_proposals(models: Models, images: Sequence[torch.Tensor], ks=(2, 3, 4, 5, 6, 7, 8),
                     feature_method: str = "sclip", short_side: int = 336, min_cells: int = 2,
                     max_proposals: int = 64, precision: str = "fp32") -> list[Proposals]:
    """k-means of dense CLIP patch features for each k, split into connected components (spec A.11.2 (b)).

    The features are ``feature_method``'s patch features of each uint8 ``H,W,3`` image resized to ``short_side``
    (one whole-image pass; inputs of one size share it)."""
    from vocabseg.pipeline.preprocess import preprocess

    method = registry.create(feature_method)
    encoder = models.clip.image
    inputs = [preprocess(image, short_side, normalization=method.normalization(models)) for image in images]
    features: list[tuple[torch.Tensor, tuple[int, int]] | None] = [None] * len(images)
    for group in group_by_size(inputs):
        with windows.autocast(precision, encoder.device):
            batch, grid = method.patch_features(encoder, torch.cat([inputs[i] for i in group]))
        for row, index in enumerate(group):
            features[index] = (batch[row].detach().float().cpu(), grid)
    return [_kmeans_masks(*features[i], tuple(image.shape[:2]), ks, min_cells, max_proposals)
            for i, image in enumerate(images)]


def _kmeans_masks(features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], ks, min_cells: int,
                  max_proposals: int) -> Proposals:
    """Connected components of the k-means clusters of one image's patch features ``N,E`` on ``grid``, resized to
    ``size``."""
    from scipy import ndimage

    out = []
    for k in ks:
        if k > len(features):
            break
        assignment = kmeans(features, k).reshape(grid).numpy()
        for cluster in range(k):
            components, count = ndimage.label(assignment == cluster)
            out.extend(components == c for c in range(1, count + 1) if (components == c).sum() >= min_cells)
    masks = _stack(_dedupe(out, max_proposals), *grid)
    return Proposals(_resize_masks(masks, size), None, "kmeans")


def slic_proposals(image: torch.Tensor, n_segments=(8, 16, 32), compactness: float = 10.0) -> Proposals:
    """SLIC superpixels (scikit-image) at several scales; every superpixel is a proposal."""
    from skimage.segmentation import slic

    array = image.cpu().numpy()
    out = []
    for n in n_segments:
        segments = slic(array, n_segments=n, compactness=compactness, start_label=0)
        out.extend(segments == s for s in np.unique(segments))
    return Proposals(_stack(_dedupe(out, 10_000), *array.shape[:2]), None, "slic")


def cliptrase_proposals(models: Models, images: Sequence[torch.Tensor], classifier, precision: str = "fp32"
                        ) -> list[Proposals]:
    """The clusters of the ``cliptrase`` method under its own protocol (``K,H,W`` masks of each image; images of
    one size share a forward pass), at ``precision``."""
    method = registry.create("cliptrase")
    protocol = method.default_protocol.replace(precision=precision)
    prepared = [method.prepare(models, image, protocol) for image in images]
    out = []
    for image, dense in zip(images, method.dense(models, prepared, classifier, protocol), strict=True):
        if dense.masks is None:
            raise UsageError("the cliptrase method returned no cluster masks (its clustering is off)")
        masks = dense.masks.float().cpu()
        out.append(Proposals(_resize_masks(masks, tuple(image.shape[:2]), "nearest"), None, "cliptrase"))
    return out


@functools.lru_cache(maxsize=4)
def mask_generator(kind: str, weights: str, device: str):
    """One automatic mask generator per kind, weights and device (its model and weight fingerprint load once)."""
    from vocabseg.models.masks import MaskGenerator

    return MaskGenerator(kind, weights, device)


def sam_proposals(image: torch.Tensor, weights: str, kind: str = "sam") -> Proposals:
    """SAM / SAM 2 automatic masks (:class:`vocabseg.models.masks.MaskGenerator`, on the image's device, cached on
    disk per image)."""
    if not weights:
        raise UsageError(f"{kind} proposals need SAM weights: --option sam_weights=TAG_OR_PATH (e.g. vit_h, a "
                         "segment-anything or transformers SAM checkpoint, or facebook/sam2-hiera-large for sam2)")
    masks = mask_generator(kind, weights, str(image.device)).masks(image.cpu().numpy())
    return Proposals(torch.from_numpy(masks.astype(np.float32)), None, kind)


@torch.inference_mode()
def generate_proposals(source: str, models: Models, images: Sequence[torch.Tensor], classifier=None,
                       file: str = "", sam_weights: str = "",
                       canvases: Sequence[tuple[int, int]] | None = None, precision: str = "fp32"
                       ) -> list[Proposals]:
    """Proposals of each uint8 ``H,W,3`` image from one of :data:`SOURCES`; ``canvases``: the padded input sizes
    that generator mask logits in a ``file`` refer to; ``precision``: the autocast of the sources that run CLIP."""
    if source == "kmeans":
        return kmeans_proposals(models, images, precision=precision)
    if source == "cliptrase":
        return cliptrase_proposals(models, images, classifier, precision)
    if source == "slic":
        return [slic_proposals(image) for image in images]
    if source == "file":
        if not file:
            raise UsageError("the 'file' proposal source needs --option proposal_file=PATH (.npz or instance .png)")
        canvases = canvases or [None] * len(images)
        return [read_proposal_file(file, tuple(image.shape[:2]), canvas)
                for image, canvas in zip(images, canvases, strict=True)]
    if source in ("sam", "sam2"):
        return [sam_proposals(image, sam_weights, source) for image in images]
    raise UsageError(f"unknown proposal source {source!r}; available: {', '.join(SOURCES)}")
