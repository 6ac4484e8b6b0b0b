"""MAFT inference (spec A.6): IP-CLIP classifies every proposal once; scores become a label map.

As the released code: the image (resized to ``test_size`` when set) is normalised, zero-padded to a multiple of
``size_divisibility`` and squashed to ``input_size`` squared for IP-CLIP. Each proposal's class scores ``A`` (IP-CLIP's
``A^c``, the generator's ``A^p``, or their geometric ensemble, λ = ``ensemble``) weight its soft mask:
``S_c(x) = sum_i A_ic M_i(x)`` (``aggregate="mean"`` divides by ``sum_i M_i(x)``), resized to the photo's size;
labels are the argmax. Pixels covered by no proposal (every ``M_i(x) < 0.5``) take the scores of a dense
training-free method (``fill``; ``none`` keeps the code's argmax of the sums there). Fine-tuned IP-CLIP weights are
ordinary CLIP weights (``vocabseg convert maft-checkpoint`` or ``train maft``); the base CLIP weights give the
no-fine-tune ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vocabseg.methods.base import Method, Preset, Protocol, as_bool, create_method, register
from vocabseg.methods.maft.ipclip import IPCLIP, VILD_TEMPLATES, padded_size, prepare_image, resize_shortest_edge
from vocabseg.methods.maft.proposals import Proposals, generate_proposals
from vocabseg.pipeline import inference, postprocess
from vocabseg.text.classifier import IMAGENET_TEMPLATES, TextCache, TextClassifier

_PRESET_DATASETS = ("voc20", "pc59", "pc459", "coco-stuff", "ade150", "ade847")


def ensemble_scores(ap: torch.Tensor, ac: torch.Tensor, seen: torch.Tensor, weight: float, formula: str = "code",
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Geometric ensemble of generator scores ``A^p`` and IP-CLIP scores ``A^c`` (both ``N,C``), λ = ``weight``.

    Seen classes: ``Ap^λ Ac^(1-λ)``. Unseen: ``Ap^(1-λ) Ac^λ`` (released code) or ``Ac^λ`` (paper, eq. 9).
    ``valid`` ``N`` (released code only): whether a proposal's mask exceeds 0.5 anywhere; the others take
    ``Ac = 1``. ``weight <= 0`` returns ``A^c`` (the code's branch for λ = 0, which ignores ``valid``).
    """
    if weight <= 0:
        return ac
    if formula not in ("code", "paper"):
        raise ValueError(f"ensemble_formula must be 'code' or 'paper' (got {formula!r})")
    if formula == "code" and valid is not None:
        ac = torch.where(valid.to(ac.device)[:, None], ac, torch.ones_like(ac))
    seen_scores = ap ** weight * ac ** (1 - weight)
    unseen_scores = ac ** weight if formula == "paper" else ap ** (1 - weight) * ac ** weight
    return torch.where(seen.to(ac.device)[None], seen_scores, unseen_scores)


def seen_classes(labels: Sequence[str], split: str = "", seen: Sequence[str] = ()) -> torch.Tensor:
    """Boolean ``C``: the classes of ``labels`` named in ``seen`` or seen in dataset ``split``'s zero-shot split
    (the released code's ``trainable_flag``); all unseen when neither is given, as the code without a flag."""
    unknown = set(seen) - set(labels)
    if unknown:
        raise ValueError(f"seen classes {sorted(unknown)} are not in the class list {list(labels)}")
    flags = torch.tensor([label in set(seen) for label in labels], dtype=torch.bool)
    if not split:
        return flags
    from vocabseg.data.classes import CLASSES, ZERO_SHOT_SPLITS

    if split not in ZERO_SHOT_SPLITS:
        raise ValueError(f"no zero-shot split for {split!r}; known: {', '.join(ZERO_SHOT_SPLITS)}")
    names = CLASSES[split]
    split_seen = {n for i, n in enumerate(names) if i not in set(ZERO_SHOT_SPLITS[split]["unseen"])}
    return flags | torch.tensor([label in split_seen for label in labels], dtype=torch.bool)


