"""FLOSS template rankings: the data format, its loader, the official files, and the ranking stage.

**Format** (the official ``rankings/<model>/template_rankings_<model>_<dataset>.json``, also what ``vocabseg
floss-rank`` writes)::

    {"model": "naclip", "dataset": "pascalvoc20", "split": "train",
     "classes": {"<class label without spaces>": {"entropy_ranking": [
         {"template_id": 55, "entropy": 0.28, "pixel_percentage": 62.3, "rank": 1}, ...80 entries...]}}}

Per class, the 80 ImageNet templates sorted by ascending mean entropy of the pixels the single-template classifier
assigns to that class; ``pixel_percentage`` is the share of all pixels (over the image set) it assigned to the
class. A template that never predicts the class has entropy 0 and percentage 0, so it sorts *first*: readers must
skip entries with ``pixel_percentage == 0`` (:meth:`TemplateRankings.templates` does).

**Official files**: the FLOSS repository ships rankings computed on the training splits for NACLIP, MaskCLIP and
CLIP-DINOiser and the datasets ``pascalvoc20``, ``pascalco59``, ``cityscapes``, ``ade20k``, ``cocostuff``. They are
not redistributed here (the repository has no licence): :func:`official_rankings` downloads one from the pinned
commit into the torch hub cache, or read a copy with :meth:`TemplateRankings.load`.

**Ranking stage** (:func:`rank_templates`): per image, for each template ``t`` a classifier of every query built
from ``t`` alone, the base method's merged logits at original size (PAMR when the protocol has it),
``softmax(logit_scale * .)`` over the queries, the maximum over each class's names (not renormalised), the argmax
class per pixel and per class the mean entropy ``-sum_c p_c log(p_c + 1e-10)`` of its pixels
(:func:`entropy_statistics`); over the images, sums of ``mean * count`` and of counts; :func:`rankings_from_statistics`
sorts. It needs unlabelled images of the target domain only. Class keys lose their spaces (official behaviour);
lookups here remove spaces too, so multi-word classes work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from vocabseg.errors import UsageError
from vocabseg.methods.base import Method
from vocabseg.models.checkpoints import WeightsError
from vocabseg.models.encoder import Models, TextEncoder
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.windows import upsample
from vocabseg.text.classes import ClassSpec
from vocabseg.text.classifier import TextCache, TextClassifier, embed_names
from vocabseg.text.templates import IMAGENET_TEMPLATES

#: The FLOSS commit whose shipped rankings :func:`official_rankings` downloads.
OFFICIAL_COMMIT = "ccf1d49dba37d0e35316dc50be57d133745a168a"
OFFICIAL_URL = ("https://raw.githubusercontent.com/yasserben/FLOSS/{commit}/rankings/{model}/"
                "template_rankings_{model}_{dataset}.json")
#: Models and datasets the official repository ships rankings for.
OFFICIAL_MODELS = ("naclip", "maskclip", "clipdinoiser")
OFFICIAL_DATASETS = ("pascalvoc20", "pascalco59", "cityscapes", "ade20k", "cocostuff")
ENTROPY_EPS = 1e-10


class TemplateScore(NamedTuple):
    template_id: int
    entropy: float
    pixel_percentage: float


def ranking_key(name: str) -> str:
    """A class name as the official ranking stage writes it: spaces removed."""
    return name.replace(" ", "")


@dataclass(frozen=True)
class TemplateRankings:
    """Per class key (:func:`ranking_key`), the templates in ranking order with their entropy and pixel share."""

    classes: Mapping[str, tuple[TemplateScore, ...]]
    model: str = ""
    dataset: str = ""
    split: str = "train"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TemplateRankings:
        try:
            classes = {
                key: tuple(TemplateScore(int(e["template_id"]), float(e["entropy"]), float(e["pixel_percentage"]))
                           for e in sorted(entry["entropy_ranking"], key=lambda e: e.get("rank", 0)))
                for key, entry in data["classes"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"not a FLOSS template ranking (missing or bad {exc}); expected the official JSON "
                             "layout (see vocabseg.methods.floss.rankings)") from None
        return cls(classes, str(data.get("model", "")), str(data.get("dataset", "")), str(data.get("split", "train")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TemplateRankings:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"template rankings file not found: {path}")
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "dataset": self.dataset, "split": self.split, "classes": {
            key: {"entropy_ranking": [{"template_id": s.template_id, "entropy": s.entropy,
                                       "pixel_percentage": s.pixel_percentage, "rank": rank}
                                      for rank, s in enumerate(scores, start=1)]}
            for key, scores in self.classes.items()}}

    def save(self, path: str | os.PathLike) -> None:
        from vocabseg.io.outputs import write_json

        write_json(Path(path), self.to_json())

    def templates(self, name: str, top_n: int) -> tuple[int, ...] | None:
        """The first ``top_n`` templates of class ``name`` that predicted any pixel; ``None`` when the ranking has
        no such class (an empty tuple when none of its templates predicted a pixel)."""
        scores = self.classes.get(ranking_key(name))
        if scores is None:
            return None
        return tuple(s.template_id for s in scores if s.pixel_percentage > 0)[:top_n]


def official_rankings(model: str, dataset: str, cache_dir: str | os.PathLike | None = None) -> TemplateRankings:
    """The ranking the official FLOSS repository ships for ``model`` and ``dataset`` (downloaded once, cached under
    the torch hub folder)."""
    if model not in OFFICIAL_MODELS or dataset not in OFFICIAL_DATASETS:
        raise UsageError(f"the FLOSS repository ships rankings for models {', '.join(OFFICIAL_MODELS)} and datasets "
                         f"{', '.join(OFFICIAL_DATASETS)} (asked: {model}/{dataset})")
    root = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "vocabseg_floss"
    file = root / OFFICIAL_COMMIT[:12] / model / f"template_rankings_{model}_{dataset}.json"
    if not file.is_file():
        url = OFFICIAL_URL.format(commit=OFFICIAL_COMMIT, model=model, dataset=dataset)
        file.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(file), progress=False)
        except OSError as exc:
            raise WeightsError(f"could not download the official FLOSS ranking {url} ({exc}). Download it on a machine "
                             f"with internet and pass rankings=<file>, or compute one with `vocabseg floss-rank`.") \
                from None
    return TemplateRankings.load(file)


def resolve_rankings(value: Any, base_name: str) -> TemplateRankings | None:
    """The ``rankings`` option: ``None``, a :class:`TemplateRankings`, its JSON dict, a file path,
    ``official:<model>/<dataset>`` or ``official:<dataset>`` (the official file of ``base_name``)."""
    if value is None or isinstance(value, TemplateRankings):
        return value
    if isinstance(value, Mapping):
        return TemplateRankings.from_json(value)
    text = str(value)
    if not text.startswith("official:"):
        return TemplateRankings.load(os.path.expanduser(text))
    model, _, dataset = text.removeprefix("official:").rpartition("/")
    if not model:
        if base_name not in OFFICIAL_MODELS:
            raise UsageError(f"the FLOSS repository ships no rankings for {base_name!r} (only for "
                             f"{', '.join(OFFICIAL_MODELS)}): compute them with `vocabseg floss-rank --method "
                             f"{base_name}`, or borrow NACLIP's with rankings=official:naclip/{dataset}")
        model = base_name
    return official_rankings(model, dataset)


# --- the ranking stage ------------------------------------------------------------------------------------------

def entropy_statistics(probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``C,H,W`` of one image -> per class (mean entropy x pixel count, pixel count) over the
    pixels whose argmax is that class (official ``EntropyMetric.process``: float32 means, float64 sums)."""
    labels = probs.max(dim=0).indices  # the first maximum, as argmax (and much faster over the class dimension)
    entropy = -(probs * torch.log(probs + ENTROPY_EPS)).sum(dim=0)
    counts = torch.bincount(labels.flatten(), minlength=probs.shape[0]).cpu().numpy().astype(np.float64)
    sums = np.zeros(probs.shape[0], dtype=np.float64)
    for c in np.flatnonzero(counts):
        sums[c] = np.float64(float(entropy[labels == c].mean()) * counts[c])
    return sums, counts


