"""``ifseg-clip``: a CLIP-based variant of IFSeg (Yun et al. 2023) of this library's design (spec B.10), not the
paper's model (that is ``ifseg``, on OFA): a head trained without images over a training-free recipe, followed by kNN
probability smoothing (spec B.7).

Per crop: the recipe's dense features ``z`` (ClearCLIP by default), the head's refinement ``z'``, logits
``<z'_p, t_q>``. With ``knn`` on (the default, as in the paper), ``P = softmax(logit_scale * logits)`` over the
queries is averaged ``knn_iters`` times over each token's ``knn_k`` nearest tokens by cosine of ``z``, and the crop
returns ``log(P) / logit_scale``, so that the harness's softmax recovers the smoothed ``P`` exactly (the returned
``logits`` are then these scaled log-probabilities). Without a ``checkpoint`` the head is untrained, i.e. the
plain recipe (plus kNN when on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vocabseg.methods.base import Method, Protocol, create_method, grid_logits_to_crop, register
from vocabseg.methods.ifseg.knn import DEFAULT_ITERS, DEFAULT_K, knn_smooth


@register
@dataclass
class IFSegCLIP(Method):
    """Image-free trained head + kNN smoothing; ``checkpoint`` from ``vocabseg train ifseg-clip``."""

    name: ClassVar[str] = "ifseg-clip"
    summary: ClassVar[str] = ("IFSeg-style head trained on artificial word maps over a training-free CLIP recipe, "
                              "kNN smoothing (this library's CLIP variant; the paper's OFA model is `ifseg`)")
    default_protocol: ClassVar[Protocol] = Protocol(short_side=448, crop=448, stride=224, logit_scale=40.0)
    checkpoint: str | None = None
    knn: bool = True
    knn_k: int = DEFAULT_K
    knn_iters: int = DEFAULT_ITERS
    recipe: str = "clearclip"  # only without a checkpoint; a checkpoint names its own recipe

    def _head(self, backbone):
        from vocabseg.methods.ifseg.head import HeadConfig, IFSegHead
        from vocabseg.methods.ifseg.train import load_head

        key = ("head", str(backbone.device))
        if key not in self._cache:
            if self.checkpoint:
                head, _ = load_head(self.checkpoint, backbone.embed_dim)
            else:
                head = IFSegHead(HeadConfig(backbone.embed_dim, recipe=self.recipe)).eval()
            self._cache[key] = (head.to(backbone.device, backbone.dtype), create_method(head.config.recipe))
        return self._cache[key]

    def patch_features(self, backbone, crops):
        """The recipe's features, unchanged (the head runs in :meth:`crop_logits`)."""
        return self._head(backbone)[1].patch_features(backbone, crops)

    def crop_logits(self, backbone, crops, text):
        head, _ = self._head(backbone)
        features, grid = self.patch_features(backbone, crops)
        logits = head(features, grid) @ text.T
        if self.knn and self.knn_iters:
            scale = self._cache.get("logit_scale", self.default_protocol.logit_scale)
            probs = knn_smooth(torch.softmax(scale * logits, dim=-1), features, self.knn_k, self.knn_iters)
            logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log() / scale
        return grid_logits_to_crop(logits, grid, crops.shape[-2:])

    def predict(self, backbone, image, classifier, protocol):
        self._cache["logit_scale"] = protocol.logit_scale  # kNN smooths the harness's own softmax
        return super().predict(backbone, image, classifier, protocol)
