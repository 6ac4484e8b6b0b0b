"""The one entry point users call: ``Segmenter(method).segment(image, classes)`` -> :class:`Segmentation`."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vocabseg.errors import UsageError
from vocabseg.io import outputs
from vocabseg.io.images import load_image
from vocabseg.methods import registry
from vocabseg.methods.base import Method, Preset
from vocabseg.models.encoder import Models
from vocabseg.models.factory import load_model
from vocabseg.pipeline import timing
from vocabseg.pipeline.postprocess import max_over_names
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.run import DenseResult, run
from vocabseg.text.classes import BACKGROUND_LABEL, BackgroundArg, ClassesArg, ClassSpec, parse_classes
from vocabseg.text.classifier import TextCache, TextClassifier


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
        """Write ``<stem>.png`` (palette labels), ``<stem>_overlay.png`` (with legend) and ``<stem>.json``; all three
        are rendered before the first is written, so a failure leaves no partial set behind."""
        directory = Path(directory)
        paths = {"labels": directory / f"{stem}.png", "overlay": directory / f"{stem}_overlay.png",
                 "json": directory / f"{stem}.json"}
        labels = outputs.label_image(self.labels, self.palette)
        overlay = None
        if self.image is not None:
            background = 0 if self.classes and self.classes[0] == BACKGROUND_LABEL else None
            overlay = outputs.overlay_with_legend(self.image, self.labels, self.classes, self.palette,
                                                  background=background)
        sidecar = self.sidecar()
        outputs.save_image(paths["labels"], labels)
        if overlay is not None:
            outputs.save_image(paths["overlay"], overlay)
        else:
            del paths["overlay"]
        outputs.write_json(paths["json"], sidecar)
        return paths


def list_methods() -> dict[str, str]:
    """Every method by name, with its one-line summary."""
    return {name: cls.summary for name, cls in registry.available().items()}


class Segmenter:
    """Segment images into any list of words with one method.

    >>> seg = Segmenter("sclip")                                    # doctest: +SKIP
    >>> out = seg.segment("photo.jpg", classes=["cat", "dog|puppy"])  # doctest: +SKIP

    ``preset`` selects a published per-benchmark protocol (``"voc21"``, ...); remaining keyword arguments override
    protocol settings (``short_side``, ``crop``, ``stride``, ``logit_scale``, ``prob_thd``, ``area_thd``, ``pamr``,
    ``pamr_steps``, ``pamr_dilations``, ``window_batch``, ``precision``) or set the method's own options (e.g.
    ``gaussian_std``); values are converted to each setting's type (``"false"`` is ``False``).

    Models: ``weights`` and ``arch`` choose the method's main model (CLIP: an open_clip tag or a local file, OpenAI
    ViT-B/16 by default); ``models`` gives any model by role, as weights (``{"dino": "dino_vitb8"}``) or as an
    already loaded model (``{"clip": clip}``). Models are loaded once per process and shared between segmenters.
    """

    def __init__(self, method: str = "sclip", weights: str | os.PathLike | None = None, arch: str | None = None,
                 device: str | torch.device | None = None, preset: str | None = None,
                 models: Mapping[str, Any] | None = None, text_cache: bool | str | os.PathLike = True,
                 backbone: Any = None, **overrides: Any):
        cls = registry.method_class(method)
        models = models_from_old_options(cls, overrides, models)
        options = set(registry.option_names(cls))
        method_kwargs = {k: v for k, v in overrides.items() if k in options}
        protocol_kwargs = {k: v for k, v in overrides.items() if k not in options}
        self.preset_name = preset
        self.preset: Preset | None = None
        if preset is not None:
            if preset not in cls.presets:
                raise UsageError(f"method {method!r} has no preset {preset!r}; "
                                 f"available: {', '.join(cls.presets) or 'none'}")
            self.preset = cls.presets[preset]
            method_kwargs = {**self.preset.options, **method_kwargs}
        self.method: Method = registry.create(method, **method_kwargs)
        base = self.preset.protocol if self.preset else cls.default_protocol
        unknown = sorted(set(protocol_kwargs) - {f.name for f in dataclasses.fields(Protocol)})
        roles = [name for name in unknown if name in cls.models]
        if roles:
            raise UsageError(f"{', '.join(roles)} is a model of {method}, not an option: pass --model "
                             f"{roles[0]}=WEIGHTS (Python: models={{{roles[0]!r}: WEIGHTS}})")
        if unknown:
            raise UsageError(f"unknown setting(s) {', '.join(unknown)}: neither a protocol setting nor an option of "
                             f"{method!r} (its options: {', '.join(sorted(options)) or 'none'})")
        self.protocol: Protocol = base.replace(**protocol_kwargs)
        if backbone is not None:
            warnings.warn("Segmenter(backbone=...) is deprecated; pass models={'clip': ...}", DeprecationWarning,
                          stacklevel=2)
            models = {"clip": backbone, **(models or {})}
        self.models = load_models(cls, weights, arch, device, models)
        self.method.check_models(self.models)
        self.method.check_protocol(self.models, self.protocol)
        if text_cache is True:
            self.text_cache: TextCache | None = TextCache()
        elif text_cache:
            self.text_cache = TextCache(text_cache)
        else:
            self.text_cache = None
        self._classifiers: dict[ClassSpec, TextClassifier] = {}

    @property
    def device(self) -> torch.device:
        return self.models.device

    def class_spec(self, classes: ClassesArg | ClassSpec | None = None, background: BackgroundArg = True
                   ) -> ClassSpec:
        """The classes to use: given ones, or the preset's benchmark classes when none are given."""
        if isinstance(classes, ClassSpec):
            return classes
        if classes is None:
            if self.preset is None or self.preset.dataset is None:
                raise UsageError("no classes given: pass classes (e.g. ['cat', 'dog']) or a benchmark preset")
            return self.preset.class_spec()
        return parse_classes(classes, background)

    def classifier(self, spec: ClassSpec) -> TextClassifier:
        """The text classifier of ``spec`` (memoised in memory, cached on disk)."""
        if spec not in self._classifiers:
            self._classifiers[spec] = self.method.text_classifier(self.models, spec, self.text_cache)
        return self._classifiers[spec]

    def describe(self, spec: ClassSpec) -> dict[str, Any]:
        """What produced a result: method and its options, preset, protocol, query names and every model."""
        return {
            "method": self.method.name,
            "method_options": _plain(self.method.options()),
            "preset": self.preset_name,
            "protocol": dataclasses.asdict(self.protocol),
            "names": [list(n) for n in spec.names],
            "models": self.models.describe(),
        }

    def palette(self, spec: ClassSpec) -> np.ndarray:
        from vocabseg.data.classes import CLASSES, palette

        preset_dataset = self.preset.dataset if self.preset else None
        same = preset_dataset is not None and CLASSES.get(preset_dataset) == spec.labels
        return palette(preset_dataset if same else None, spec.num_classes)

    def segment(self, image, classes: ClassesArg | ClassSpec | None = None, background: BackgroundArg = True,
                maps: bool = True, image_id: str | None = None) -> Segmentation:
        """Segment one image (path, PIL image or uint8 ``H,W,3`` array) into ``classes``.

        ``maps=False`` returns the labels without the per-class ``scores`` and ``logits`` maps, which saves copying
        them from the GPU (most of the time per image on a GPU). ``image_id`` names the image for methods that read
        per-image inputs (CorrCLIP's pre-generated masks); a path names itself by its file stem.
        """
        return self.segment_batch([image], classes, background, maps, None if image_id is None else [image_id])[0]

    def segment_batch(self, images: list, classes: ClassesArg | ClassSpec | None = None,
                      background: BackgroundArg = True, maps: bool = True, image_ids: list[str | None] | None = None
                      ) -> list[Segmentation]:
        """Segment several images at once: their sliding windows share forward passes (useful on a GPU)."""
        spec = self.class_spec(classes, background)
        arrays = [load_image(image) for image in images]
        if image_ids is None:
            image_ids = [Path(image).stem if isinstance(image, (str, os.PathLike)) else None for image in images]
        start = time.perf_counter()
        results = self.results(arrays, spec, image_ids=image_ids)
        elapsed = (time.perf_counter() - start) / max(len(arrays), 1)
        classifier = self.classifier(spec)
        return [self._segmentation(array, result, spec, classifier, elapsed, maps)
                for array, result in zip(arrays, results, strict=True)]

    @torch.inference_mode()
    def results(self, images: list, classes: ClassesArg | ClassSpec | None = None, background: BackgroundArg = True,
                image_ids: list[str | None] | None = None) -> list[DenseResult]:
        """The pipeline's typed results on the device: per-query raw ``logits`` ``Q,H,W`` (each name of each class),
        class ``scores``, ``labels`` and ``masks`` (for research and checks; :meth:`segment_batch` builds on it)."""
        spec = self.class_spec(classes, background)
        with timing.stage("text"):
            classifier = self.classifier(spec)
        tensors = [torch.from_numpy(load_image(image)).to(self.device) for image in images]
        return run(self.method, self.models, tensors, classifier, self.protocol, image_ids)

    def _segmentation(self, array: np.ndarray, result: DenseResult, spec: ClassSpec, classifier: TextClassifier,
                      seconds: float, maps: bool) -> Segmentation:
        labels = result.labels.to(torch.uint8 if spec.num_classes < 255 else torch.int32)
        scores = logits = None
        if maps:
            logits = max_over_names(result.logits, classifier.query_class, spec.num_classes).float().cpu().numpy()
            scores = result.scores.float().cpu().numpy()
        return Segmentation(
            labels=labels.cpu().numpy(),
            scores=scores,
            logits=logits,
            classes=spec.labels,
            palette=self.palette(spec),
            image=array,
            meta={**self.describe(spec), "seconds": round(seconds, 4), **result.meta},
            masks=None if result.masks is None else result.masks.bool().cpu().numpy(),
        )


