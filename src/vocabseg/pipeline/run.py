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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

import torch
import torch.nn.functional as F

from vocabseg.pipeline import postprocess, timing
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.windows import upsample
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


@dataclass
class DenseResult:
    """The result for one image, at the original size: per-query ``logits`` ``Q,H,W`` (raw, before PAMR and
    softmax), class ``scores`` ``C,H,W``, ``labels`` ``H,W`` (255: no confident class without a background),
    class-agnostic ``masks`` ``K,H,W`` when the method has any, and ``meta`` (e.g. the crop box)."""

    logits: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Recipe(TypingProtocol):
    """The hooks :func:`run` calls (implemented by :class:`vocabseg.methods.base.Method`)."""

    def prepare(self, models, image: torch.Tensor, protocol: Protocol, image_id: str | None = None) -> Prepared: ...

    def dense(self, models, inputs: list[Prepared], classifier: TextClassifier, protocol: Protocol
              ) -> list[Dense]: ...

    def scores_and_labels(self, logits: torch.Tensor, prepared: Prepared, dense: Dense, classifier: TextClassifier,
                          protocol: Protocol) -> tuple[torch.Tensor, torch.Tensor]: ...

    def refine_labels(self, labels: torch.Tensor, prepared: Prepared, dense: Dense, protocol: Protocol
                      ) -> torch.Tensor: ...


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


def finish(recipe: Recipe, prepared: Prepared, dense: Dense, classifier: TextClassifier, protocol: Protocol
           ) -> DenseResult:
    """The common tail of one image: upsample, scores and labels, label refinement, paste into the original."""
    with timing.stage("upsample"):
        logits = upsample(dense.logits, prepared.size)
    if dense.scores is None:
        scores, labels = recipe.scores_and_labels(logits, prepared, dense, classifier, protocol)
    else:
        scores = dense.scores
        with timing.stage("postprocess"):
            labels = postprocess.labels_from_scores(scores, protocol.prob_thd, protocol.area_thd,
                                                    classifier.spec.has_background)
    with timing.stage("postprocess"):
        labels = recipe.refine_labels(labels, prepared, dense, protocol)
    result = DenseResult(logits, scores, labels, dense.masks)
    if prepared.region is not None:
        result = paste(result, prepared.region, (int(prepared.image.shape[0]), int(prepared.image.shape[1])))
    return result


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

    masks = None if result.masks is None else place(result.masks, False, nearest)
    return DenseResult(
        logits=place(result.logits, 0.0, lambda m: upsample(m, inside)),
        scores=place(result.scores, 0.0, lambda m: upsample(m, inside)),
        labels=place(result.labels, postprocess.IGNORE_LABEL, nearest),
        masks=masks,
        meta={**result.meta, "crop_box": [y1, y2, x1, x2]},
    )
