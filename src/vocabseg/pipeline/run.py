"""The one pipeline every method runs through, and the typed values that flow along it.

``run`` takes a batch of decoded images through four stages, each a hook of the method (a
:class:`~vocabseg.pipeline.run.Recipe`):

1. ``prepare`` (one image): resize and normalise into a model input (:class:`Prepared`);
2. ``dense`` (all images at once, so that their windows or whole-image passes share forward passes): per-query
   logits, or class scores the method computes itself, and class-agnostic masks (:class:`Dense`);
3. the common tail (:func:`finish`): upsampling to the output size, ``scores_and_labels`` (PAMR, softmax over names,
   maximum per class, thresholds by default), ``refine_labels`` (closing, cluster or region votes);
4. pasting a result computed on a region of the image (a centre crop) back into the original frame.

The result of each image is a :class:`DenseResult`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

import torch
import torch.nn.functional as F

from vocabseg.pipeline import postprocess, timing
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.windows import upsample, upsample_rows
from vocabseg.text.classifier import TextClassifier


@dataclass
class Prepared:
    """One image ready for the models.

    ``image``: the decoded uint8 ``H,W,3``; ``input``: the normalised ``1,3,h,w``. The label map is computed at
    ``output_size`` (default: the original size); ``region`` ``(y1, y2, x1, x2)`` places that output in the original
    image when it covers only part of it (a centre crop). ``extras`` holds what the method prepared for itself.
    """

    image: torch.Tensor
    input: torch.Tensor
    image_id: str | None = None
    output_size: tuple[int, int] | None = None
    region: tuple[int, int, int, int] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """Where the label map is computed."""
        return self.output_size or (int(self.image.shape[0]), int(self.image.shape[1]))


@dataclass
class Dense:
    """What the models made of one image.

    ``logits`` ``Q,h,w``: per-query logits at any resolution (upsampled bilinearly to the output size). ``scores``
    ``C,H,W`` at the output size when the method computes class scores itself (then no softmax is applied).
    ``masks`` ``K,H,W`` (bool, output size): class-agnostic regions, reported with the result. ``extras``: the
    method's own per-image values for its later hooks.
    """

    logits: torch.Tensor
    scores: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class DenseResult:
    """The result for one image, at the original size: ``labels`` ``H,W`` (255: no confident class without a
    background), class-agnostic ``masks`` ``K,H,W`` when the method has any, ``meta`` (e.g. the crop box), and on
    request the full-resolution maps: per-query ``logits`` ``Q,H,W`` (raw, before PAMR and softmax) and class
    ``scores`` ``C,H,W``. The maps are computed when first read, so a caller that needs labels only never holds
    ``(Q + C) x H x W`` floats."""

    def __init__(self, labels: torch.Tensor, maps: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                 masks: torch.Tensor | None = None, meta: dict[str, Any] | None = None):
        self.labels = labels
        self.masks = masks
        self.meta = meta or {}
        self._maps = maps

    @functools.cached_property
    def _computed_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._maps()

    @property
    def logits(self) -> torch.Tensor:
        return self._computed_maps[0]

    @property
    def scores(self) -> torch.Tensor:
        return self._computed_maps[1]


class Recipe(TypingProtocol):
    """The hooks :func:`run` calls (implemented by :class:`vocabseg.methods.base.Method`)."""

    def prepare(self, models, image: torch.Tensor, protocol: Protocol, image_id: str | None = None) -> Prepared: ...

    def dense(self, models, inputs: list[Prepared], classifier: TextClassifier, protocol: Protocol
              ) -> list[Dense]: ...

    def scores_and_labels(self, logits: torch.Tensor, prepared: Prepared, dense: Dense, classifier: TextClassifier,
                          protocol: Protocol) -> tuple[torch.Tensor, torch.Tensor]: ...

    def refine_labels(self, labels: torch.Tensor, prepared: Prepared, dense: Dense, protocol: Protocol
                      ) -> torch.Tensor: ...

    def banded_scores(self) -> bool:
        """Whether ``scores_and_labels`` is the common one (PAMR, softmax, thresholds), which :func:`finish` then
        computes in row bands of bounded memory."""
        ...


@torch.inference_mode()
def run(recipe: Recipe, models, images: Sequence[torch.Tensor], classifier: TextClassifier, protocol: Protocol,
        image_ids: Sequence[str | None] | None = None) -> list[DenseResult]:
    """Segment uint8 ``H,W,3`` images (on the models' device) with ``recipe``; see the module docstring."""
    ids = list(image_ids) if image_ids is not None else [None] * len(images)
    with timing.stage("preprocess"):
        prepared = [recipe.prepare(models, image, protocol, image_id) for image, image_id in zip(images, ids,
                                                                                                 strict=True)]
    dense = recipe.dense(models, prepared, classifier, protocol)
    return [finish(recipe, item, out, classifier, protocol) for item, out in zip(prepared, dense, strict=True)]


#: Bytes of full-resolution maps the common tail holds at once (a band of rows of every query and class): peak
#: memory does not grow with the image size or, beyond one row per band, with the number of names.
BAND_BYTES = 96 * 2**20
#: Bytes of class scores kept for SCLIP's area rule (beyond them, the bands it changes are computed again).
KEPT_SCORES_BYTES = 512 * 2**20


def finish(recipe: Recipe, prepared: Prepared, dense: Dense, classifier: TextClassifier, protocol: Protocol
           ) -> DenseResult:
    """The common tail of one image: upsample, scores and labels, label refinement, paste into the original."""
    size = prepared.size
    spec = classifier.spec

    def full_maps() -> tuple[torch.Tensor, torch.Tensor]:
        logits = upsample(dense.logits, size)
        if dense.scores is not None:
            return logits, dense.scores
        return logits, recipe.scores_and_labels(logits, prepared, dense, classifier, protocol)[0]

    if dense.scores is not None:
        with timing.stage("postprocess"):
            labels = postprocess.labels_from_scores(dense.scores, protocol.prob_thd, protocol.area_thd,
                                                    spec.has_background)
        maps = full_maps
    elif recipe.banded_scores():
        labels = banded_labels(dense.logits, prepared.input[0], size, classifier, protocol)
        maps = full_maps
    else:
        with timing.stage("upsample"):
            logits = upsample(dense.logits, size)
        scores, labels = recipe.scores_and_labels(logits, prepared, dense, classifier, protocol)
        def maps() -> tuple[torch.Tensor, torch.Tensor]:
            return logits, scores
    with timing.stage("postprocess"):
        labels = recipe.refine_labels(labels, prepared, dense, protocol)
    result = DenseResult(labels, maps, dense.masks)
    if prepared.region is not None:
        result = paste(result, prepared.region, (int(prepared.image.shape[0]), int(prepared.image.shape[1])))
    return result


def banded_labels(logits: torch.Tensor, guide: torch.Tensor, size: tuple[int, int], classifier: TextClassifier,
                  protocol: Protocol) -> torch.Tensor:
    """The labels ``H,W`` of :func:`scores_and_labels` over ``upsample(logits, size)`` (``logits`` ``Q,h,w``, guide
    ``3,h',w'``), computed band of rows by band of rows; SCLIP's area rule, which needs the whole image's argmax,
    revisits only the bands where a dropped class won (their scores kept when they fit, else computed again)."""
    spec = classifier.spec
    height = size[0]
    rows = band_rows(logits.shape[0] + spec.num_classes, size, pamr_context(protocol))
    bands = [(start, min(start + rows, height)) for start in range(0, height, rows)]
    labels = torch.empty(size, dtype=torch.long, device=logits.device)
    best = torch.empty(size, dtype=torch.float32, device=logits.device)

    def band_scores(start: int, stop: int) -> torch.Tensor:
        refined = refined_band(logits, guide, size, start, stop, protocol)
        with timing.stage("postprocess"):
            return postprocess.class_scores(refined, classifier.query_class, spec.num_classes, protocol.logit_scale)

    kept: dict[int, torch.Tensor] = {}  # band scores the area rule may need again, within KEPT_SCORES_BYTES
    for start, stop in bands:
        scores = band_scores(start, stop)
        best[start:stop], labels[start:stop] = scores.max(0)
        if protocol.area_thd is not None and (len(kept) + 1) * scores.nbytes <= KEPT_SCORES_BYTES:
            kept[start] = scores
    dropped = postprocess.dropped_by_area(labels, spec.num_classes, protocol.area_thd, spec.has_background)
    if dropped is not None:
        for start, stop in bands:
            if dropped[labels[start:stop]].any():
                scores = kept[start] if start in kept else band_scores(start, stop)
                best[start:stop], labels[start:stop] = postprocess.without_classes(scores, dropped).max(0)
    return postprocess.apply_prob_thd(labels, best, protocol.prob_thd, spec.has_background)


def pamr_context(protocol: Protocol) -> int:
    """Rows of context PAMR needs on each side of a band for exact results (each iteration reaches one largest
    dilation further)."""
    return protocol.pamr_steps * max(protocol.pamr_dilations) if protocol.pamr else 0


def band_rows(maps: int, size: tuple[int, int], context: int) -> int:
    """Rows per band so that ``maps`` full-width float maps (and their softmax) fit in :data:`BAND_BYTES`; at least
    ``context`` rows, so that the context recomputed around a band costs at most three times the band; the whole
    height when two bands would do, as the second would redo most of the first as its context."""
    height, width = size
    rows = max(8, context, BAND_BYTES // (3 * 4 * maps * max(width, 1)))
    return height if context and height <= 2 * rows else rows


#: Queries PAMR refines per pass over a band (their upsampled band with its context is the largest buffer).
PAMR_QUERY_CHUNK = 16


def refined_band(logits: torch.Tensor, guide: torch.Tensor, size: tuple[int, int], start: int, stop: int,
                 protocol: Protocol) -> torch.Tensor:
    """Rows ``start:stop`` of the upsampled per-query logits ``Q,rows,W``, PAMR-refined when the protocol asks for
    it (on the band with :func:`pamr_context` rows around it, so the rows equal those of the whole-image PAMR)."""
    with timing.stage("upsample"):
        if not protocol.pamr:
            return upsample_rows(logits, size, start, stop)
        context = pamr_context(protocol)
        low, high = max(0, start - context), min(size[0], stop + context)
        band_guide = upsample_rows(guide, size, low, high)[None]
    with timing.stage("pamr"):
        weights = postprocess.pamr_weights(band_guide, protocol.pamr_dilations)
        out = logits.new_empty(logits.shape[0], stop - start, size[1])
        for first in range(0, logits.shape[0], PAMR_QUERY_CHUNK):
            chunk = upsample_rows(logits[first:first + PAMR_QUERY_CHUNK], size, low, high)[None]
            refined = postprocess.pamr(band_guide, chunk, protocol.pamr_steps, protocol.pamr_dilations,
                                       weights=weights)
            out[first:first + PAMR_QUERY_CHUNK] = refined[0, :, start - low:stop - low]
    return out


def scores_and_labels(logits: torch.Tensor, guide: torch.Tensor | None, classifier: TextClassifier,
                      protocol: Protocol) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query logits ``Q,H,W`` -> class scores ``C,H,W`` and labels ``H,W``: PAMR when the protocol asks for it
    (guided by the normalised input ``guide`` ``3,h,w``, resized to ``H,W``), softmax over names, max per class,
    thresholds."""
    refined = logits
    if protocol.pamr:
        with timing.stage("pamr"):
            guide = upsample(guide, tuple(logits.shape[-2:]))[None]
            refined = postprocess.pamr(guide, logits[None], protocol.pamr_steps, protocol.pamr_dilations)[0]
    spec = classifier.spec
    with timing.stage("postprocess"):
        scores = postprocess.class_scores(refined, classifier.query_class, spec.num_classes, protocol.logit_scale)
        labels = postprocess.labels_from_scores(scores, protocol.prob_thd, protocol.area_thd, spec.has_background)
    return scores, labels


def paste(result: DenseResult, region: tuple[int, int, int, int], size: tuple[int, int]) -> DenseResult:
    """A result computed on ``region`` ``(y1, y2, x1, x2)`` of an image of ``size``, placed into the whole frame:
    logits and scores bilinearly (zero outside), labels and masks nearest (255 and False outside)."""
    y1, y2, x1, x2 = region
    inside = (y2 - y1, x2 - x1)

    def place(maps: torch.Tensor, fill, resize) -> torch.Tensor:
        full = torch.full((*maps.shape[:-2], *size), fill, dtype=maps.dtype, device=maps.device)
        full[..., y1:y2, x1:x2] = resize(maps)
        return full

    def nearest(maps: torch.Tensor) -> torch.Tensor:
        flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
        return F.interpolate(flat, size=inside, mode="nearest").reshape(*maps.shape[:-2], *inside).to(maps.dtype)

    def maps() -> tuple[torch.Tensor, torch.Tensor]:
        return (place(result.logits, 0.0, lambda m: upsample(m, inside)),
                place(result.scores, 0.0, lambda m: upsample(m, inside)))

    masks = None if result.masks is None else place(result.masks, False, nearest)
    return DenseResult(place(result.labels, postprocess.IGNORE_LABEL, nearest), maps, masks,
                       {**result.meta, "crop_box": [y1, y2, x1, x2]})
