"""CorrCLIP (Zhang et al., ICCV 2025): CLIP's last-block correlations restricted to class-agnostic regions, values
from DINO, spatial and semantic branches, map correction (official code ``zdk258/CorrCLIP`` @ 103bc18,
``CorrCLIPv1``). Models: ``clip`` and ``dino`` (a DINO ViT-B/8 by default, ``--model dino=TAG_OR_PATH``); region
masks from the ``masks`` option (a folder of pre-generated files, a file, or a generator such as ``sam2``).

Per window (ProxyCLIP's harness: short side 336, windows 336 / stride 112 zero-padded to a multiple of 56; the region
masks are resized to the input by nearest neighbour and padded with id 10000):

1. :func:`dino_qk_features`: DINO's last-block ``q + k`` (all heads concatenated, class token dropped),
   L2-normalised, on the DINO grid (42x42 for 336 px at patch 8).
2. :func:`merge_regions`: the window's region ids at the DINO grid; with more than two ids, the mean DINO feature of
   each region except the unsegmented one, cosine distances ``max(sim) - sim``, DBSCAN (eps 0.2, min_samples 1);
   regions of cluster ``c`` take the id ``10000 + c``.
3. :func:`scope_attention`: ``A = softmax(τ S)`` (τ = 4, ``S`` = DINO cosines) over the pairs inside one region,
   plus the pairs with a token in the unsegmented region whose ``S`` exceeds ``mean(S)``; other pairs ``-inf``.
4. :func:`corrclip_branches`: one *mask class token* per region of the merged ids at the CLIP grid (copies of the
   class token after ``ln_pre``) attends to the class token and its region's patches through every block; the
   class and patch tokens attend among themselves (plain CLIP). Main branch: the last block's values aggregated by
   ``A`` (ProxyCLIP's :func:`~vocabseg.methods.proxyclip.method.proxy_block_output`, no residual, no FFN); spatial
   branch: the same on the mean of the outputs of blocks 5..9 (12-layer CLIP); semantic branch: each token takes the
   last-block output of its region's mask class token (full block, through the CLIP-grid regions). Each stream goes
   through ``ln_post`` and ``proj``; features = main + 1.0 spatial + 0.5 semantic.
5. After the common post-processing (softmax, thresholds), :func:`correct_labels`: every region of the image's
   masks (except the unsegmented one) takes its most frequent label.

Quirks of the official code kept as the default (``lowest_is_unsegmented=True``): the *lowest* id of a window (of the
image, for map correction) is treated as unsegmented, whether or not it is 0, so in a window without unsegmented
pixels a real region is left out of merging and attends like unsegmented pixels; ``lowest_is_unsegmented=False``
treats only id 0 as unsegmented. Also: the unsegmented region attends anywhere above the mean similarity (the
code's "method 1"); mask class tokens do not attend to themselves; semantic features go through the CLIP-grid masks
(a DINO-grid token can take a neighbouring region's token); the spatial branch's ``ln_post`` is applied per stream.
The official post-processing assumes only the background has synonyms; here every class may have several names.
The published numbers use MetaCLIP ViT-B/16 (``--arch ViT-B-16-quickgelu --weights metaclip_fullcc``) and EntitySeg
or SAM2 masks generated offline (the authors publish them per dataset).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import CLIP_SLOT, Method, Preset
from vocabseg.methods.proxyclip.method import DINO_SLOT, dino_input, proxy_block_output
from vocabseg.methods.registry import register
from vocabseg.models.encoder import DenseEncoder
from vocabseg.models.region_masks import RegionMaskSource, mask_source
from vocabseg.pipeline import timing, windows
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.run import Dense, Prepared

#: Id of the window padding in the region masks, and the first id of the merged regions.
MERGED_ID = 10000
#: Windows (image and masks) are padded to a multiple of this many pixels.
PAD_MULTIPLE = 56


def dino_qk_features(dino: DenseEncoder, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """L2-normalised ``q + k`` of DINO's last block ``B,N,C`` (heads concatenated, prefix tokens dropped) of images
    in the DINO's normalisation (:func:`~vocabseg.methods.proxyclip.method.dino_input`), and the grid."""
    last = dino.num_blocks - 1
    q, k, _ = dino.qkv(last, dino.run_blocks(dino.embed(images), 0, last))
    features = (q + k)[:, :, dino.prefix_tokens:].transpose(1, 2).flatten(2)
    return F.normalize(features, dim=-1), dino.grid(*images.shape[-2:])


