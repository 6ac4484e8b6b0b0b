"""What a method is: a recipe over models. It declares the models it needs, its options (dataclass fields), its
default protocol and published presets, and fills the hooks of the one pipeline (:mod:`vocabseg.pipeline.run`).

Most recipes only say how a crop becomes per-query logits (:meth:`Method.crop_logits`, usually through
:meth:`Method.patch_features` over a :class:`~vocabseg.models.encoder.DenseEncoder`); the default hooks then resize,
batch windows across images, merge, upsample, refine with PAMR and threshold. A method with its own flow overrides
``prepare`` (its preprocessing), ``dense`` (all images of a batch at once, so nothing loses batching) or the tail
hooks (``scores_and_labels``, ``refine_labels``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vocabseg.config import check_ranges
from vocabseg.errors import UsageError
from vocabseg.models.encoder import DenseEncoder, Models, Normalization, require_class_token
from vocabseg.pipeline import run, timing, windows
from vocabseg.pipeline.preprocess import preprocess, resized_shape
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.run import Dense, Prepared
from vocabseg.text.classes import ClassSpec, benchmark_spec
from vocabseg.text.classifier import TextCache, TextClassifier
from vocabseg.text.templates import IMAGENET_TEMPLATES


@dataclass(frozen=True)
class ModelSlot:
    """A model a method needs: its kind (see :mod:`vocabseg.models.factory`), the default weights and what it does
    in the method. Users choose other weights per role (``models={"dino": PATH}``, ``--model dino=PATH``)."""

    kind: str
    default: str | None = None
    help: str = ""
    #: A keyword that older releases took as a method option for these weights (``checkpoint=``); still accepted
    #: by :class:`~vocabseg.api.Segmenter`, with a deprecation warning.
    option: str | None = None


#: The CLIP every CLIP method runs on (OpenAI ViT-B/16 by default; ``--weights``/``--arch`` choose another).
CLIP_SLOT = ModelSlot("clip", "openai", "the CLIP model")


@dataclass(frozen=True)
class Preset:
    """A published per-benchmark protocol: the knobs, the benchmark whose classes it segments with the name list
    ``names`` (a list id, see :func:`vocabseg.data.classes.name_list`), and the method options it sets (options the
    user passes explicitly win over them)."""

    protocol: Protocol
    dataset: str | None = None
    names: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def class_spec(self) -> ClassSpec:
        return benchmark_spec(self.dataset, self.names)


@dataclass
class Method:
    """Base class of the recipes; see the module docstring. Dataclass fields of a subclass are its options; an
    option declared with :func:`vocabseg.config.setting` has its range checked on construction (a subclass with its
    own ``__post_init__`` calls ``super().__post_init__()``)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: The models the method runs on, by role.
    models: ClassVar[Mapping[str, ModelSlot]] = {"clip": CLIP_SLOT}
    #: Whether the recipe reads the image encoder's class token (refused on encoders without one).
    needs_class_token: ClassVar[bool] = False
    default_protocol: ClassVar[Protocol] = Protocol()
    presets: ClassVar[Mapping[str, Preset]] = {}
    #: Forward passes per crop (test-time views), for the automatic window batch and the pass count.
    views_per_crop: ClassVar[int] = 1
    #: Crops are zero-padded (after normalisation) symmetrically to a multiple of this many pixels and the logits
    #: cropped back; 0 leaves them as they are (the patch convolution then floors the grid).
    crop_multiple: ClassVar[int] = 0

    def __post_init__(self):
        check_ranges(self)

    def options(self) -> dict[str, Any]:
        """The method's own option values (its init fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def check_models(self, models: Models) -> None:
        """Refuse models the recipe cannot run on, with a clear message."""
        if self.needs_class_token and "clip" in models:
            require_class_token(models.clip.image, self.name)

    def check_protocol(self, models: Models, protocol: Protocol) -> None:
        """Refuse settings the loaded models cannot run: sliding windows smaller than one patch of the main model's
        image encoder."""
        encoder = getattr(next(iter(models.values()), None), "image", None)
        patch = getattr(encoder, "patch_size", 0)
        if protocol.crop and protocol.crop < patch:
            raise UsageError(f"crop {protocol.crop} is smaller than one {patch}-pixel patch of "
                             f"{encoder.name or 'the image encoder'}: give at least {patch} pixels, or none for "
                             "whole-image inference")

    # --- text side ----------------------------------------------------------------------------------------------

    def text_classifier(self, models: Models, spec: ClassSpec, cache: TextCache | None) -> TextClassifier:
        """The query embeddings of ``spec`` (80 ImageNet templates by default)."""
        return TextClassifier.build(models.clip.text, spec, IMAGENET_TEMPLATES, cache)

    # --- image side ---------------------------------------------------------------------------------------------

    def normalization(self, models: Models) -> Normalization:
        """How the resized image is normalised: the image encoder's own statistics by default."""
        return models.clip.image.normalization

    def prepare(self, models: Models, image: torch.Tensor, protocol: Protocol, image_id: str | None = None
                ) -> Prepared:
        """uint8 ``H,W,3`` -> the protocol's resized and normalised input."""
        inputs = preprocess(image, protocol.short_side, protocol.max_long_side, self.normalization(models))
        return Prepared(image=image, input=inputs, image_id=image_id)

    def dense(self, models: Models, inputs: list[Prepared], classifier: TextClassifier, protocol: Protocol
              ) -> list[Dense]:
        """Per-query logits of every image: sliding windows (or whole images) of equal size from all images share
        forward passes; overlapping window logits are averaged."""
        batch = self.windows_per_pass(models, protocol, max(max(p.input.shape[-2:]) for p in inputs))
        with timing.stage("vit"):
            logits = windows.dense_logits_batch(self.crop_function(models, classifier, protocol),
                                                [p.input for p in inputs], protocol.crop, protocol.stride, batch)
        return [Dense(item) for item in logits]

    def crop_function(self, models: Models, classifier: TextClassifier, protocol: Protocol) -> windows.CropLogits:
        """:meth:`crop_logits` as the pipeline runs it: padded to :attr:`crop_multiple` when set (and cropped back),
        under the protocol's autocast precision, returning float32 logits."""
        multiple = self.crop_multiple
        text = classifier.embeddings.float()

        def crop_logits(crops: torch.Tensor) -> torch.Tensor:
            height, width = crops.shape[-2:]
            top = left = 0
            if multiple and (height % multiple or width % multiple):
                pad_h, pad_w = -height % multiple, -width % multiple
                top, left = pad_h // 2, pad_w // 2
                crops = F.pad(crops, (left, pad_w - left, top, pad_h - top))
            with windows.autocast(protocol.precision, crops.device):
                logits = self.crop_logits(models, crops, text).float()
            return logits[..., top:top + height, left:left + width]

        return crop_logits

    def crop_logits(self, models: Models, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Per-query cosine logits ``B,Q,h,w`` of normalised crops ``B,3,h,w`` (grid logits upsampled bilinearly);
        ``text`` ``Q,E``."""
        features, grid = self.text_patch_features(models, crops, text)
        return windows.grid_logits_to_crop(features @ text.to(features.dtype).T, grid, crops.shape[-2:])

    def text_patch_features(self, models: Models, crops: torch.Tensor, text: torch.Tensor
                            ) -> tuple[torch.Tensor, tuple[int, int]]:
        """:meth:`patch_features` for the classifier ``text``; a recipe whose features depend on the text (ResCLIP's
        semantic feedback) overrides this."""
        return self.patch_features(models.clip.image, crops)

    def patch_features(self, encoder: DenseEncoder, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """L2-normalised patch features ``B,N,E`` of normalised crops ``B,3,h,w`` and their grid."""
        raise NotImplementedError(f"{type(self).__name__} must define patch_features or crop_logits")

    def windows_per_pass(self, models: Models, protocol: Protocol, image_side: int) -> int:
        """``protocol.window_batch``, or the automatic choice for this method's crops (and views per crop), bounded
        by every other dense encoder among the models as well (a DINO ViT-B/8 has 4x CLIP-B/16's tokens)."""
        if protocol.window_batch:
            return protocol.window_batch
        crop = protocol.crop or image_side
        helpers = [model for model in models.values() if isinstance(model, DenseEncoder)]
        return min(windows.auto_window_batch(encoder, crop, views)
                   for encoder, views in [(models.clip.image, self.views_per_crop), *((h, 1) for h in helpers)])

    # --- after the logits ---------------------------------------------------------------------------------------

    def scores_and_labels(self, logits: torch.Tensor, prepared: Prepared, dense: Dense, classifier: TextClassifier,
                          protocol: Protocol) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-query logits ``Q,H,W`` at the output size -> class scores ``C,H,W`` and labels ``H,W``: PAMR (when
        on), softmax over names, maximum per class, thresholds."""
        return run.scores_and_labels(logits, prepared.input[0], classifier, protocol)

    def banded_scores(self) -> bool:
        """True unless the recipe overrides :meth:`scores_and_labels`: the pipeline then computes the common one in
        row bands of bounded memory."""
        return type(self).scores_and_labels is Method.scores_and_labels

    def refine_labels(self, labels: torch.Tensor, prepared: Prepared, dense: Dense, protocol: Protocol
                      ) -> torch.Tensor:
        """Label-map post-processing (ITACLIP's closing, CLIPtrase's cluster vote); identity by default."""
        return labels

    def forward_passes(self, height: int, width: int, protocol: Protocol) -> int:
        """Image-encoder forward passes (crops x views) for an image of this size under ``protocol``."""
        h, w = resized_shape(height, width, protocol.short_side, protocol.max_long_side) if protocol.short_side \
            else (height, width)
        crops = len(windows.sliding_windows(h, w, protocol.crop, protocol.stride)) if protocol.crop else 1
        return crops * self.views_per_crop
