"""MAFT inference (spec A.6): IP-CLIP classifies every proposal once; scores become a label map.

As the released code: the image (resized to ``test_size`` when set) is normalised, zero-padded to a multiple of
``size_divisibility`` and squashed to ``input_size`` squared for IP-CLIP. Each proposal's class scores ``A`` (IP-CLIP's
``A^c``, the generator's ``A^p``, or their geometric ensemble, λ = ``ensemble``) weight its soft mask:
``S_c(x) = sum_i A_ic M_i(x)`` (``aggregate="mean"`` divides by ``sum_i M_i(x)``), resized to the photo's size;
labels are the argmax. Pixels covered by no proposal (every ``M_i(x) < 0.5``) take the scores of a dense
training-free method (``fill``; ``none`` keeps the code's argmax of the sums there). Fine-tuned IP-CLIP weights are
ordinary CLIP weights (``vocabseg convert maft-checkpoint`` or ``train maft``); the base CLIP weights give the
no-fine-tune ablation.

In the pipeline: ``prepare`` makes each image's IP-CLIP input; ``dense`` generates the proposals of all images of a
batch, classifies them in shared IP-CLIP passes and returns the class scores as ``Dense.scores`` (no softmax is
applied after). The fill is another registered method (``registry.create(fill)``) run through the pipeline on the
same models, with its own text classifier built alongside MAFT's (:class:`MAFTClassifier`) through the segmenter's
text cache. Every CLIP pass (IP-CLIP, the ``kmeans`` and ``cliptrase`` proposal sources, the fill) runs under the
protocol's precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods import presets as preset_data
from vocabseg.methods import registry
from vocabseg.methods.base import Method, Preset
from vocabseg.methods.maft.ipclip import IPCLIP, VILD_TEMPLATES, padded_size, prepare_image, resize_shortest_edge
from vocabseg.methods.maft.proposals import Proposals, ProposalSource, generate_proposals
from vocabseg.methods.registry import register
from vocabseg.models.encoder import Models
from vocabseg.pipeline import postprocess, timing, windows
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.run import Dense, Prepared, run
from vocabseg.text.classes import ClassSpec
from vocabseg.text.classifier import TextCache, TextClassifier
from vocabseg.text.templates import IMAGENET_TEMPLATES


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
        raise UsageError(f"ensemble_formula must be 'code' or 'paper' (got {formula!r})")
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
        raise UsageError(f"seen classes {sorted(unknown)} are not in the class list {list(labels)}")
    flags = torch.tensor([label in set(seen) for label in labels], dtype=torch.bool)
    if not split:
        return flags
    from vocabseg.data.classes import CLASSES, ZERO_SHOT_SPLITS

    if split not in ZERO_SHOT_SPLITS:
        raise UsageError(f"no zero-shot split for {split!r}; known: {', '.join(ZERO_SHOT_SPLITS)}")
    names = CLASSES[split]
    split_seen = {n for i, n in enumerate(names) if i not in set(ZERO_SHOT_SPLITS[split]["unseen"])}
    return flags | torch.tensor([label in split_seen for label in labels], dtype=torch.bool)


def on_canvas(masks: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    """Masks ``N,h,w`` at the image size zero-padded at the bottom and right to ``canvas`` (unchanged when they
    already cover it)."""
    height, width = masks.shape[-2:]
    if height > canvas[0] or width > canvas[1]:
        raise UsageError(f"proposal masks {(height, width)} are larger than the padded input {tuple(canvas)}")
    return F.pad(masks, (0, canvas[1] - width, 0, canvas[0] - height))


@dataclass
class MAFTClassifier(TextClassifier):
    """MAFT's text classifier plus the fill method's own classifier of the same classes (None without a fill)."""

    fill: TextClassifier | None = None


@register
@dataclass
class MAFT(Method):
    """IP-CLIP proposal classification; see the module docstring."""

    name: ClassVar[str] = "maft"
    summary: ClassVar[str] = "MAFT IP-CLIP proposal classification (any proposal source, dense fill)"
    needs_class_token: ClassVar[bool] = True
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "maft")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "maft")

    proposals: ProposalSource = "kmeans"
    proposal_file: str = ""
    sam_weights: str = ""
    start_layer: int = -1  # -1: two thirds of the blocks (8 of 12, 16 of 24)
    test_size: int = 0  # short side of detectron2's test resize (the released configs: 640); 0: the photo's size
    size_divisibility: int = 32  # the input is zero-padded to a multiple of this before the resize to input_size
    input_size: int = 480
    mask_threshold: float = 0.5
    keep_small: bool = False  # True: a small proposal keeps its best patch instead of seeing nothing
    attention: Literal["split", "naive"] = "split"
    temperature: float = 100.0
    templates: Literal["vild", "imagenet"] = "vild"
    aggregate: Literal["sum", "mean"] = "sum"  # "sum": S = sum_i A_i M_i (code and paper); "mean": / sum_i M_i
    fill: str = "sclip"  # dense method for uncovered pixels; "none": no fill
    clip_ensemble: bool = True  # False: A = A^p, the generator's own scores (plain Mask2Former inference)
    ensemble: float = 0.0
    ensemble_formula: Literal["code", "paper"] = "code"
    seen_split: str = ""
    seen: tuple[str, ...] = ()  # seen class labels, in addition to seen_split's
    _fill: Method | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.fill != "none":
            if self.fill == self.name:
                raise UsageError("maft cannot fill uncovered pixels with itself; use a dense method (e.g. sclip)")
            self._fill = registry.create(self.fill)
            extra = sorted(set(self._fill.models) - set(self.models))
            if extra:
                raise UsageError(f"the fill method {self.fill!r} needs model(s) {', '.join(extra)} that maft does not "
                                 "load; use a CLIP-only dense method (e.g. sclip, naclip)")

    def check_models(self, models: Models) -> None:
        super().check_models(models)
        if self._fill is not None:
            self._fill.check_models(models)

    # --- text side ----------------------------------------------------------------------------------------------

    def text_classifier(self, models: Models, spec: ClassSpec, cache: TextCache | None) -> MAFTClassifier:
        """The ``templates``' classifier (MAFT's 14 ViLD templates by default) and the fill's own, both through
        the segmenter's text ``cache`` (None: nothing read or written)."""
        templates = VILD_TEMPLATES if self.templates == "vild" else IMAGENET_TEMPLATES
        own = TextClassifier.build(models.clip.text, spec, templates, cache)
        fill = None if self._fill is None else self._fill.text_classifier(models, spec, cache)
        return MAFTClassifier(own.spec, own.embeddings, own.query_class, fill)

    # --- IP-CLIP ------------------------------------------------------------------------------------------------

    def ipclip(self, models: Models) -> IPCLIP:
        return IPCLIP(models.clip.image, None if self.start_layer < 0 else self.start_layer, self.mask_threshold,
                      self.keep_small, self.attention)

    def proposal_embeddings(self, models: Models, inputs: torch.Tensor, masks: Sequence[torch.Tensor],
                            protocol: Protocol) -> list[torch.Tensor]:
        """L2-normalised IP-CLIP embeddings ``N_i,E`` (float32) of each image's proposals: inputs ``B,3,S,S``,
        masks ``N_i,h_i,w_i`` on each padded input. Images share forward passes (``window_batch`` of them, or as
        many as fit); their proposal counts are padded with empty proposals, which change no other proposal."""
        ipclip = self.ipclip(models)
        encoder = models.clip.image
        inputs = inputs.to(encoder.device)
        allowed = [ipclip.allowed_patches(inputs[i:i + 1], m[None])[0] for i, m in enumerate(masks)]
        batch = protocol.window_batch or windows.auto_window_batch(encoder, self.input_size)
        out: list[torch.Tensor] = []
        for start in range(0, len(allowed), batch):
            group = allowed[start:start + batch]
            most = max(1, *(len(a) for a in group))
            padded = torch.zeros(len(group), most, group[0].shape[-1], dtype=torch.bool, device=encoder.device)
            for row, a in enumerate(group):
                padded[row, :len(a)] = a
            with windows.autocast(protocol.precision, encoder.device):
                embeddings = ipclip.encode_allowed(inputs[start:start + batch], padded)
            out.extend(e[:len(a)].float() for e, a in zip(embeddings, group, strict=True))
        return out

    def query_scores(self, embeddings: torch.Tensor, classifier: TextClassifier
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Proposal embeddings ``N,E`` -> cosine logits ``N,Q`` and class probabilities ``A^c`` ``N,C`` (softmax of
        ``temperature`` x cosine over all queries, maximum over each class's names)."""
        logits = embeddings @ classifier.embeddings.to(embeddings).T
        probs = postprocess.class_scores(logits.T, classifier.query_class, classifier.spec.num_classes,
                                         self.temperature)
        return logits, probs.T

    @torch.inference_mode()
    def proposal_scores(self, models: Models, image: torch.Tensor, masks: torch.Tensor, classifier: TextClassifier,
                        protocol: Protocol | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-proposal query logits ``N,Q`` (cosine) and class probabilities ``A^c`` ``N,C`` of the uint8 image
        ``H,W,3`` and its masks ``N,h,w`` on the padded input (masks at the image size are zero-padded to it)."""
        device = models.clip.image.device
        x = prepare_image(image.to(device), self.input_size, self.size_divisibility)
        masks = on_canvas(masks.to(device), padded_size(*image.shape[:2], self.size_divisibility))
        embeddings = self.proposal_embeddings(models, x, [masks], protocol or self.default_protocol)[0]
        return self.query_scores(embeddings, classifier)

    def class_scores(self, clip_probs: torch.Tensor, proposals: Proposals, labels: Sequence[str]) -> torch.Tensor:
        """``A`` ``N,C``: IP-CLIP's ``A^c`` alone, the generator's ``A^p`` (``clip_ensemble`` off) or the ensemble."""
        generator = proposals.scores
        if generator is not None and generator.shape[1] != len(labels):
            raise UsageError(f"proposal scores have {generator.shape[1]} classes, the class list has {len(labels)}")
        if not self.clip_ensemble:
            if generator is None:
                raise UsageError("clip_ensemble=false classifies with the generator's scores; these proposals have "
                                 "none (an NPZ file with scores or class_logits)")
            return generator.to(clip_probs)
        if generator is None:
            return clip_probs
        valid = (proposals.masks > 0.5).flatten(1).any(1)
        return ensemble_scores(generator.to(clip_probs), clip_probs, seen_classes(labels, self.seen_split, self.seen),
                               self.ensemble, self.ensemble_formula, valid)

    # --- the pipeline's hooks -----------------------------------------------------------------------------------

    def prepare(self, models: Models, image: torch.Tensor, protocol: Protocol, image_id: str | None = None
                ) -> Prepared:
        """The photo at ``test_size`` (``extras["photo"]``, where proposals and score maps are computed) and its
        IP-CLIP input ``1,3,S,S`` (normalised, padded to ``size_divisibility``, squashed to ``input_size``)."""
        photo = resize_shortest_edge(image, self.test_size) if self.test_size else image
        inputs = prepare_image(photo, self.input_size, self.size_divisibility)
        return Prepared(image, inputs, image_id, extras={"photo": photo})

    def dense(self, models: Models, inputs: list[Prepared], classifier: TextClassifier, protocol: Protocol
              ) -> list[Dense]:
        """Proposals of every image, one IP-CLIP pass for all of them, ``S = sum_i A_i M_i`` at the photo's test
        size, the fill where no proposal reaches 0.5, then the scores resized (bilinear) to the output size."""
        photos = [p.extras["photo"] for p in inputs]
        canvases = [padded_size(*photo.shape[:2], self.size_divisibility) for photo in photos]
        with timing.stage("proposals"):
            proposals = generate_proposals(self.proposals, models, photos, classifier, self.proposal_file,
                                           self.sam_weights, canvases, protocol.precision)
        for photo, item in zip(photos, proposals, strict=True):
            if tuple(item.masks.shape[-2:]) != tuple(photo.shape[:2]):
                raise UsageError(f"proposal masks are {tuple(item.masks.shape[-2:])}, the image is "
                                 f"{tuple(photo.shape[:2])}")
        device = models.clip.image.device
        with timing.stage("vit"):
            canvas_masks = [on_canvas((item.masks if item.padded is None else item.padded).to(device), canvas)
                            for item, canvas in zip(proposals, canvases, strict=True)]
            embeddings = self.proposal_embeddings(models, torch.cat([p.input for p in inputs]), canvas_masks,
                                                  protocol)
        maps = [self.aggregate_maps(e, item, classifier) for e, item in zip(embeddings, proposals, strict=True)]
        self._fill_uncovered(models, inputs, maps, classifier, protocol)
        return [Dense(logits, scores=windows.upsample(scores, prepared.size))
                for prepared, (scores, logits, _) in zip(inputs, maps, strict=True)]

    def aggregate_maps(self, embeddings: torch.Tensor, proposals: Proposals, classifier: TextClassifier
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class scores ``C,H,W`` (``sum_i A_ic M_i``, or its mean), per-query logits ``Q,H,W`` (mask-weighted mean
        of the proposals' cosine logits) and the uncovered pixels ``H,W`` (no ``M_i >= 0.5``) of one photo."""
        masks = proposals.masks.to(embeddings.device).float()
        spec = classifier.spec
        if not len(masks):
            size = masks.shape[-2:]
            return (masks.new_zeros(spec.num_classes, *size), masks.new_zeros(classifier.embeddings.shape[0], *size),
                    torch.ones(*size, dtype=torch.bool, device=masks.device))
        query_logits, clip_probs = self.query_scores(embeddings, classifier)
        probs = self.class_scores(clip_probs, proposals, spec.labels)
        mass = masks.sum(0).clamp_min(1e-6)
        scores = torch.einsum("nc,nhw->chw", probs, masks)
        if self.aggregate == "mean":
            scores = scores / mass
        logits = torch.einsum("nq,nhw->qhw", query_logits, masks) / mass
        return scores, logits, ~(masks >= 0.5).any(0)

    def _fill_uncovered(self, models: Models, inputs: list[Prepared], maps: list[tuple], classifier: TextClassifier,
                        protocol: Protocol) -> None:
        """Replace, in place, the scores and logits of uncovered pixels by the fill method's (run through the
        pipeline on the photos that have such pixels, with the fill's classifier of the same classes)."""
        todo = [i for i, (_, _, uncovered) in enumerate(maps) if uncovered.any()]
        if self._fill is None or not todo:
            return
        fill_classifier = classifier.fill if isinstance(classifier, MAFTClassifier) else None
        if fill_classifier is None:  # a plain classifier: the fill's own, computed without any disk cache
            fill_classifier = self._fill.text_classifier(models, classifier.spec, None)
        with timing.stage("fill"):
            results = run(self._fill, models, [inputs[i].extras["photo"] for i in todo], fill_classifier, protocol,
                          [inputs[i].image_id for i in todo])
        for index, result in zip(todo, results, strict=True):
            scores, logits, uncovered = maps[index]
            maps[index] = (torch.where(uncovered, result.scores.to(scores), scores),
                           torch.where(uncovered, result.logits.to(logits), logits), uncovered)

    def forward_passes(self, height: int, width: int, protocol: Protocol) -> int:
        """IP-CLIP's pass plus the CLIP pass of the ``kmeans`` and ``cliptrase`` sources; the fill's passes (only
        for images with uncovered pixels) are not counted."""
        return 1 + int(self.proposals in ("kmeans", "cliptrase"))
