"""What a method is: protocol knobs, named presets, and how a crop becomes per-query logits.

A method supplies :meth:`Method.crop_logits` (usually through :meth:`Method.patch_features`); the shared
harness in :meth:`Method.predict` does resizing, windows, merging, PAMR and thresholds. A method that needs a
different pipeline overrides ``predict``; one that changes the text side overrides ``build_classifier``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vocabseg.pipeline import inference, postprocess, timing
from vocabseg.text.classifier import ClassSpec, TextCache, TextClassifier


@dataclass(frozen=True)
class Protocol:
    """Every inference knob of the common harness (spec section 1.3)."""

    short_side: int | None = 336  # None or 0: keep the image size
    max_long_side: int = 2048
    crop: int | None = 224  # None or 0: whole-image inference
    stride: int = 112
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    pamr: bool = False
    pamr_steps: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)
    window_batch: int = 0  # crops per forward pass; 0 = automatic (a token budget on CPU, free memory on GPU)
    precision: str = "fp32"  # fp32, or autocast to bf16 / fp16 for the ViT (logits merged in fp32)

    def replace(self, **changes: Any) -> Protocol:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown protocol option(s): {', '.join(sorted(unknown))}")
        if "pamr_dilations" in changes:
            changes["pamr_dilations"] = tuple(int(d) for d in changes["pamr_dilations"])
        return dataclasses.replace(self, **changes)

    def validate(self) -> Protocol:
        if (self.crop or 0) < 0 or self.stride <= 0:
            raise ValueError(f"crop must be >= 0 (0: whole image) and stride > 0 (got {self.crop}, {self.stride})")
        if self.window_batch < 0:
            raise ValueError(f"window_batch must be >= 0 (0: automatic; got {self.window_batch})")
        if (self.short_side or 0) < 0:
            raise ValueError(f"short_side must be >= 0 (0: keep the image size; got {self.short_side})")
        if self.precision not in inference.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(inference.PRECISIONS)} (got {self.precision!r})")
        if not 0 <= self.prob_thd <= 1:
            raise ValueError(f"prob_thd must lie in [0, 1] (got {self.prob_thd})")
        return self


@dataclass(frozen=True)
class Preset:
    """A published per-dataset protocol: knobs plus the dataset whose class names (in ``names_style``) it uses.

    ``options`` holds the method options the preset sets (e.g. ITACLIP's coefficients); options the user passes
    explicitly win over them.
    """

    protocol: Protocol
    dataset: str | None = None
    names_style: str = "sclip"
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def class_spec(self) -> ClassSpec:
        from vocabseg.data.classes import CLASSES, query_names

        if self.dataset is None:
            raise ValueError("this preset has no class list; pass classes")
        names = query_names(self.dataset, self.names_style)
        has_background = CLASSES[self.dataset][0] == "background"
        return ClassSpec(labels=CLASSES[self.dataset], names=tuple(tuple(n) for n in names),
                         has_background=has_background)


@dataclass
class Method:
    """Base class: subclasses set ``name``, ``summary``, ``default_protocol``, ``presets`` and a feature recipe.

    Dataclass fields of a subclass are the method's own options (overridable from the API and CLI).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    default_protocol: ClassVar[Protocol] = Protocol()
    #: Weights used when none are given, and the kind of model :meth:`load_backbone` builds (methods of one kind
    #: can share a loaded backbone).
    default_weights: ClassVar[str] = "openai"
    backbone_kind: ClassVar[str] = "clip"
    presets: ClassVar[dict[str, Preset]] = {}
    vit_passes_per_crop: ClassVar[int] = 1
    #: Crops are zero-padded (after normalisation) to a multiple of this many pixels; 0 leaves them as they are
    #: (the patch convolution then floors the grid).
    crop_multiple: ClassVar[int] = 0
    #: How the harness normalises the resized image (the method's official preprocessing).
    normalization: ClassVar[inference.Normalization] = inference.CLIP_NORMALIZATION
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def options(self) -> dict[str, Any]:
        """The method's own option values (its init fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def load_backbone(self, weights: str, arch: str | None, device: torch.device):
        """The model this method runs on, from ``weights``: a :class:`~vocabseg.models.openclip.CLIPBackbone`
        unless a method on another model overrides this."""
        from vocabseg.models.factory import load_clip
        from vocabseg.models.openclip import CLIPBackbone

        model, info = load_clip(weights, arch, device)
        return CLIPBackbone(model, name=info.arch, source=info.source)

    def helper_models(self, backbone) -> dict[str, dict[str, str]]:
        """The models the method uses besides CLIP, by role (``{"dino": {"arch": ..., "source": ...}}``), for the
        run description; none by default."""
        return {}

    # --- text side --------------------------------------------------------------------------------------------

    def build_classifier(self, backbone, spec: ClassSpec, cache: TextCache | None) -> TextClassifier:
        return TextClassifier.build(backbone, spec, cache=cache)

    # --- image side -------------------------------------------------------------------------------------------

    def patch_features(self, backbone, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """L2-normalised patch features ``B,N,E`` of normalised crops ``B,3,h,w`` and their grid."""
        raise NotImplementedError(f"{type(self).__name__} must define patch_features or crop_logits")

    def text_patch_features(self, backbone, crops: torch.Tensor, text: torch.Tensor
                            ) -> tuple[torch.Tensor, tuple[int, int]]:
        """:meth:`patch_features` for the classifier ``text`` ``Q,E``: a method whose features depend on the text
        (ResCLIP's semantic feedback) overrides this instead."""
        return self.patch_features(backbone, crops)

    def crop_logits(self, backbone, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Per-query cosine logits ``B,Q,h,w`` at crop resolution (grid logits upsampled bilinearly)."""
        features, grid = self.text_patch_features(backbone, crops, text)
        return grid_logits_to_crop(features @ text.T, grid, crops.shape[-2:])

    def refine_labels(self, labels: torch.Tensor, protocol: Protocol) -> torch.Tensor:
        """Hook for label-map post-processing (e.g. ITACLIP's closing); identity by default."""
        return labels

    def predict(self, backbone, image: torch.Tensor, classifier: TextClassifier, protocol: Protocol) -> dict:
        """The common harness on a uint8 ``H,W,3`` image tensor.

        Returns ``logits`` (raw per-query cosine logits at original size, before PAMR and softmax), ``scores``
        (``C,H,W``) and ``labels`` (``H,W``). A method with its own pipeline overrides this; batched calls then
        run it image by image.
        """
        return self.harness(backbone, [image], classifier, protocol)[0]

    def predict_batch(self, backbone, images: list[torch.Tensor], classifier: TextClassifier, protocol: Protocol,
                      image_ids: list[str | None] | None = None) -> list[dict]:
        """:meth:`predict` for several images; with the common harness their equal-size windows share passes.

        ``image_ids`` name the images (file stems when known) for methods that read per-image inputs from disk,
        such as pre-generated region masks; the others ignore them.
        """
        if type(self).predict is not Method.predict:
            return [self.predict(backbone, image, classifier, protocol) for image in images]
        return self.harness(backbone, images, classifier, protocol)

    @torch.inference_mode()
    def harness(self, backbone, images: list[torch.Tensor], classifier: TextClassifier, protocol: Protocol
                ) -> list[dict]:
        """The common harness (spec 1.3) on uint8 ``H,W,3`` images: resize, normalise, windows batched across
        images, merge, upsample, PAMR, softmax over names, thresholds, :meth:`refine_labels`."""
        with timing.stage("preprocess"):
            inputs = [inference.preprocess(image, protocol.short_side, protocol.max_long_side, self.normalization)
                      for image in images]
        text = classifier.embeddings.to(inputs[0].dtype)
        batch = self.windows_per_pass(backbone, protocol, max(max(x.shape[-2:]) for x in inputs))
        with timing.stage("vit"):
            all_logits = inference.dense_logits_batch(self.harness_crop_logits(backbone, text, protocol), inputs,
                                                      protocol.crop, protocol.stride, batch)
        return [self._harness_tail(image, resized, logits, classifier, protocol)
                for image, resized, logits in zip(images, inputs, all_logits, strict=True)]

    def harness_crop_logits(self, backbone, text: torch.Tensor, protocol: Protocol) -> inference.CropLogits:
        """:meth:`crop_logits` as the harness runs it: crops zero-padded symmetrically to a multiple of
        :attr:`crop_multiple` (when set; the logits are cropped back), under the protocol's autocast precision,
        returning float32 logits."""
        multiple = self.crop_multiple

        def crop_logits(crops: torch.Tensor) -> torch.Tensor:
            height, width = crops.shape[-2:]
            top = left = 0
            if multiple and (height % multiple or width % multiple):
                pad_h, pad_w = -height % multiple, -width % multiple
                top, left = pad_h // 2, pad_w // 2
                crops = F.pad(crops, (left, pad_w - left, top, pad_h - top))
            with inference.autocast(protocol.precision, crops.device):
                logits = self.crop_logits(backbone, crops, text).float()
            return logits[..., top:top + height, left:left + width]

        return crop_logits

    def windows_per_pass(self, backbone, protocol: Protocol, image_side: int) -> int:
        """``protocol.window_batch``, or the automatic choice for this method's crops (and views per crop)."""
        return protocol.window_batch or inference.auto_window_batch(
            backbone, protocol.crop or image_side, self.vit_passes_per_crop)

    def _harness_tail(self, image: torch.Tensor, inputs: torch.Tensor, logits: torch.Tensor,
                classifier: TextClassifier, protocol: Protocol) -> dict:
        """Upsample to the original size, PAMR, softmax over names, thresholds and label refinement."""
        height, width = image.shape[:2]
        with timing.stage("upsample"):
            logits = inference.upsample(logits, (height, width))
        scores, labels = self.scores_and_labels(logits, inputs[0], classifier, protocol)
        with timing.stage("postprocess"):
            labels = self.refine_labels(labels, protocol)
        return {"logits": logits, "scores": scores, "labels": labels}

    @staticmethod
    def scores_and_labels(logits: torch.Tensor, guide: torch.Tensor | None, classifier: TextClassifier,
                          protocol: Protocol) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-query logits ``Q,H,W`` -> class scores ``C,H,W`` and labels ``H,W``: PAMR when the protocol asks for
        it (guided by the normalised input ``guide`` ``3,h,w``, resized to ``H,W``), softmax over names, max per
        class, thresholds."""
        refined = logits
        if protocol.pamr:
            with timing.stage("pamr"):
                guide = inference.upsample(guide, tuple(logits.shape[-2:]))[None]
                refined = postprocess.pamr(guide, logits[None], protocol.pamr_steps, protocol.pamr_dilations)[0]
        spec = classifier.spec
        with timing.stage("postprocess"):
            scores = postprocess.class_scores(refined, classifier.query_class, spec.num_classes,
                                              protocol.logit_scale)
            labels = postprocess.labels_from_scores(scores, protocol.prob_thd, protocol.area_thd,
                                                    spec.has_background)
        return scores, labels

    def vit_passes(self, height: int, width: int, protocol: Protocol) -> int:
        """ViT forward passes (crops x views) for an image of this size under ``protocol``."""
        h, w = inference.resized_shape(height, width, protocol.short_side) if protocol.short_side else (height, width)
        crops = len(inference.sliding_windows(h, w, protocol.crop, protocol.stride)) if protocol.crop else 1
        return crops * self.vit_passes_per_crop


def grid_logits_to_crop(logits: torch.Tensor, grid: tuple[int, int], size) -> torch.Tensor:
    """``B,N,Q`` patch logits on a ``gh x gw`` grid -> ``B,Q,h,w`` (bilinear, align_corners=False)."""
    b, _, q = logits.shape
    maps = logits.transpose(1, 2).reshape(b, q, *grid)
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def as_bool(value: Any, name: str) -> bool:
    """A boolean method option given as a bool, 0/1 or a word (``--option flips=false``)."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
    elif isinstance(value, (bool, int)):
        return bool(value)
    raise ValueError(f"{name} must be true or false (got {value!r})")


def method_options(cls: type[Method]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def create_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method, or a composition ``base+plugin[+plugin]`` (registered on first use), with
    its own options."""
    import vocabseg.methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS and "+" in name:
        from vocabseg.methods.composition import compose_named

        compose_named(name)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)
