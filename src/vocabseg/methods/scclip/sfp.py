"""SFP (Jin et al., ICCV 2025): self-adaptive feature purifier, as its official code (``SFP_ICCV/``) computes it.

SFP is built on SC-CLIP's code (:mod:`vocabseg.methods.scclip.method`, same notation); the differences:

1. Outliers (the *self-adaptive outlier mitigator*; option ``outlier_detector="som"``, the official ``pm='SOM'``):
   from block ``L-1``'s own attention weights ``A = softmax(s Q K^T)`` (per head, from ``ln_1`` of its input), the
   class-token row ``A[0, 1:]`` is multiplied by ``res_cls * res_scale = 0.3 * 5 = 1.5`` and both are averaged over
   heads; a patch is salient when that class-to-patch attention exceeds its own self-attention ``A[i, i]``, and the
   (at most) 10 most salient patches are the outliers. ``outlier_detector="lof"`` (``pm='LOF'``) uses SC-CLIP's LOF.
2. Outliers of ``X_{L-1}`` and ``X_9`` are repaired as in SC-CLIP; ``P_9`` = cosine similarity of the repaired
   ``X_9`` patch tokens **thresholded** at 0.4, used both to aggregate and to guide the attention.
3. Last block, attention only (the *semantic-aware attention enhancer*):
   ``A_h = (softmax(s K K^T) + softmax(s Q Q^T) + softmax(3 (P_9 - mean P_9)), entries below the mean excluded) / 3``,
   ``+ 0.3 * CLS_{L-1}``, aggregated with ``S_4`` (block-4 patch cosines thresholded at 0.4).
4. Cross-layer integration: ``Z = X_4 + ... + X_10``; its patch tokens (``ln_1``) go through the guide alone,
   ``A = softmax(3 (P_9 - mean P_9))`` with entries below the mean excluded (``sinkhorn_attn`` in the code: a single
   softmax, no Sinkhorn iterations), ``+ 0.3 * CLS(Z)``, aggregated with ``S_4`` and added.

Quirks of the official code (``../shared/oracle/sfp/README.md``): the "hierarchical attention integrator" sums the
attention maps of blocks 1..L-1 but never uses them (not computed here); the outlier positions use SC-CLIP's
``row = index // gh`` rule (:func:`~vocabseg.methods.scclip.method.official_positions`; ``exact_outlier_positions=true``
fixes it on non-square grids); the list of block outputs holds block ``L-1`` twice (indices ``L-2`` and ``L-1``), so
``cross_e`` up to ``L`` is accepted. ``purify=False`` crashes in the official code (``NameError``); here it skips the
outlier repair. The official blocks run PyTorch's non-fused attention (to return weights); here only block ``L-1``
computes its weights explicitly: block outputs differ by up to 6e-5 (values up to ±15 on the oracle's tiny CLIP),
the final cosines by less than 1e-6.

Presets: the ViT-B/16 values of SFP's ``configs/cfg_voc21.py``, ``cfg_context59.py`` and ``cfg_coco_object.py``
(checked by the oracle) equal SC-CLIP's; the other benchmarks use SC-CLIP's configs, which SFP's are built from.
Whole-image mode and PAMR differ from the official harness as in SC-CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import Preset
from vocabseg.methods.registry import register
from vocabseg.methods.scclip.method import (
    OutlierRepairMethod,
    aggregate,
    attention_only_block,
    cosine_similarity_matrix,
    fill_from_neighbours,
    lof_scores,
    self_attention,
    similarity_attention,
    threshold,
    top_outliers,
)
from vocabseg.models.encoder import DenseEncoder
from vocabseg.pipeline.protocol import Protocol


def salient_outliers(attention: torch.Tensor, boost: float = 1.5, count: int = 10, prefix: int = 1) -> torch.Tensor:
    """SFP's outliers from a block's attention weights ``B,heads,P+N,P+N`` (class token first, ``prefix`` = P
    tokens before the patches) -> ``B,N`` bool.

    The class-to-patch row is multiplied by ``boost``, both it and the diagonal are averaged over heads; patches
    whose boosted class attention exceeds their self-attention are salient, and the ``count`` most salient ones
    (by class attention) are returned.
    """
    boosted = attention.clone()
    boosted[:, :, 0, prefix:] *= boost
    mean = boosted.mean(dim=1)
    cls_to_patch = mean[:, 0, prefix:]
    salient = cls_to_patch > mean[:, prefix:, prefix:].diagonal(dim1=-2, dim2=-1)
    ranked = cls_to_patch.masked_fill(~salient, float("-inf"))
    top = ranked.topk(min(count, ranked.shape[-1]), dim=-1)
    outliers = torch.zeros_like(salient)
    outliers.scatter_(1, top.indices, top.values > float("-inf"))
    return outliers


def sfp_attention(guide: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """SFP's enhanced last-block attention ``(softmax(s KK^T) + softmax(s QQ^T) + guide) / 3``: ``guide`` ``B,N,N``
    (:func:`~vocabseg.methods.scclip.method.similarity_attention`), ``q``/``k`` ``B,heads,N,hd`` -> ``B,heads,N,N``."""
    return (self_attention(k) + self_attention(q) + guide[:, None]) / 3


def block_with_attention(encoder: DenseEncoder, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``index`` run unchanged with explicit attention weights: ``B,T,D -> (B,T,D, B,heads,T,T)``."""
    q, k, v = encoder.qkv(index, x)
    weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)
    x = x + encoder.attention_out(index, weights @ v)
    return encoder.ffn(index, x), weights


