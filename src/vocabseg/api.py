"""The one entry point users call: ``Segmenter(method).segment(image, classes)`` -> :class:`Segmentation`."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vocabseg.io import outputs
from vocabseg.io.images import load_image
from vocabseg.methods.base import Method, Preset, Protocol, create_method, method_options
from vocabseg.models.openclip import CLIPBackbone
from vocabseg.pipeline import timing
from vocabseg.pipeline.postprocess import max_over_names
from vocabseg.text.classifier import BackgroundArg, ClassesArg, ClassSpec, TextCache, TextClassifier, parse_classes


@dataclass
class Segmentation:
    """The result for one image.

    ``labels`` ``H,W`` indexes ``classes`` (255 = no confident class when there is no background);
    ``scores`` ``C,H,W`` are probabilities after softmax and the max over names; ``logits`` ``C,H,W`` are the raw
    cosine logits after the window merge and upsampling, before softmax and PAMR (max over a class's names).
    Both are ``None`` when the segmenter was asked for labels only (``maps=False``).
    """

    labels: np.ndarray
    scores: np.ndarray | None
    logits: np.ndarray | None
    classes: tuple[str, ...]
    palette: np.ndarray
    image: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    masks: np.ndarray | None = None

    def pixel_fractions(self) -> dict[str, float]:
        return outputs.pixel_fractions(self.labels, self.classes)

    def sidecar(self) -> dict[str, Any]:
        """The JSON sidecar: classes, palette, pixel share per class, method and protocol."""
        return {
            "classes": list(self.classes),
            "palette": self.palette[: len(self.classes)].tolist(),
            "ignore_label": 255,
            "pixel_fraction": self.pixel_fractions(),
            "size": {"height": int(self.labels.shape[0]), "width": int(self.labels.shape[1])},
            **self.meta,
        }

    def save(self, directory: str | os.PathLike, stem: str = "segmentation") -> dict[str, Path]:
        """Write ``<stem>.png`` (palette labels), ``<stem>_overlay.png`` (with legend) and ``<stem>.json``."""
        directory = Path(directory)
        paths = {"labels": directory / f"{stem}.png", "overlay": directory / f"{stem}_overlay.png",
                 "json": directory / f"{stem}.json"}
        outputs.save_image(paths["labels"], outputs.label_image(self.labels, self.palette))
        if self.image is not None:
            overlay = outputs.overlay_with_legend(self.image, self.labels, self.classes, self.palette)
            outputs.save_image(paths["overlay"], overlay)
        else:
            del paths["overlay"]
        outputs.write_json(paths["json"], self.sidecar())
        return paths


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``None`` picks CUDA when available; an impossible choice is a clear ValueError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA GPU is usable here; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return resolved


class Segmenter:
    """Segment images into any list of words with one method.

    >>> seg = Segmenter("sclip")                                    # doctest: +SKIP
    >>> out = seg.segment("photo.jpg", classes=["cat", "dog|puppy"])  # doctest: +SKIP

    ``preset`` selects a published per-dataset protocol (``"voc21"``, ...); remaining keyword arguments override
    protocol knobs (``short_side``, ``crop``, ``stride``, ``logit_scale``, ``prob_thd``, ``area_thd``, ``pamr``,
    ``pamr_steps``, ``pamr_dilations``, ``window_batch``) or the method's own options (e.g. ``gaussian_std``).
    A ready :class:`CLIPBackbone` (or the method's own model, e.g. IFSeg's OFA) may be passed instead of weights;
    ``weights=None`` takes the method's default (``openai`` CLIP, ``ofa-base`` for ``ifseg``).
    """

    def __init__(self, method: str = "sclip", weights: str | os.PathLike | None = None, arch: str | None = None,
                 device: str | None = None, preset: str | None = None, backbone: CLIPBackbone | None = None,
                 text_cache: bool | str | os.PathLike = True, **overrides: Any):
        from vocabseg.methods.base import METHODS

        create_method(method)  # validates the name and registers the built-ins
        options = set(method_options(METHODS[method]))
        method_kwargs = {k: v for k, v in overrides.items() if k in options}
        protocol_kwargs = {k: v for k, v in overrides.items() if k not in options}
        self.preset_name = preset
        self.preset: Preset | None = None
        if preset is not None:
            presets = METHODS[method].presets
            if preset not in presets:
                raise ValueError(f"method {method!r} has no preset {preset!r}; "
                                 f"available: {', '.join(presets) or 'none'}")
            self.preset = presets[preset]
            method_kwargs = {**self.preset.options, **method_kwargs}
        self.method: Method = create_method(method, **method_kwargs)
        base = self.preset.protocol if self.preset else self.method.default_protocol
        try:
            self.protocol: Protocol = base.replace(**protocol_kwargs).validate()
        except TypeError as exc:
            raise ValueError(f"{exc}; method options of {method!r}: {', '.join(sorted(options)) or 'none'}") from None
        if backbone is None:
            weights = self.method.default_weights if weights is None else weights
            backbone = self.method.load_backbone(weights, arch, resolve_device(device))
        self.backbone = backbone
        if text_cache is True:
            self.text_cache: TextCache | None = TextCache()
        elif text_cache:
            self.text_cache = TextCache(text_cache)
        else:
            self.text_cache = None
        self._classifiers: dict[ClassSpec, TextClassifier] = {}

    def class_spec(self, classes: ClassesArg | ClassSpec | None = None, background: BackgroundArg = True
                   ) -> ClassSpec:
        """The classes to use: given ones, or the preset's benchmark classes when none are given."""
        if isinstance(classes, ClassSpec):
            return classes
        if classes is None:
            if self.preset is None or self.preset.dataset is None:
                raise ValueError("no classes given: pass classes (e.g. ['cat', 'dog']) or a dataset preset")
            return self.preset.class_spec()
        return parse_classes(classes, background)

    def classifier(self, spec: ClassSpec) -> TextClassifier:
        """The text classifier of ``spec`` (memoised in memory, cached on disk)."""
        if spec not in self._classifiers:
            self._classifiers[spec] = self.method.build_classifier(self.backbone, spec, self.text_cache)
        return self._classifiers[spec]

    def describe(self, spec: ClassSpec) -> dict[str, Any]:
        """What produced a result: method and its options, preset, protocol, query names, weights (and those of the
        method's helper models, when it has any)."""
        description = {
            "method": self.method.name,
            "method_options": self.method.options(),
            "preset": self.preset_name,
            "protocol": dataclasses.asdict(self.protocol),
            "names": [list(n) for n in spec.names],
            "weights": {"arch": self.backbone.name, "source": self.backbone.source},
        }
        helpers = self.method.helper_models(self.backbone)
        if helpers:
            description["helper_models"] = helpers
        return description

    def palette(self, spec: ClassSpec) -> np.ndarray:
        from vocabseg.data.classes import palette

        dataset = self.preset.dataset if self.preset and spec.labels == self._preset_labels() else None
        return palette(dataset, spec.num_classes)

    def _preset_labels(self) -> tuple[str, ...] | None:
        from vocabseg.data.classes import CLASSES

        return CLASSES.get(self.preset.dataset) if self.preset and self.preset.dataset else None

    def segment(self, image, classes: ClassesArg | ClassSpec | None = None, background: BackgroundArg = True,
                maps: bool = True, image_id: str | None = None) -> Segmentation:
        """Segment one image (path, PIL image or uint8 ``H,W,3`` array) into ``classes``.

        ``maps=False`` returns the labels without the per-class ``scores`` and ``logits`` maps, which saves copying
        them from the GPU (most of the time per image on a GPU). ``image_id`` names the image for methods that read
        per-image inputs (CorrCLIP's pre-generated masks); a path names itself by its file stem.
        """
        return self.segment_batch([image], classes, background, maps, None if image_id is None else [image_id])[0]

    @torch.inference_mode()
    def segment_batch(self, images: list, classes: ClassesArg | ClassSpec | None = None,
                      background: BackgroundArg = True, maps: bool = True, image_ids: list[str | None] | None = None
                      ) -> list[Segmentation]:
        """Segment several images at once: their sliding windows share forward passes (useful on a GPU)."""
        spec = self.class_spec(classes, background)
        with timing.stage("text"):
            classifier = self.classifier(spec)
        if image_ids is None:
            image_ids = [Path(image).stem if isinstance(image, (str, os.PathLike)) else None for image in images]
        arrays = [load_image(image) for image in images]
        start = time.perf_counter()
        tensors = [torch.from_numpy(array).to(self.backbone.device) for array in arrays]
        results = self.method.predict_batch(self.backbone, tensors, classifier, self.protocol, image_ids)
        elapsed = (time.perf_counter() - start) / max(len(arrays), 1)
        return [self._segmentation(array, result, spec, classifier, elapsed, maps)
                for array, result in zip(arrays, results, strict=True)]

    def _segmentation(self, array: np.ndarray, result: dict, spec: ClassSpec, classifier: TextClassifier,
                      seconds: float, maps: bool) -> Segmentation:
        masks = result.get("masks")
        labels = result["labels"].to(torch.uint8 if spec.num_classes < 255 else torch.int32)
        scores = logits = None
        if maps:
            logits = max_over_names(result["logits"], classifier.query_class, spec.num_classes).float().cpu().numpy()
            scores = result["scores"].float().cpu().numpy()
        return Segmentation(
            labels=labels.cpu().numpy(),
            scores=scores,
            logits=logits,
            classes=spec.labels,
            palette=self.palette(spec),
            image=array,
            meta={
                **self.describe(spec),
                "seconds": round(seconds, 4),
                **result.get("meta", {}),
            },
            masks=None if masks is None else torch.as_tensor(masks).bool().cpu().numpy(),
        )
