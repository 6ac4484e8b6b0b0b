"""``ifseg-clip``: a CLIP-based variant of IFSeg (Yun et al. 2023) of this library's design (spec B.10), not the
paper's model (that is ``ifseg``, on OFA): a head trained without images over a training-free recipe, followed by kNN
probability smoothing (spec B.7).

Per crop: the recipe's dense features ``z`` (ClearCLIP by default), the head's refinement ``z'``, logits
``<z'_p, t_q>``. With ``knn`` on (the default, as in the paper), ``P = softmax(logit_scale * logits)`` over the
queries is averaged ``knn_iters`` times over each token's ``knn_k`` nearest tokens by cosine of ``z``, and the crop
returns ``log(P) / logit_scale``, so that the pipeline's softmax recovers the smoothed ``P`` exactly (the returned
``logits`` are then these scaled log-probabilities).

The head is the method's second model, ``ifseg_head`` (``models={"ifseg_head": "head.pt"}``, ``--model
ifseg_head=head.pt``; the older ``checkpoint=`` option still names it, deprecated). Without one the head is untrained,
which is the identity: the plain recipe (plus kNN when on). A trained head names its own recipe; ``recipe`` applies
without one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from vocabseg.methods import presets as preset_data
from vocabseg.methods import registry
from vocabseg.methods.base import CLIP_SLOT, Method, ModelSlot
from vocabseg.methods.ifseg.knn import DEFAULT_ITERS, DEFAULT_K, knn_smooth
from vocabseg.models.encoder import Models
from vocabseg.models.ifseg_head import check_feature_width
from vocabseg.pipeline import windows
from vocabseg.pipeline.protocol import Protocol
from vocabseg.text.classifier import TextClassifier


@functools.cache
def recipe_named(name: str) -> Method:
    """The training-free method ``name`` with its default options (its dense features feed the head)."""
    return registry.create(name)


@registry.register
@dataclass
class IFSegCLIP(Method):
    """Image-free trained head + kNN smoothing; the head from ``vocabseg train ifseg-clip``."""

    name: ClassVar[str] = "ifseg-clip"
    summary: ClassVar[str] = ("IFSeg-style head trained on artificial word maps over a training-free CLIP recipe, "
                              "kNN smoothing (this library's CLIP variant; the paper's OFA model is `ifseg`)")
    models: ClassVar = {"clip": CLIP_SLOT, "ifseg_head": ModelSlot(
        "ifseg_head", None, "the head of `vocabseg train ifseg-clip` (none: untrained, i.e. the plain recipe)",
        option="checkpoint")}
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "ifseg-clip")
    knn: bool = True
    knn_k: int = DEFAULT_K
    knn_iters: int = DEFAULT_ITERS
    recipe: str = "clearclip"  # only without a trained head; a trained head names its own recipe

    def base_recipe(self, models: Models) -> Method:
        """The training-free recipe under the head: the trained head's, else ``recipe``."""
        return recipe_named(models.ifseg_head.recipe or self.recipe)

    def check_models(self, models: Models) -> None:
        super().check_models(models)
        check_feature_width(models.ifseg_head, models.clip.image.embed_dim)
        self.base_recipe(models).check_models(models)

    def text_patch_features(self, models: Models, crops: torch.Tensor, text: torch.Tensor
                            ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The recipe's features ``B,N,E``, unchanged (the head runs in :meth:`crop_logits`)."""
        return self.base_recipe(models).text_patch_features(models, crops, text)

    def crop_function(self, models: Models, classifier: TextClassifier, protocol: Protocol) -> windows.CropLogits:
        """:meth:`crop_logits` with the protocol's logit scale (kNN smooths the pipeline's own softmax), under the
        protocol's autocast precision, returning float32 logits."""
        text = classifier.embeddings.float()

        def crop_logits(crops: torch.Tensor) -> torch.Tensor:
            with windows.autocast(protocol.precision, crops.device):
                return self.crop_logits(models, crops, text, protocol.logit_scale).float()

        return crop_logits

    def crop_logits(self, models: Models, crops: torch.Tensor, text: torch.Tensor, logit_scale: float | None = None
                    ) -> torch.Tensor:
        """Per-query logits ``B,Q,h,w`` of the head's features (kNN-smoothed log-probabilities divided by
        ``logit_scale``, default the method's protocol's, when ``knn`` is on)."""
        features, grid = self.text_patch_features(models, crops, text)
        head = models.ifseg_head.head
        logits = (features if head is None else head(features, grid)) @ text.to(features.dtype).T
        if self.knn and self.knn_iters:
            scale = logit_scale or self.default_protocol.logit_scale
            probs = knn_smooth(torch.softmax(scale * logits, dim=-1), features, self.knn_k, self.knn_iters)
            logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log() / scale
        return windows.grid_logits_to_crop(logits, grid, crops.shape[-2:])
