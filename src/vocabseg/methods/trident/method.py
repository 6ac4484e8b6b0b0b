"""Trident (Shi et al., ICCV 2025): ProxyCLIP features of sub-images spliced into one grid and aggregated globally by
SAM's attention (official code ``YuHengsss/Trident`` @ a93b346).

Models: ``clip``, ``dino`` (default ``dino_vitb16``; any DINO with CLIP's patch size) and ``sam`` (default ``vit_b``;
``--model sam=TAG_OR_PATH``, Python ``models={"sam": ...}``).

Pipeline on a uint8 ``H0,W0,3`` image:

1. SAM branch (:func:`sam_branches`): the *original* image, each side resized up to a multiple of 16
   (OpenCV bilinear), through SAM's own preprocessing (longest side 1024, PIL bilinear with antialiasing, SAM
   mean/std, zero padding to 1024x1024). The valid grid ``vh x vw = input_size / 16`` sets the output resolution.
   From the last (global) encoder block: its softmax attention over all 64x64 cells, cropped to the valid cells
   without renormalising, and its values ``v``. :func:`guidance_threshold` and :func:`masked_guidance` give the
   guidance matrix ``W = rownorm(mean_h(A_h * [cos(v_h) > thr]))``, ``thr_i = min(cos_fac * mean_{h,j} cos, 0.9)``.
2. CLIP/DINO branch (:meth:`Trident.spliced_tokens`): the harness's resize to ``short_side`` (mmcv),
   :func:`trident_resize` (each side up to a multiple of 16, at least the crop), sliding windows (corners on 16-px
   cells). Per window: DINO's last-block tokens (ViT-B/16 by default), ProxyCLIP's proxy attention over CLIP's
   last-block values (prefix tokens dropped before the block, no residual, no FFN;
   :mod:`vocabseg.methods.proxyclip.method`).
3. :func:`splice_windows`: the windows' outputs placed on the whole-image CLIP grid, overlaps averaged; resized
   bilinearly to the SAM grid; ``W @`` them (:func:`guided_tokens`); ``ln_post``, ``proj``, cosine with the text.
4. Logits ``Q,vh,vw`` bilinear straight to ``H0,W0``; ``softmax(logit_scale * .)``; classes by
   :func:`official_query_class` (the background = the first ``Q - C + 1`` queries); argmax; ``prob_thd``.
5. Optional SAM refinement (``sam_refinement``, the paper's numbers; :func:`refine_with_sam`): each class's
   connected regions at half resolution prompt SAM's mask decoder with a box, their best point and the class map;
   masks predicted with IoU above ``sam_iou_thresh`` replace the coarse labels where they fall.

Quirks of the official code kept here (see README): the SAM branch sees the original image, not the resized input;
the guidance threshold is per query row over all heads and keys; the background takes the first ``Q - C + 1``
queries, so foreground synonyms (``class_merge="official"``, the default) shift every later class; the refinement
maps its point and box prompts as if the image were ``H0/2 x W0/2`` long-side-1024 (not SAM's real input size),
passes the class map as an unbatched ``1,256,256`` mask prompt (SAM's ``LayerNorm2d`` then normalises over rows,
not channels; ``batched_mask_prompt=True`` gives SAM's intended form), and regions whose SAM mask fails the IoU
test only raise the returned scores, never the labels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import CLIP_SLOT, Method, ModelSlot, Preset
from vocabseg.methods.proxyclip.method import (
    dino_patch_tokens,
    proxy_attention,
    proxy_block_output,
    proxy_similarity,
)
from vocabseg.methods.registry import register
from vocabseg.models.encoder import DenseEncoder
from vocabseg.models.sam import SamModel
from vocabseg.pipeline import timing, windows
from vocabseg.pipeline.preprocess import resize_uint8, resized_shape
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.run import Dense, Prepared

#: The grid of every Trident window and image: CLIP ViT-B/16's patch.
CELL = 16
#: Images per SAM encoder pass on a GPU (a CPU runs one: larger batches only add memory traffic).
SAM_IMAGES_PER_PASS = 4


# --- geometry ---------------------------------------------------------------------------------------------------

def round_up(value: int, multiple: int = CELL) -> int:
    return -(-value // multiple) * multiple


def trident_resize(images: torch.Tensor, minimum: int, multiple: int = CELL) -> torch.Tensor:
    """``preprocess_image``: normalised ``B,3,h,w`` whose sides are not both multiples of ``multiple`` are resized
    (bilinear, align_corners=False) so that the longer side ``L`` becomes ``L' = round_up(L)`` and each side
    ``round_up(int(side * L' / L))``, at least ``minimum``; others pass unchanged."""
    h, w = images.shape[-2:]
    if h % multiple == 0 and w % multiple == 0:
        return images
    longer = max(h, w)
    target = round_up(longer, multiple)
    size = tuple(max(round_up(int(side * target / longer), multiple), minimum) for side in (h, w))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def splice_windows(tokens: torch.Tensor, cells: list[tuple[int, int, int, int]], grid: tuple[int, int]
                   ) -> torch.Tensor:
    """Window tokens ``n_win,h*w,D`` (row-major on each window's cells) placed at their cells ``(y1, x1, y2, x2)``
    of the whole ``gh x gw`` grid, overlaps averaged: ``D,gh,gw``."""
    total = tokens.new_zeros(tokens.shape[-1], *grid)
    count = tokens.new_zeros(1, *grid)
    for window, (y1, x1, y2, x2) in zip(tokens, cells, strict=True):
        total[:, y1:y2, x1:x2] += window.T.reshape(-1, y2 - y1, x2 - x1)
        count[:, y1:y2, x1:x2] += 1
    return total / count


def guided_tokens(spliced: torch.Tensor, guidance: torch.Tensor, sam_grid: tuple[int, int]) -> torch.Tensor:
    """Spliced CLIP tokens ``D,gh,gw`` resized bilinearly (align_corners=False) to the SAM grid and aggregated by
    the guidance matrix ``n,n`` (``n = vh*vw``): ``n,D``."""
    values = F.interpolate(spliced[None], size=sam_grid, mode="bilinear", align_corners=False)[0]
    return guidance @ values.flatten(1).T


# --- SAM guidance -------------------------------------------------------------------------------------------------

def value_cosines(v: torch.Tensor) -> torch.Tensor:
    """Cosine between the values of every pair of cells, per head: ``heads,n,hd -> heads,n,n``."""
    unit = F.normalize(v, dim=-1)
    return unit @ unit.transpose(-1, -2)


def guidance_threshold(v: torch.Tensor, cos_fac: float = 1.2, ceiling: float = 0.9) -> torch.Tensor:
    """Per query cell ``thr_i = min(cos_fac * mean_{h,j} cos(v_hi, v_hj), ceiling)`` of values ``heads,n,hd``: ``n``."""
    row_means = sum(value_cosines(v[h:h + 1])[0].mean(dim=-1) for h in range(v.shape[0])) / v.shape[0]
    return (cos_fac * row_means).clamp(max=ceiling)


def masked_guidance(attention: torch.Tensor, v: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sum_h A_h * [cos(v_h) > thr]`` of attention ``heads,n,n`` and values ``heads,n,hd``: ``n,n`` (unnormalised;
    heads can be summed in chunks). :func:`normalise_rows` of the total is the guidance matrix ``W``."""
    return (attention * (value_cosines(v) > threshold[:, None])).sum(dim=0)


def normalise_rows(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.sum(dim=-1, keepdim=True)


# --- post-processing ----------------------------------------------------------------------------------------------

def official_query_class(num_queries: int, num_classes: int) -> torch.Tensor:
    """Trident's (and CorrCLIP's) query -> class map: the first ``Q - C + 1`` queries are class 0, the remaining
    queries are classes ``1 .. C-1`` in order. It equals the class list's own map only when no class but the
    first has synonyms; with foreground synonyms every later class is shifted (a quirk of the official code)."""
    extra = num_queries - num_classes
    return torch.cat([torch.zeros(extra + 1, dtype=torch.long), torch.arange(1, num_classes)])


# --- SAM refinement -----------------------------------------------------------------------------------------------

@dataclass
class Regions:
    """One class's connected regions at half resolution: masks ``R,h,w``, boxes ``R,4`` (x1, y1, x2, y2 inclusive)
    and best points ``R,2`` (x, y)."""

    masks: torch.Tensor
    boxes: torch.Tensor
    points: torch.Tensor


def class_regions(labels: torch.Tensor, probs: torch.Tensor, coarse_thresh: float, minimal_area: int
                  ) -> dict[int, Regions]:
    """``split_connected_regions`` on half-resolution labels ``h,w`` and class scores ``C,h,w``: per class, its
    8-connected regions of at least ``minimal_area`` cells, each with its bounding box and the first cell of
    highest score. With ``coarse_thresh > 0`` cells whose best score is below it belong to no class, and classes
    whose best score is below it have no region."""
    from skimage import measure
    from torchvision.ops import masks_to_boxes

    labels = labels.clone()
    if coarse_thresh > 0:
        labels[probs.amax(dim=0) < coarse_thresh] = probs.shape[0]
    out = {}
    for c in range(probs.shape[0]):
        if probs[c].max() < coarse_thresh:
            continue
        components = torch.from_numpy(measure.label((labels == c).cpu().numpy(), connectivity=2)).to(labels.device)
        masks, points = [], []
        for region in range(1, int(components.max()) + 1):
            mask = components == region
            if int(mask.sum()) < minimal_area:
                continue
            best = int(torch.argmax(probs[c] * mask))
            points.append((best % probs.shape[-1], best // probs.shape[-1]))
            masks.append(mask)
        if masks:
            stacked = torch.stack(masks)
            out[c] = Regions(stacked, masks_to_boxes(stacked), torch.tensor(points, device=labels.device))
    return out


def resize_coords(coords: torch.Tensor, size: tuple[int, int], long_side: int) -> torch.Tensor:
    """SAM's ``apply_coords_torch``: ``(x, y)`` coordinates ``...,2`` of an image of ``size`` scaled to that image
    resized to ``long_side`` (``ResizeLongestSide.get_preprocess_shape``)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    new_h, new_w = ResizeLongestSide.get_preprocess_shape(size[0], size[1], long_side)
    scale = torch.tensor([new_w / size[1], new_h / size[0]], dtype=torch.float32, device=coords.device)
    return coords.float() * scale


def mask_prompt(class_map: torch.Tensor, image_size: tuple[int, int], coarse_thresh: float, coefficient: float,
                side: int = 256) -> torch.Tensor:
    """A class's half-resolution score map ``h,w`` as SAM's low-resolution mask prompt ``1,side,side``: resized
    bilinearly to the original image's long-side-``side`` size, zero-padded, ``coefficient * p`` where
    ``p > coarse_thresh`` and 0 elsewhere."""
    from segment_anything.utils.transforms import ResizeLongestSide

    new_h, new_w = ResizeLongestSide.get_preprocess_shape(image_size[0], image_size[1], side)
    resized = F.interpolate(class_map[None, None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    resized = F.pad(resized, (0, side - new_w, 0, side - new_h))
    return torch.where(resized > coarse_thresh, coefficient * resized, torch.zeros_like(resized))


def refine_with_sam(sam: SamModel, embedding: torch.Tensor, sam_sizes: tuple[tuple[int, int], tuple[int, int]],
                    labels: torch.Tensor, probs: torch.Tensor, coarse_thresh: float, minimal_area: int,
                    iou_thresh: float, coefficient: float = 0.005, batched_mask_prompt: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Trident's ``sam_refinement`` of labels ``H,W`` and class scores ``C,H,W`` (after thresholds): returns the
    refined labels and scores.

    ``embedding`` ``1,256,64,64`` is SAM's image embedding of the image SAM saw, ``sam_sizes`` its (resized input,
    original) sizes. Per class: its regions (:func:`class_regions` at half resolution) prompt the mask decoder
    with a point, a box and the class map (:func:`mask_prompt`), one mask per region; masks whose predicted IoU
    exceeds ``iou_thresh`` score ``sigmoid(mask logit) * p_class`` inside the mask (max over the class's masks);
    pixels claimed by a mask take the argmax of those scores, the others keep their label. Regions whose mask
    failed raise the scores to the coarse ones inside them.
    """
    height, width = probs.shape[-2:]
    small = (height // 2, width // 2)
    labels_small = F.interpolate(labels[None, None].half(), size=small, mode="nearest")[0, 0].long()
    probs_small = F.interpolate(probs[None], size=small, mode="bilinear", align_corners=False)[0]
    regions = class_regions(labels_small, probs_small, coarse_thresh, minimal_area)
    input_size, original_size = sam_sizes
    image_pe = sam.model.prompt_encoder.get_dense_pe()
    side = sam.model.prompt_encoder.mask_input_size[0]  # 256 for SAM's 1024 input
    kept_logits, kept_classes, failed = [], [], []
    for c, found in regions.items():
        prompt = mask_prompt(probs_small[c], (height, width), coarse_thresh, coefficient, side)
        if batched_mask_prompt:
            prompt = prompt[None]
        points = resize_coords(found.points[:, None], small, sam.image_size)
        boxes = resize_coords(found.boxes.reshape(-1, 2, 2), small, sam.image_size).reshape(-1, 4)
        sparse, dense = sam.model.prompt_encoder(
            points=(points, torch.ones(points.shape[:2], device=points.device)), boxes=boxes, masks=prompt)
        low_res, iou = sam.model.mask_decoder(image_embeddings=embedding, image_pe=image_pe,
                                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                              multimask_output=False)
        valid = iou[:, 0] > iou_thresh
        if not valid.all():
            failed.append(found.masks[~valid])
        if valid.any():
            kept_logits.append(low_res[valid])
            kept_classes.extend([c] * int(valid.sum()))
    if not kept_logits:
        return labels, probs
    logits = sam.model.postprocess_masks(torch.cat(kept_logits), input_size, original_size)
    if tuple(logits.shape[-2:]) != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    masks, confidence = logits[:, 0] > sam.model.mask_threshold, logits[:, 0].sigmoid()
    classes = torch.tensor(kept_classes, device=probs.device)
    refined = torch.zeros_like(probs)
    for c in classes.unique().tolist():
        mine = classes == c
        refined[c] = (confidence[mine] * probs[c]).amax(dim=0) * masks[mine].any(dim=0)
    refined_labels = torch.where(refined.sum(dim=0) == 0, labels, refined.argmax(dim=0))
    if failed:
        failed_area = F.interpolate(torch.cat(failed)[None].float(), size=(height, width), mode="nearest")[0]
        refined = torch.maximum(refined, (failed_area.sum(dim=0) != 0) * probs)
    return refined_labels, refined


# --- the SAM branch -----------------------------------------------------------------------------------------------

@dataclass
class SamBranch:
    """The SAM branch of one image: the guidance matrix ``n,n`` on the valid grid ``grid`` (``vh,vw``, ``n =
    vh*vw``), the last block's values ``v`` ``heads,n,hd``, the sizes SAM saw (``input_size`` after its resize,
    ``original_size`` of the cell-rounded image) and, for the refinement, the image ``embedding`` ``1,256,64,64``."""

    guidance: torch.Tensor
    grid: tuple[int, int]
    v: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    embedding: torch.Tensor | None = None


def sam_input(sam: SamModel, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """SAM's input ``1,3,S,S`` of a uint8 ``H0,W0,3`` image with each side first rounded up to a multiple of 16
    (OpenCV bilinear), its size after SAM's resize, and the rounded image's size."""
    rounded = resize_uint8(image, (round_up(image.shape[0]), round_up(image.shape[1])))
    x, input_size = sam.preprocess(rounded.cpu().numpy())
    return x, input_size, tuple(rounded.shape[:2])


@torch.inference_mode()
def sam_branches(sam: SamModel, images: list[torch.Tensor], cos_fac: float = 1.2, embedding: bool = False
                 ) -> list[SamBranch]:
    """The SAM branch of uint8 ``H0,W0,3`` images, their encoder passes batched (:data:`SAM_IMAGES_PER_PASS` on a
    GPU); ``embedding``: keep the image embeddings too (the refinement's)."""
    last = len(sam.blocks) - 1
    per_pass = SAM_IMAGES_PER_PASS if sam.device.type == "cuda" else 1
    out = []
    for start in range(0, len(images), per_pass):
        prepared = [sam_input(sam, image) for image in images[start:start + per_pass]]
        tokens = sam.run_blocks(sam.embed(torch.cat([x for x, _, _ in prepared])), 0, last)
        q, k, v = sam.qkv(last, tokens)
        for i, (_, input_size, original_size) in enumerate(prepared):
            guidance, grid, values, image_embedding = last_block_guidance(
                sam, tokens[i:i + 1], (q[i:i + 1], k[i:i + 1], v[i:i + 1]), input_size, cos_fac, embedding)
            out.append(SamBranch(guidance, grid, values, input_size, original_size, image_embedding))
    return out


def last_block_guidance(sam: SamModel, tokens: torch.Tensor, qkv: tuple[torch.Tensor, ...], input_size: tuple[int, int],
                        cos_fac: float, embedding: bool):
    """Guidance ``n,n``, valid grid, valid values ``heads,n,hd`` and (with ``embedding``) the image embedding, from
    the last block's input ``tokens`` ``1,g,g,C`` and its ``q, k, v`` of one image; heads one at a time, so that
    only one head's attention is held."""
    q, k, v = qkv
    last = len(sam.blocks) - 1
    grid = tuple(tokens.shape[1:3])
    valid = (input_size[0] // sam.patch_size, input_size[1] // sam.patch_size)
    keep = torch.arange(grid[0] * grid[1], device=q.device).view(grid)[:valid[0], :valid[1]].flatten()
    v_valid = v[0, :, keep].float()
    threshold = guidance_threshold(v_valid, cos_fac)
    total, heads_out = None, []
    for h in range(sam.num_heads):
        q_h, k_h = q[:, h:h + 1], k[:, h:h + 1]
        if embedding:  # the block output needs every query row; the guidance takes the valid ones
            attention = sam.attention_logits(last, q_h, k_h, grid).softmax(dim=-1)
            heads_out.append(attention @ v[:, h:h + 1])
            attention = attention[:, :, keep]
        else:
            attention = sam.attention_logits(last, q_h, k_h, grid, rows=valid).softmax(dim=-1)
        masked = masked_guidance(attention[0][:, :, keep].float(), v_valid[h:h + 1], threshold)
        total = masked if total is None else total + masked
    image_embedding = None
    if embedding:
        image_embedding = sam.neck(sam.finish_block(last, tokens, torch.cat(heads_out, dim=1))).float()
    return normalise_rows(total), valid, v_valid, image_embedding


# --- the CLIP + DINO branch ---------------------------------------------------------------------------------------

def window_tokens(clip: DenseEncoder, crops: torch.Tensor, proxy: torch.Tensor, mean: torch.Tensor,
                  beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """ProxyCLIP's last-block output ``out_proj(A V)`` ``B,h*w,D`` of CLIP-normalised crops ``B,3,h,w`` with DINO
    tokens ``proxy`` ``B,h*w,C`` and the similarity ``mean`` (``B,1,1``: each crop's image's)."""
    grid = clip.grid(*crops.shape[-2:])
    attention = proxy_attention(proxy, beta, gamma, mean)
    x = clip.run_blocks(clip.embed(crops), 0, clip.num_blocks - 1)
    return proxy_block_output(clip, x, attention, grid, grid)


def cell_windows(inputs: list[torch.Tensor], protocol: Protocol) -> list[tuple[int, windows.Window]]:
    """``(image index, window)`` of every sliding window of the inputs; windows must lie on 16-pixel cells."""
    jobs = []
    for index, x in enumerate(inputs):
        height, width = x.shape[-2:]
        for w in windows.sliding_windows(height, width, protocol.crop or max(height, width), protocol.stride):
            if any(value % CELL for value in (w.y1, w.x1, w.y2, w.x2)):
                raise UsageError(f"Trident's windows must start and end on {CELL}-pixel cells: use a crop and "
                                 f"stride that are multiples of {CELL} (got {protocol.crop}, {protocol.stride})")
            jobs.append((index, w))
    return jobs


def same_size_chunks(jobs: list[tuple[int, windows.Window]], batch: int) -> list[list[int]]:
    """Indices of ``jobs`` in chunks of at most ``batch`` windows of one size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (_, w) in enumerate(jobs):
        groups.setdefault((w.y2 - w.y1, w.x2 - w.x1), []).append(j)
    return [members[start:start + batch] for members in groups.values() for start in range(0, len(members), batch)]


# --- the method ---------------------------------------------------------------------------------------------------

@register
@dataclass
class Trident(Method):
    """Trident: ProxyCLIP features of sub-images spliced and aggregated by SAM attention; optional SAM refinement."""

    name: ClassVar[str] = "trident"
    summary: ClassVar[str] = ("ProxyCLIP windows spliced and aggregated by SAM attention, optional SAM refinement "
                              "(Shi et al. 2025; models: CLIP, DINO, SAM)")
    models: ClassVar = {
        "clip": CLIP_SLOT,
        "dino": ModelSlot("dino", "dino_vitb16", "the DINO whose tokens build the proxy attention (patch 16)"),
        "sam": ModelSlot("sam", "vit_b", "the SAM whose last-block attention aggregates the spliced windows"),
    }
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "trident")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "trident")

    beta: float = 1.2
    gamma: float = 3.0
    cos_fac: float = 1.2
    sam_refinement: bool = False
    coarse_thresh: float = 0.2
    minimal_area: int = 225
    sam_iou_thresh: float = 0.8
    sam_mask_coff: float = 0.005
    batched_mask_prompt: bool = False
    class_merge: Literal["official", "per_class"] = "official"

    def check_models(self, models) -> None:
        super().check_models(models)
        if self.sam_refinement:
            models.sam.require_decoder("Trident's SAM refinement")

    def prepare(self, models, image, protocol, image_id=None) -> Prepared:
        """The common resize and normalisation, then :func:`trident_resize` (sides on 16-pixel cells)."""
        prepared = super().prepare(models, image, protocol, image_id)
        prepared.input = trident_resize(prepared.input, protocol.crop or 0)
        return prepared

    def dense(self, models, inputs: list[Prepared], classifier, protocol: Protocol) -> list[Dense]:
        """SAM encoder passes batched on a GPU, windows of all images sharing CLIP/DINO passes, then per image the
        guided features' logits ``Q,vh,vw`` (the SAM branch and model ride along in ``extras``)."""
        with timing.stage("sam"), windows.autocast(protocol.precision, models.sam.device):
            branches = sam_branches(models.sam, [p.image for p in inputs], self.cos_fac, self.sam_refinement)
        with timing.stage("vit"):
            spliced = self.spliced_tokens(models, [p.input for p in inputs], protocol)
        with timing.stage("upsample"):
            return [Dense(guided_logits(models.clip.image, tokens, branch, classifier.embeddings),
                          extras={"sam": branch, "sam_model": models.sam})
                    for tokens, branch in zip(spliced, branches, strict=True)]

    def spliced_tokens(self, models, inputs: list[torch.Tensor], protocol: Protocol) -> list[torch.Tensor]:
        """Window tokens of normalised ``1,3,H,W`` inputs (sides multiples of 16) spliced: ``D,H/16,W/16`` each.

        Windows of equal size, from one image or several, share forward passes. The official code runs all windows
        of an image as one batch, so the proxy attention's similarity mean is taken over every window of the image
        (not per window as in ProxyCLIP): DINO runs on all windows first.
        """
        clip = models.clip.image
        jobs = cell_windows(inputs, protocol)
        chunks = same_size_chunks(jobs, self.windows_per_pass(models, protocol, max(max(x.shape[-2:]) for x in inputs)))

        def crops(chunk):
            return torch.cat([inputs[i][:, :, w.y1:w.y2, w.x1:w.x2] for i, w in (jobs[j] for j in chunk)])

        with windows.autocast(protocol.precision, inputs[0].device), timing.stage("dino"):
            proxies = {}
            for chunk in chunks:
                proxies.update(zip(chunk, self.proxy_tokens(models, crops(chunk)).float(), strict=True))
        means = image_similarity_means(proxies, [i for i, _ in jobs], len(inputs))
        outputs = {}
        with windows.autocast(protocol.precision, inputs[0].device), timing.stage("clip"):
            for chunk in chunks:
                mean = torch.stack([means[jobs[j][0]] for j in chunk]).view(-1, 1, 1)
                tokens = window_tokens(clip, crops(chunk), torch.stack([proxies[j] for j in chunk]), mean,
                                       self.beta, self.gamma)
                outputs.update(zip(chunk, tokens.float(), strict=True))
        spliced = []
        for index, x in enumerate(inputs):
            mine = [j for j, (i, _) in enumerate(jobs) if i == index]
            cells = [(w.y1 // CELL, w.x1 // CELL, w.y2 // CELL, w.x2 // CELL) for w in (jobs[j][1] for j in mine)]
            spliced.append(splice_windows(torch.stack([outputs[j] for j in mine]), cells,
                                          (x.shape[-2] // CELL, x.shape[-1] // CELL)))
        return spliced

    def proxy_tokens(self, models, crops: torch.Tensor) -> torch.Tensor:
        """DINO's patch tokens ``B,n,C`` of CLIP-normalised crops, on CLIP's grid."""
        proxy, grid = dino_patch_tokens(models.dino, crops)
        if tuple(grid) != tuple(models.clip.image.grid(*crops.shape[-2:])):
            raise UsageError(f"Trident needs a DINO with CLIP's patch size (its grid {tuple(grid)} differs from "
                             "CLIP's); use a patch-16 DINO such as dino_vitb16")
        return proxy

    def scores_and_labels(self, logits, prepared, dense, classifier, protocol):
        """The common scores and labels under Trident's class merge, then the optional SAM refinement."""
        if self.class_merge == "official":
            query_class = official_query_class(len(classifier.query_class), classifier.spec.num_classes)
            classifier = dataclasses.replace(classifier, query_class=query_class.to(classifier.query_class.device))
        scores, labels = super().scores_and_labels(logits, prepared, dense, classifier, protocol)
        if self.sam_refinement:
            branch = dense.extras["sam"]
            with timing.stage("sam_refinement"):
                labels, scores = refine_with_sam(
                    dense.extras["sam_model"], branch.embedding, (branch.input_size, branch.original_size), labels,
                    scores, self.coarse_thresh, self.minimal_area, self.sam_iou_thresh, self.sam_mask_coff,
                    self.batched_mask_prompt)
        return scores, labels

    def forward_passes(self, height, width, protocol):
        h, w = resized_shape(height, width, protocol.short_side, protocol.max_long_side) if protocol.short_side \
            else (height, width)
        h, w = trident_resize(torch.empty(1, 1, h, w, device="meta"), protocol.crop or 0).shape[-2:]
        return len(windows.sliding_windows(h, w, protocol.crop, protocol.stride)) if protocol.crop else 1


def image_similarity_means(proxies: dict[int, torch.Tensor], owners: list[int], count: int) -> list[torch.Tensor]:
    """Per image, the mean DINO cosine similarity over all of its windows (``proxies[j]`` ``n,C`` of window ``j``,
    which belongs to image ``owners[j]``)."""
    sums, counts = [0.0] * count, [0] * count
    for j, owner in enumerate(owners):
        sums[owner] = sums[owner] + proxy_similarity(proxies[j][None]).sum()
        counts[owner] += proxies[j].shape[0] ** 2
    return [total / n for total, n in zip(sums, counts, strict=True)]


def guided_logits(clip: DenseEncoder, spliced: torch.Tensor, branch: SamBranch, text: torch.Tensor) -> torch.Tensor:
    """Per-query logits ``Q,vh,vw`` on the SAM grid: spliced tokens aggregated by the guidance, then CLIP's
    per-token head and cosines with the text ``Q,E``."""
    features = clip.head(guided_tokens(spliced, branch.guidance, branch.grid).to(clip.dtype))
    return (F.normalize(features, dim=-1) @ text.to(features.dtype).T).T.reshape(-1, *branch.grid).float()
