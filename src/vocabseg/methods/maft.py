"""MAFT inference (spec A.6): IP-CLIP classifies every proposal once; scores become a label map.

``S_c(x) = sum_i A_ic M_i(x) / sum_i M_i(x)``; pixels covered by no proposal (every ``M_i(x) < 0.5``) take the
scores of a dense training-free method (``fill``). With generator scores ``A^p`` and ``ensemble`` (λ) > 0 the
proposal scores are the geometric ensemble of the released code (or the paper's, ``ensemble_formula="paper"``).
Fine-tuned IP-CLIP weights are ordinary CLIP weights (``vocabseg convert maft-checkpoint`` or ``train maft``);
the base CLIP weights give the no-fine-tune ablation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vocabseg.engine import inference, postprocess
from vocabseg.engine.text import IMAGENET_TEMPLATES, TextCache, TextClassifier
from vocabseg.maft.ipclip import IPCLIP, VILD_TEMPLATES, prepare_image
from vocabseg.maft.proposals import generate_proposals
from vocabseg.methods.base import Method, Preset, Protocol, create_method, register

_PRESET_DATASETS = ("voc20", "pc59", "pc459", "coco-stuff", "ade150", "ade847")


def ensemble_scores(ap: torch.Tensor, ac: torch.Tensor, seen: torch.Tensor, weight: float, formula: str = "code"
                    ) -> torch.Tensor:
    """Geometric ensemble of generator scores ``A^p`` and IP-CLIP scores ``A^c`` (both ``N,C``), λ = ``weight``.

    Seen classes: ``Ap^λ Ac^(1-λ)``. Unseen: ``Ap^(1-λ) Ac^λ`` (released code) or ``Ac^λ`` (paper, eq. 9).
    ``weight <= 0`` returns ``A^c`` (the code's branch for λ = 0).
    """
    if weight <= 0:
        return ac
    if formula not in ("code", "paper"):
        raise ValueError(f"ensemble_formula must be 'code' or 'paper' (got {formula!r})")
    seen_scores = ap ** weight * ac ** (1 - weight)
    unseen_scores = ac ** weight if formula == "paper" else ap ** (1 - weight) * ac ** weight
    return torch.where(seen.to(ac.device)[None], seen_scores, unseen_scores)


def seen_classes(labels, split: str) -> torch.Tensor:
    """Boolean ``C``: the classes of ``labels`` that are seen in dataset ``split``'s zero-shot split (all unseen
    when ``split`` is empty, as the released code without a flag)."""
    if not split:
        return torch.zeros(len(labels), dtype=torch.bool)
    from vocabseg.data.classes import CLASSES, ZERO_SHOT_SPLITS

    if split not in ZERO_SHOT_SPLITS:
        raise ValueError(f"no zero-shot split for {split!r}; known: {', '.join(ZERO_SHOT_SPLITS)}")
    names = CLASSES[split]
    seen = {n for i, n in enumerate(names) if i not in set(ZERO_SHOT_SPLITS[split]["unseen"])}
    return torch.tensor([label in seen for label in labels], dtype=torch.bool)


@register
@dataclass
class MAFT(Method):
    name: ClassVar[str] = "maft"
    summary: ClassVar[str] = "MAFT IP-CLIP proposal classification (any proposal source, dense fill)"
    default_protocol: ClassVar[Protocol] = Protocol()
    presets: ClassVar[dict[str, Preset]] = {d: Preset(Protocol(), d, "cliptrase") for d in _PRESET_DATASETS}
    vit_passes_per_crop: ClassVar[int] = 1

    proposals: str = "kmeans"
    proposal_file: str = ""
    sam_weights: str = ""
    start_layer: int = -1  # -1: two thirds of the blocks (8 of 12, 16 of 24)
    input_size: int = 480
    mask_threshold: float = 0.5
    keep_small: bool = True
    attention: str = "split"
    temperature: float = 100.0
    templates: str = "vild"
    fill: str = "sclip"
    ensemble: float = 0.0
    ensemble_formula: str = "code"
    seen_split: str = ""

    def build_classifier(self, backbone, spec, cache):
        if self.templates not in ("vild", "imagenet"):
            raise ValueError(f"templates must be 'vild' or 'imagenet' (got {self.templates!r})")
        templates = VILD_TEMPLATES if self.templates == "vild" else IMAGENET_TEMPLATES
        return TextClassifier.build(backbone, spec, templates=templates, cache=cache)

    def encoder(self, backbone) -> IPCLIP:
        return IPCLIP(backbone, None if self.start_layer < 0 else self.start_layer, self.mask_threshold,
                      self.keep_small, self.attention)

    @torch.inference_mode()
    def proposal_scores(self, backbone, image: torch.Tensor, masks: torch.Tensor, classifier: TextClassifier
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-proposal query logits ``N,Q`` (cosine) and class probabilities ``A^c`` ``N,C`` of masks ``N,H,W``."""
        x = prepare_image(image, self.input_size).to(backbone.device)
        embeddings = self.encoder(backbone).encode(x, masks[None].to(x.device))[0]
        logits = embeddings @ classifier.embeddings.to(embeddings.dtype).T
        probs = postprocess.class_scores(logits.T, classifier.query_class, classifier.spec.num_classes,
                                         self.temperature)
        return logits, probs.T

    def _fill_prediction(self, backbone, image, classifier, protocol) -> dict:
        method = create_method(self.fill)
        key = ("fill", self.fill, classifier.spec)
        if key not in self._cache:
            self._cache[key] = method.build_classifier(backbone, classifier.spec, TextCache())
        return method.predict(backbone, image, self._cache[key], protocol)

    @torch.inference_mode()
    def predict(self, backbone, image: torch.Tensor, classifier: TextClassifier, protocol: Protocol) -> dict:
        height, width = image.shape[:2]
        spec = classifier.spec
        proposals = generate_proposals(self.proposals, backbone, image, classifier, self.proposal_file,
                                       self.sam_weights)
        masks = proposals.masks.to(backbone.device).float()
        if tuple(masks.shape[-2:]) != (height, width):
            raise ValueError(f"proposal masks are {tuple(masks.shape[-2:])}, the image is {(height, width)}")
        num_queries = classifier.embeddings.shape[0]
        scores = torch.zeros(spec.num_classes, height, width, device=backbone.device)
        logits = torch.zeros(num_queries, height, width, device=backbone.device)
        if len(masks):
            with inference.autocast(protocol.precision, backbone.device):
                query_logits, probs = self.proposal_scores(backbone, image, masks, classifier)
            query_logits, probs = query_logits.float(), probs.float()
            if proposals.scores is not None:
                if proposals.scores.shape[1] != spec.num_classes:
                    raise ValueError(f"proposal scores have {proposals.scores.shape[1]} classes, "
                                     f"the class list has {spec.num_classes}")
                probs = ensemble_scores(proposals.scores.to(probs), probs, seen_classes(spec.labels, self.seen_split),
                                        self.ensemble, self.ensemble_formula)
            mass = masks.sum(0).clamp_min(1e-6)
            scores = torch.einsum("nc,nhw->chw", probs, masks) / mass
            logits = torch.einsum("nq,nhw->qhw", query_logits, masks) / mass
        uncovered = ~(masks >= 0.5).any(0) if len(masks) else torch.ones(height, width, dtype=torch.bool,
                                                                          device=backbone.device)
        if uncovered.any():
            dense = self._fill_prediction(backbone, image, classifier, protocol)
            scores = torch.where(uncovered, dense["scores"].to(scores), scores)
            logits = torch.where(uncovered, dense["logits"].to(logits), logits)
        labels = postprocess.labels_from_scores(scores, protocol.prob_thd, protocol.area_thd, spec.has_background)
        return {"logits": logits, "scores": scores, "labels": labels}