def resize_ids(ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Integer id maps ``...,H,W`` resized by PyTorch's (legacy) nearest neighbour, ``src = floor(dst * in / out)``."""
    shape = ids.shape[:-2]
    flat = ids.reshape(-1, 1, *ids.shape[-2:]).float()
    return F.interpolate(flat, size=tuple(size), mode="nearest").long().reshape(*shape, *size)


def unsegmented_id(ids: torch.Tensor, lowest_is_unsegmented: bool = True) -> int:
    """The id treated as unsegmented: the lowest one present (official) or 0."""
    return int(ids.min()) if lowest_is_unsegmented else 0


def merge_regions(ids: torch.Tensor, features: torch.Tensor, eps: float = 0.2, lowest_is_unsegmented: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """CorrCLIP's mask merging on one window: ``ids`` ``h,w`` at the feature grid, ``features`` ``h*w,C``
    (normalised). Returns the merged ids, and the DBSCAN input ``R,R`` and labels ``R`` (None without merging).

    Every segmented region (ascending id) gets its mean feature, L2-normalised; DBSCAN (precomputed distances
    ``max(sim) - sim``, ``eps``, min_samples 1) clusters them; a region in cluster ``c`` takes id ``10000 + c``.
    Merging needs at least two segmented regions.
    """
    from sklearn.cluster import DBSCAN

    unsegmented = unsegmented_id(ids, lowest_is_unsegmented)
    flat = ids.flatten()
    regions = [value for value in flat.unique().tolist() if value != unsegmented]
    if len(regions) < 2:
        return ids, None, None
    means = torch.stack([features[flat == value].mean(dim=0) for value in regions])
    means = F.normalize(means, dim=1)
    similarity = means @ means.T
    distances = similarity.max() - similarity
    labels = DBSCAN(eps=eps, min_samples=1, metric="precomputed").fit_predict(distances.cpu().numpy())
    merged = ids.clone()
    for value, label in zip(regions, labels.tolist(), strict=True):
        if label != -1:
            merged[ids == value] = MERGED_ID + label
    return merged, distances, torch.from_numpy(labels)


def scope_attention(features: torch.Tensor, ids: torch.Tensor, tau: float = 4.0, lowest_is_unsegmented: bool = True
                    ) -> torch.Tensor:
    """CorrCLIP's scope-restricted attention ``N,N`` from normalised features ``N,C`` and region ids ``N``.

    ``S`` = cosines; allowed pairs: both tokens in the same segmented region, or at least one token unsegmented and
    ``S > mean(S)`` (mean over the whole matrix); ``softmax(tau * S)`` over the allowed pairs of each row.
    """
    similarity = features @ features.T
    unsegmented = ids == unsegmented_id(ids, lowest_is_unsegmented)
    same_region = (ids[:, None] == ids[None, :]) & ~unsegmented[:, None]
    with_unsegmented = (unsegmented[:, None] | unsegmented[None, :]) & (similarity > similarity.mean())
    similarity = similarity.masked_fill(~(same_region | with_unsegmented), float("-inf"))
    return (similarity * tau).softmax(dim=-1)


def semantic_layout(merged: torch.Tensor, clip_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The regions of the merged ids at the CLIP grid ``M,gh,gw`` (bool, ascending id) and the additive attention
    mask ``(M+1+gh*gw)^2`` of the sequence ``[mask class tokens, class token, patches]``: class and patch tokens
    attend among themselves; mask class token ``i`` attends to the class token and the patches of region ``i``."""
    token_ids = resize_ids(merged, clip_grid)
    regions = torch.stack([token_ids == value for value in token_ids.unique().tolist()])
    count, tokens = regions.shape[0], 1 + clip_grid[0] * clip_grid[1]
    allowed = torch.zeros(count + tokens, count + tokens, dtype=torch.bool, device=merged.device)
    allowed[count:, count:] = True
    allowed[:count, count] = True
    allowed[:count, count + 1:] = regions.flatten(1)
    mask = torch.zeros(allowed.shape, device=merged.device).masked_fill_(~allowed, float("-inf"))
    return regions, mask


def spatial_blocks(num_layers: int) -> range:
    """Blocks whose outputs the spatial branch averages (the official counts: 5 of 12, 12 of 24, 28 of 32 layers,
    else all but 4), ending two blocks before the last."""
    count = {12: 5, 24: 12, 32: 28}.get(num_layers, num_layers - 4)
    return range(num_layers - 2 - count, num_layers - 2)


def corrclip_branches(clip: DenseEncoder, crop: torch.Tensor, attention: torch.Tensor, regions: torch.Tensor,
                      attn_mask: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The three streams of one window ``3,n,E`` (main, spatial, semantic; each ``proj(ln_post(.))``) and the
    last-block outputs of the mask class tokens ``M,D``.

    ``clip``: CLIP's image encoder (with a class token); ``crop`` ``1,3,h,w``; ``attention`` ``n,n`` on the DINO
    ``grid``; ``regions`` ``M,gh,gw`` and ``attn_mask`` from :func:`semantic_layout`.
    """
    clip_grid = clip.grid(*crop.shape[-2:])
    count = regions.shape[0]
    x = clip.embed(crop)
    x = torch.cat([x[:, :1].expand(-1, count, -1), x], dim=1)
    last = clip.num_blocks - 1
    spatial_range = spatial_blocks(clip.num_blocks)
    spatial = []
    for index in range(last):
        x = clip.block(index, x, attn_mask.to(x.dtype))
        if index in spatial_range:
            spatial.append(x[:, count:])
    streams = torch.cat([x[:, count:], torch.stack(spatial).mean(0)])
    main_spatial = proxy_block_output(clip, streams, attention[None].expand(2, -1, -1), clip_grid, grid)
    mct = clip.block(last, x, attn_mask.to(x.dtype))[0, :count]
    expanded = F.interpolate(regions[:, None].to(mct.dtype), size=grid, mode="nearest").flatten(1)
    semantic = expanded.T @ mct
    return clip.head(torch.cat([main_spatial, semantic[None]])), mct


def correct_labels(labels: torch.Tensor, ids: torch.Tensor, lowest_is_unsegmented: bool = True) -> torch.Tensor:
    """Map correction: the pixels of every segmented region of ``ids`` ``H,W`` take the most frequent label of the
    region (``torch.mode``)."""
    corrected = labels.clone()
    unsegmented = unsegmented_id(ids, lowest_is_unsegmented)
    for value in ids.unique().tolist():
        if value != unsegmented:
            region = ids == value
            corrected[region] = torch.mode(labels[region]).values
    return corrected


@functools.lru_cache(maxsize=16)
def region_mask_source(spec: str) -> RegionMaskSource:
    """The region-mask source a user names (one per spec and process: a generator keeps its model)."""
    try:
        return mask_source(spec)
    except ValueError as exc:
        raise UsageError(f"corrclip: {exc} (--option masks=...)") from None


@register
@dataclass
class CorrCLIP(Method):
    """CorrCLIP: region-restricted DINO correlations, spatial and semantic branches, map correction."""

    name: ClassVar[str] = "corrclip"
    summary: ClassVar[str] = ("correlations restricted to class-agnostic regions, DINO values, map correction "
                              "(Zhang et al. 2025; models: CLIP, DINO; region masks: --option masks=...)")
    models: ClassVar = {"clip": CLIP_SLOT, "dino": DINO_SLOT}
    needs_class_token: ClassVar[bool] = True  # the mask class tokens are copies of it
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "corrclip")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "corrclip")

    masks: str = ""
    tau: float = 4.0
    spatial_weight: float = 1.0
    semantic_weight: float = 0.5
    merge_eps: float = 0.2
    map_correction: bool = True
    lowest_is_unsegmented: bool = True

    def prepare(self, models, image, protocol, image_id=None) -> Prepared:
        """The common resize and normalisation; the image's region ids ``H,W`` (``extras["regions"]``) and the
        input with the ids resized to it as a 4th channel (``extras["stacked"]``), so they ride along its windows."""
        prepared = super().prepare(models, image, protocol, image_id)
        with timing.stage("masks"):
            regions = region_mask_source(self.masks)(image, image_id).to(image.device)
        ids = resize_ids(regions, prepared.input.shape[-2:])[None, None].to(prepared.input.dtype)
        prepared.extras.update(regions=regions, stacked=torch.cat([prepared.input, ids], dim=1))
        return prepared

    def dense(self, models, inputs: list[Prepared], classifier, protocol: Protocol) -> list[Dense]:
        """The common sliding windows (of all images at once) over the stacked inputs."""
        batch = self.windows_per_pass(models, protocol, max(max(p.input.shape[-2:]) for p in inputs))
        with timing.stage("vit"):
            logits = windows.dense_logits_batch(self.crop_function(models, classifier, protocol),
                                                [p.extras["stacked"] for p in inputs], protocol.crop, protocol.stride,
                                                batch)
        return [Dense(item) for item in logits]

    def crop_function(self, models, classifier, protocol: Protocol) -> windows.CropLogits:
        """Logits of stacked windows ``B,4,h,w`` padded to a multiple of 56 (zeros; id 10000) and cropped back."""
        text = classifier.embeddings.float()

        def crop_logits(stacked: torch.Tensor) -> torch.Tensor:
            height, width = stacked.shape[-2:]
            pad_h, pad_w = -height % PAD_MULTIPLE, -width % PAD_MULTIPLE
            top, left = pad_h // 2, pad_w // 2
            padding = (left, pad_w - left, top, pad_h - top)
            crops = F.pad(stacked[:, :3], padding)
            ids = F.pad(stacked[:, 3].round().long(), padding, value=MERGED_ID)
            with windows.autocast(protocol.precision, crops.device):
                features, grid = self.window_features(models, crops, ids)
                logits = F.normalize(features.float(), dim=-1) @ text.T
            logits = windows.grid_logits_to_crop(logits, grid, crops.shape[-2:])
            return logits[..., top:top + height, left:left + width]

        return crop_logits

    def window_features(self, models, crops: torch.Tensor, ids: torch.Tensor
                        ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Features ``B,n,E`` (not normalised) of padded windows ``B,3,h,w`` with region ids ``B,h,w``, and the
        DINO grid."""
        with timing.stage("dino"):
            dino_features, grid = dino_qk_features(models.dino, dino_input(crops, models.dino))
        clip = models.clip.image
        out = []
        for crop, window_ids, features in zip(crops, ids, dino_features, strict=True):
            with timing.stage("recipe"):
                merged, _, _ = merge_regions(resize_ids(window_ids, grid), features, self.merge_eps,
                                             self.lowest_is_unsegmented)
                attention = scope_attention(features, merged.flatten(), self.tau, self.lowest_is_unsegmented)
                regions, attn_mask = semantic_layout(merged, clip.grid(*crops.shape[-2:]))
            streams, _ = corrclip_branches(clip, crop[None], attention, regions, attn_mask, grid)
            out.append(streams[0] + self.spatial_weight * streams[1] + self.semantic_weight * streams[2])
        return torch.stack(out), grid

    def refine_labels(self, labels, prepared, dense, protocol):
        """Map correction (``map_correction``): each region of the image's masks takes its most frequent label."""
        if not self.map_correction:
            return labels
        return correct_labels(labels, prepared.extras["regions"], self.lowest_is_unsegmented)