def rankings_from_statistics(entropy_sum: np.ndarray, pixel_count: np.ndarray, total_pixels: float,
                             labels: Sequence[str], model: str = "", dataset: str = "") -> TemplateRankings:
    """Rankings from ``T,C`` sums of entropy x count and pixel counts over ``total_pixels``: per class the templates
    by ascending mean entropy (stable: ties keep template order; classes never predicted have entropy 0)."""
    classes = {}
    for c, label in enumerate(labels):
        scores = [TemplateScore(t, float(entropy_sum[t, c]) / float(pixel_count[t, c]) if pixel_count[t, c] else 0.0,
                                float(pixel_count[t, c]) / float(total_pixels) * 100 if pixel_count[t, c] else 0.0)
                  for t in range(entropy_sum.shape[0])]
        classes[ranking_key(label)] = tuple(sorted(scores, key=lambda s: s.entropy))
    return TemplateRankings(classes, model, dataset)


def template_classifiers(text_encoder: TextEncoder, spec: ClassSpec, templates: Sequence[str] = IMAGENET_TEMPLATES,
                         cache: TextCache | None = None) -> torch.Tensor:
    """One classifier per template: ``T,Q,E`` (each query's prompt with that template alone, normalised)."""
    return torch.stack([embed_names(text_encoder, spec.queries, (template,), cache) for template in templates])