def on_canvas(masks: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    """Masks ``N,h,w`` at the image size zero-padded at the bottom and right to ``canvas`` (unchanged when they
    already cover it)."""
    height, width = masks.shape[-2:]
    if height > canvas[0] or width > canvas[1]:
        raise ValueError(f"proposal masks {(height, width)} are larger than the padded input {tuple(canvas)}")
    return F.pad(masks, (0, canvas[1] - width, 0, canvas[0] - height))


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
    test_size: int = 0  # short side of detectron2's test resize (the released configs: 640); 0: the photo's size
    size_divisibility: int = 32  # the input is zero-padded to a multiple of this before the resize to input_size
    input_size: int = 480
    mask_threshold: float = 0.5
    keep_small: bool = False  # True: a small proposal keeps its best patch instead of seeing nothing
    attention: str = "split"
    temperature: float = 100.0
    templates: str = "vild"
    aggregate: str = "sum"  # "sum": S = sum_i A_i M_i (code and paper); "mean": divided by sum_i M_i
    fill: str = "sclip"  # dense method for uncovered pixels; "none": no fill
    clip_ensemble: bool = True  # False: A = A^p, the generator's own scores (plain Mask2Former inference)
    ensemble: float = 0.0
    ensemble_formula: str = "code"
    seen_split: str = ""
    seen: str | Sequence[str] = ""  # seen class labels (comma-separated), in addition to seen_split's

    def __post_init__(self):
        for flag in ("keep_small", "clip_ensemble"):
            setattr(self, flag, as_bool(getattr(self, flag), flag))
        if self.aggregate not in ("sum", "mean"):
            raise ValueError(f"aggregate must be 'sum' or 'mean' (got {self.aggregate!r})")
        if isinstance(self.seen, str):
            self.seen = tuple(name.strip() for name in self.seen.split(",") if name.strip())
        self.seen = tuple(self.seen)

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
        """Per-proposal query logits ``N,Q`` (cosine) and class probabilities ``A^c`` ``N,C`` of masks ``N,h,w``
        on the padded input (masks at the image size are zero-padded to it)."""
        x = prepare_image(image, self.input_size, self.size_divisibility).to(backbone.device)
        masks = on_canvas(masks.to(x.device), padded_size(*image.shape[:2], self.size_divisibility))
        embeddings = self.encoder(backbone).encode(x, masks[None])[0]
        logits = embeddings @ classifier.embeddings.to(embeddings.dtype).T
        probs = postprocess.class_scores(logits.T, classifier.query_class, classifier.spec.num_classes,
                                         self.temperature)
        return logits, probs.T

    def class_scores(self, clip_probs: torch.Tensor, proposals: Proposals, labels: Sequence[str]) -> torch.Tensor:
        """``A`` ``N,C``: IP-CLIP's ``A^c`` alone, the generator's ``A^p`` (``clip_ensemble`` off) or the ensemble."""
        generator = proposals.scores
        if generator is not None and generator.shape[1] != len(labels):
            raise ValueError(f"proposal scores have {generator.shape[1]} classes, the class list has {len(labels)}")
        if not self.clip_ensemble:
            if generator is None:
                raise ValueError("clip_ensemble=false classifies with the generator's scores; these proposals have "
                                 "none (an NPZ file with scores or class_logits)")
            return generator.to(clip_probs)
        if generator is None:
            return clip_probs
        valid = (proposals.masks > 0.5).flatten(1).any(1)
        return ensemble_scores(generator.to(clip_probs), clip_probs, seen_classes(labels, self.seen_split, self.seen),
                               self.ensemble, self.ensemble_formula, valid)

    def _fill_prediction(self, backbone, image, classifier, protocol) -> dict:
        method = create_method(self.fill)
        key = ("fill", self.fill, classifier.spec)
        if key not in self._cache:
            self._cache[key] = method.build_classifier(backbone, classifier.spec, TextCache())
        return method.predict(backbone, image, self._cache[key], protocol)

    def score_maps(self, backbone, image: torch.Tensor, classifier: TextClassifier, protocol: Protocol
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class scores ``C,H,W`` and per-query logits ``Q,H,W`` (mask-weighted mean of the proposals' cosine
        logits) of the input image ``H,W,3``."""
        height, width = image.shape[:2]
        spec = classifier.spec
        proposals = generate_proposals(self.proposals, backbone, image, classifier, self.proposal_file,
                                       self.sam_weights, padded_size(height, width, self.size_divisibility))
        masks = proposals.masks.to(backbone.device).float()
        if tuple(masks.shape[-2:]) != (height, width):
            raise ValueError(f"proposal masks are {tuple(masks.shape[-2:])}, the image is {(height, width)}")
        scores = torch.zeros(spec.num_classes, height, width, device=backbone.device)
        logits = torch.zeros(classifier.embeddings.shape[0], height, width, device=backbone.device)
        if len(masks):
            padded = masks if proposals.padded is None else proposals.padded
            with inference.autocast(protocol.precision, backbone.device):
                query_logits, probs = self.proposal_scores(backbone, image, padded, classifier)
            probs = self.class_scores(probs.float(), proposals, spec.labels)
            mass = masks.sum(0).clamp_min(1e-6)
            scores = torch.einsum("nc,nhw->chw", probs, masks)
            if self.aggregate == "mean":
                scores = scores / mass
            logits = torch.einsum("nq,nhw->qhw", query_logits.float(), masks) / mass
        uncovered = ~(masks >= 0.5).any(0) if len(masks) else torch.ones(height, width, dtype=torch.bool,
                                                                          device=backbone.device)
        if self.fill != "none" and uncovered.any():
            dense = self._fill_prediction(backbone, image, classifier, protocol)
            scores = torch.where(uncovered, dense["scores"].to(scores), scores)
            logits = torch.where(uncovered, dense["logits"].to(logits), logits)
        return scores, logits

    @torch.inference_mode()
    def predict(self, backbone, image: torch.Tensor, classifier: TextClassifier, protocol: Protocol) -> dict:
        """:meth:`score_maps` of the image at ``test_size``, resized (bilinear) to the photo's size; argmax."""
        height, width = image.shape[:2]
        resized = resize_shortest_edge(image, self.test_size) if self.test_size else image
        scores, logits = self.score_maps(backbone, resized, classifier, protocol)
        scores = inference.upsample(scores, (height, width))
        logits = inference.upsample(logits, (height, width))
        labels = postprocess.labels_from_scores(scores, protocol.prob_thd, protocol.area_thd,
                                                classifier.spec.has_background)
        return {"logits": logits, "scores": scores, "labels": labels}