def load_models(method: type[Method], weights: str | os.PathLike | None, arch: str | None,
                device: str | torch.device | None, given: Mapping[str, Any] | None) -> Models:
    """The models ``method`` declares, by role: ``given`` ones (weights, or loaded models used as they are), else
    its defaults; ``weights``/``arch`` choose its first (main) model. Loaded once per process (the factory's)."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(method.models))
    if unknown:
        raise UsageError(f"{method.name} has no model role(s) {', '.join(unknown)}; its roles: "
                         f"{', '.join(method.models)}")
    ready = {role: value for role, value in given.items() if not isinstance(value, (str, os.PathLike))}
    if device is None and ready:
        device = next(iter(ready.values())).device
    main = next(iter(method.models))
    loaded = {}
    for role, slot in method.models.items():
        if role in ready:
            loaded[role] = ready[role]
            continue
        choice = given.get(role, weights if role == main and weights is not None else slot.default)
        loaded[role] = load_model(slot.kind, choice, device, arch if role == main else None)
    return Models(loaded)


def models_from_old_options(method: type[Method], overrides: dict[str, Any], models: Mapping[str, Any] | None
                            ) -> Mapping[str, Any] | None:
    """Move the options older releases took for a model's weights (:attr:`ModelSlot.option`, e.g. ``checkpoint=``)
    out of ``overrides`` into ``models`` (explicit ``models`` win), with a deprecation warning."""
    moved = {}
    for role, slot in method.models.items():
        if slot.option and slot.option in overrides:
            value = overrides.pop(slot.option)
            warnings.warn(f"{method.name}: {slot.option}= is deprecated; pass models={{{role!r}: ...}} "
                          f"(--model {role}=...)", DeprecationWarning, stacklevel=3)
            if value is not None:
                moved[role] = value
    return {**moved, **(models or {})} or None


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Option values as JSON-friendly data (paths and other objects by their text)."""
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list, tuple, dict)) else str(v)
            for k, v in options.items()}