def template_class_probabilities(method: Method, models: Models, image: torch.Tensor, classifiers: torch.Tensor,
                                 spec: ClassSpec, protocol: Protocol, templates_per_pass: int
                                 ) -> Iterable[torch.Tensor]:
    """Per template, the class probabilities ``C,H,W`` of a uint8 ``H,W,3`` image under ``method`` and ``protocol``
    (the method's own pipeline hooks): merged logits at original size, PAMR if the protocol asks, softmax over the
    queries, max over names. ``templates_per_pass`` classifiers share a pass (they must not when the method's
    features depend on the text)."""
    prepared = method.prepare(models, image, protocol)
    query_class = torch.tensor(spec.query_class, device=classifiers.device)
    for start in range(0, classifiers.shape[0], templates_per_pass):
        chunk = classifiers[start:start + templates_per_pass]
        together = TextClassifier(spec, chunk.reshape(-1, chunk.shape[-1]), query_class.repeat(len(chunk)))
        dense = method.dense(models, [prepared], together, protocol)[0]
        logits = upsample(dense.logits, prepared.size)
        for per_template, embeddings in zip(logits.split(len(spec.queries)), chunk, strict=True):
            classifier = TextClassifier(spec, embeddings, query_class)
            scores, _ = method.scores_and_labels(per_template, prepared, dense, classifier, protocol)
            yield scores


@torch.inference_mode()
def rank_templates(method: Method, models: Models, images: Iterable, spec: ClassSpec, protocol: Protocol,
                   cache: TextCache | None = None, queries_per_pass: int = 256, model: str = "", dataset: str = "",
                   progress: Callable[[int], None] | None = None) -> TemplateRankings:
    """FLOSS's ranking stage over unlabelled ``images`` (paths, PIL images or uint8 arrays) for ``method`` (the base
    of the FLOSS composition, with its ``models``) under ``protocol``. Templates share a pass up to
    ``queries_per_pass`` text queries, except for a method whose features depend on the text (one template per
    pass)."""
    from vocabseg.io.images import load_image

    classifiers = template_classifiers(models.clip.text, spec, IMAGENET_TEMPLATES, cache)
    text_dependent = type(method).text_patch_features is not Method.text_patch_features
    per_pass = 1 if text_dependent else max(1, queries_per_pass // len(spec.queries))
    entropy_sum = np.zeros((len(IMAGENET_TEMPLATES), spec.num_classes), dtype=np.float64)
    pixel_count = np.zeros_like(entropy_sum)
    total_pixels = 0.0
    for index, source in enumerate(images):
        image = torch.from_numpy(load_image(source)).to(models.device)
        total_pixels += float(image.shape[0] * image.shape[1])
        probabilities = template_class_probabilities(method, models, image, classifiers, spec, protocol, per_pass)
        for t, probs in enumerate(probabilities):
            sums, counts = entropy_statistics(probs)
            entropy_sum[t] += sums
            pixel_count[t] += counts
        if progress:
            progress(index + 1)
    if not total_pixels:
        raise UsageError("no images to rank the templates on")
    return rankings_from_statistics(entropy_sum, pixel_count, total_pixels, spec.labels, model, dataset)