@register
@dataclass
class SFP(OutlierRepairMethod):
    """SFP: attention-based outlier repair, enhanced last-block attention, cross-layer integration."""

    name: ClassVar[str] = "sfp"
    summary: ClassVar[str] = ("class-attention outlier repair, q-q + k-k + similarity attention, cross-layer "
                              "integration (Jin et al. 2025)")
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "sfp")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "sfp")

    cross_s: int = 3
    cross_e: int = 10
    purify: bool = True
    outlier_detector: Literal["som", "lof"] = "som"
    res_scale: float = 5.0

    def outliers(self, block_output: torch.Tensor, attention: torch.Tensor, grid, prefix: int) -> torch.Tensor:
        """``B,N`` positions to repair, from block ``L-1``'s output ``B,T,D`` (LOF) or its attention weights."""
        if self.outlier_detector == "lof":
            flagged = top_outliers(lof_scores(block_output[:, prefix:]))
        else:
            flagged = salient_outliers(attention, self.res_cls * self.res_scale, prefix=prefix)
        return self.positions(flagged, grid)

    def patch_features(self, encoder, crops):
        grid = encoder.grid(*crops.shape[-2:])
        prefix = encoder.prefix_tokens
        last = encoder.num_blocks - 1
        embedded = encoder.embed(crops)
        outputs = self.run_recorded(encoder, embedded, last - 1)
        x, attention = block_with_attention(encoder, last - 1, outputs[-1] if outputs else embedded)
        outputs += [x, x]  # the official list holds block L-1's output twice
        self.check_indices(len(outputs), (self.cross_s, self.cross_e))
        ref = outputs[self.pre_adjust_idx][:, prefix:]
        patches = x[:, prefix:]
        if self.purify:
            repair = self.outliers(x, attention, grid, prefix)
            patches = fill_from_neighbours(patches, repair, grid)
            ref = fill_from_neighbours(ref, repair, grid)
        pre_similarity = threshold(cosine_similarity_matrix(ref), self.beta)
        guide = similarity_attention(pre_similarity)
        patches = aggregate(patches, pre_similarity)
        patches = attention_only_block(encoder, last, patches, lambda q, k: sfp_attention(guide, q, k))
        patches = patches + self.res_cls * x[:, :1]
        post_similarity = threshold(cosine_similarity_matrix(outputs[self.post_adjust_idx][:, prefix:]), self.beta)
        patches = aggregate(patches, post_similarity)

        fused = torch.stack(outputs[self.cross_s:self.cross_e]).sum(dim=0)
        fused_patches = attention_only_block(encoder, last, fused[:, prefix:], lambda q, k: guide[:, None])
        fused_patches = fused_patches + self.res_cls * fused[:, :1]
        patches = patches + aggregate(fused_patches, post_similarity)
        return F.normalize(encoder.head(patches), dim=-1), grid
