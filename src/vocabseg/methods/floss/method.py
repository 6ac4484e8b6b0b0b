"""FLOSS (Benigmim et al., ICCV 2025): per-class expert templates chosen by entropy, fused; a plug-in on any base
whose logits are patch features against the text (``naclip+floss``; ``sclip+floss``, ``clearclip+floss``,
``naclip+resclip+floss``, ...; ``floss`` alone is ``naclip+floss``).

As the official NACLIP segmentor of yasserben/FLOSS (``ccf1d49``, ``mode='fusion'``) computes it:

* Text (:func:`query_templates`, :meth:`FLOSS.text_classifier`): for every query word ``e`` the first ``top_n``
  (4) templates of its class's entropy ranking that predicted any pixel (:mod:`.rankings`); expert ``e`` is a
  classifier of *all* queries built from those templates (per prompt normalised, averaged, normalised); the
  default classifier (the base's, 80 templates) comes last: the classifier is ``E+1,Q,D`` with ``E = Q``.
* Per window (:meth:`FLOSS.crop_logits`): the base's patch features (computed once, with the default classifier
  where they depend on the text), cosines with every classifier, ``softmax(expert_logit_scale * .)`` over the
  queries on the patch grid, then :func:`expert_fusion` at window resolution.
* The harness averages the fused probabilities over windows, upsamples them, and its post-processing applies
  ``softmax(logit_scale * .)`` to them a second time and the max over names (the official behaviour: the
  ``logits`` of a FLOSS result are fused probabilities).

Presets are FLOSS's NACLIP configs (no background: voc20 whole image, pc59 / ade150 / coco-stuff / cityscapes
sliding windows; ``logit_scale`` 100; no PAMR, no ``prob_thd``) with the official rankings of the benchmark
(``rankings="official:<dataset>"``, downloaded once; NACLIP and MaskCLIP bases only). Any other base needs its own
rankings: ``vocabseg floss-rank`` computes them from unlabelled images of the target domain.

Differences from the official code, all where the official code fails: rankings are looked up by the query's class
label, then the query word, spaces removed (the official code looks the query word up as is and fails on multi-word
names outside its hard-coded VOC20 renames, which this lookup reproduces); a class of the ranking file that no query
uses is not checked; ``unranked="default"`` gives an expert with no usable templates the default classifier (the
official code raises, as ``unranked="error"`` does). The official code has one ``logit_scale``; here the experts'
softmax has its own (``expert_logit_scale``, 100), so ``--logit-scale`` changes only the final softmax.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import Method, Preset
from vocabseg.methods.composition import Plugin, register_plugin
from vocabseg.methods.floss.rankings import TemplateRankings, resolve_rankings
from vocabseg.methods.last_block.method import NACLIP
from vocabseg.pipeline import timing
from vocabseg.pipeline.protocol import Protocol
from vocabseg.text.classes import ClassSpec
from vocabseg.text.classifier import TextClassifier, embed_names
from vocabseg.text.templates import IMAGENET_TEMPLATES


def query_templates(rankings: TemplateRankings, spec: ClassSpec, top_n: int = 4) -> list[tuple[int, ...] | None]:
    """Per query, its expert templates: the first ``top_n`` with pixels in the ranking of the query's class label,
    else of the query word (spaces removed); ``None`` where neither is ranked or no template has pixels."""
    found = []
    for query, c in zip(spec.queries, spec.query_class, strict=True):
        for name in (spec.labels[c], query):
            templates = rankings.templates(name, top_n)
            if templates is not None:
                break
        found.append(templates or None)
    return found


def expert_fusion(expert_probs: torch.Tensor, default_probs: torch.Tensor, size: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """FLOSS's fusion (official ``expert_fusion``) at window resolution.

    ``expert_probs`` ``B,E,Q,gh,gw`` (expert ``e`` is the expert of query ``e``) and ``default_probs`` ``B,Q,gh,gw``
    are upsampled bilinearly to ``size``; expert ``e`` claims the pixels where its argmax query is ``e``. A pixel
    claimed by no expert takes the default probabilities, one claimed by one or more takes the vector of the claiming
    expert with the highest own probability (the first on ties). Returns the fused probabilities ``B,Q,h,w`` and the
    number of claiming experts ``B,h,w``.
    """
    def upsample(maps):
        return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)

    fused = upsample(default_probs)
    best = torch.full_like(fused[:, 0], -1.0)
    claims = torch.zeros(best.shape, dtype=torch.int64, device=best.device)
    for e in range(expert_probs.shape[1]):
        probs = upsample(expert_probs[:, e])
        claim = probs.max(dim=1).indices == e  # the first maximum, as argmax (and 4x faster over channels)
        claims += claim
        better = claim & (probs[:, e] > best)
        best = torch.where(better, probs[:, e], best)
        fused = torch.where(better[:, None], probs, fused)
    return fused, claims


def expert_probabilities(features: torch.Tensor, grid: tuple[int, int], classifiers: torch.Tensor,
                         logit_scale: float) -> torch.Tensor:
    """Patch features ``B,N,D`` and classifiers ``K,Q,D`` -> ``softmax(logit_scale * cos)`` over the queries on the
    patch grid: ``B,K,Q,gh,gw``."""
    b, n, _ = features.shape
    k, q, d = classifiers.shape
    cosines = (features @ classifiers.reshape(k * q, d).T).reshape(b, n, k, q)
    probs = torch.softmax(cosines * logit_scale, dim=-1)
    return probs.permute(0, 2, 3, 1).reshape(b, k, q, *grid)


@register_plugin
@dataclass
class FLOSS(Plugin):
    """FLOSS on a base: per-query expert classifiers from entropy-ranked templates, fused per pixel."""

    name: ClassVar[str] = "floss"
    summary: ClassVar[str] = ("entropy-ranked expert templates per class, fused per pixel, a plug-in "
                              "(Benigmim et al. 2025)")
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "floss")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "floss")
    default_base: ClassVar[type[Method]] = NACLIP

    #: A file, ``official:[<model>/]<dataset>``, or the rankings as data (:class:`TemplateRankings` or its JSON).
    rankings: str | os.PathLike | TemplateRankings | Mapping[str, Any] | None = None
    top_n: int = 4
    unranked: Literal["error", "default"] = "error"
    expert_logit_scale: float = 100.0

    def __post_init__(self):
        super().__post_init__()
        if self.top_n < 1:
            raise UsageError(f"top_n must be at least 1 (got {self.top_n})")
        self._rankings = resolve_rankings(self.rankings, self.base.name)

    def options(self) -> dict[str, Any]:
        """The option values, with rankings given as data (not a file or official name) described in words, so the
        description stays small and JSON."""
        options = super().options()
        rankings = self._rankings
        if rankings is not None and not isinstance(self.rankings, str):
            options["rankings"] = (str(self.rankings) if isinstance(self.rankings, os.PathLike) else
                                   f"given as data: {len(rankings.classes)} classes, model {rankings.model or '?'}, "
                                   f"dataset {rankings.dataset or '?'}")
        return options

    @classmethod
    def check_base(cls, base: type[Method]) -> None:
        own_flow = any(getattr(base, hook) is not getattr(Method, hook) for hook in ("crop_logits", "dense", "prepare"))
        if own_flow:
            raise UsageError(f"floss needs a base whose logits are its patch features against the text in the common "
                             f"pipeline; {base.name!r} computes them its own way")

    @property
    def crop_multiple(self) -> int:  # type: ignore[override]
        return self.base.crop_multiple

    @property
    def views_per_crop(self) -> int:  # type: ignore[override]
        return self.base.views_per_crop

    def expert_templates(self, spec: ClassSpec) -> list[tuple[int, ...] | None]:
        """The expert templates of each query of ``spec`` (see :func:`query_templates`); raises for an unranked
        query unless ``unranked="default"``."""
        if self._rankings is None:
            raise UsageError("floss needs template rankings: pass rankings=<file> (from `vocabseg floss-rank` or the "
                             "official repository), rankings=official:<dataset>, or use a preset (e.g. voc20)")
        found = query_templates(self._rankings, spec, self.top_n)
        missing = [q for q, t in zip(spec.queries, found, strict=True) if t is None]
        if missing and self.unranked == "error":
            raise UsageError(f"no ranked template with pixels for {', '.join(map(repr, missing))} in the rankings "
                             f"{self._rankings.dataset or ''}; rank these classes (`vocabseg floss-rank`) or pass "
                             "unranked=default to give them the default classifier")
        return found

    def text_classifier(self, models, spec, cache):
        """``E+1,Q,D`` embeddings: the expert classifier of each query, then the base's default classifier."""
        default = self.base.text_classifier(models, spec, cache)
        experts: dict[tuple[int, ...], torch.Tensor] = {}
        rows = []
        for templates in self.expert_templates(spec):
            if templates is None:
                rows.append(default.embeddings)
                continue
            if templates not in experts:
                prompts = tuple(IMAGENET_TEMPLATES[t] for t in templates)
                experts[templates] = embed_names(models.clip.text, spec.queries, prompts, cache)
            rows.append(experts[templates])
        embeddings = torch.stack([*rows, default.embeddings])
        return TextClassifier(spec=spec, embeddings=embeddings, query_class=default.query_class)

    def crop_logits(self, models, crops, text):
        """Fused probabilities ``B,Q,h,w`` of crops ``B,3,h,w`` for the classifiers ``text`` ``E+1,Q,D``."""
        features, grid = self.base.text_patch_features(models, crops, text[-1])
        with timing.stage("floss fusion"):
            probs = expert_probabilities(features, grid, text.to(features.dtype), self.expert_logit_scale)
            fused, _ = expert_fusion(probs[:, :-1], probs[:, -1], tuple(crops.shape[-2:]))
        return fused
