"""Trident (Shi et al., ICCV 2025): ProxyCLIP features of sub-images spliced into one grid and aggregated globally by
SAM's attention (official code ``YuHengsss/Trident`` @ a93b346).

Pipeline on a uint8 ``H0,W0,3`` image:

1. SAM branch (:meth:`Trident.sam_guidance`): the *original* image, each side resized up to a multiple of 16
   (OpenCV bilinear), through SAM's own preprocessing (longest side 1024, PIL bilinear with antialiasing, SAM
   mean/std, zero padding to 1024x1024). The valid grid ``vh x vw = input_size / 16`` sets the output resolution.
   From the last (global) encoder block: its softmax attention over all 64x64 cells, cropped to the valid cells
   without renormalising, and its values ``v``. :func:`guidance_threshold` and :func:`masked_guidance` give the
   guidance matrix ``W = rownorm(mean_h(A_h * [cos(v_h) > thr]))``, ``thr_i = min(cos_fac * mean_{h,j} cos, 0.9)``.
2. CLIP/DINO branch: the harness's resize to ``short_side`` (mmcv), :func:`trident_resize` (each side up to a
   multiple of 16, at least the crop), sliding windows (corners on 16-px cells). Per window: DINO's last-block
   tokens (ViT-B/16 by default), ProxyCLIP's proxy attention over CLIP's last-block values (class token dropped
   before the block, no residual, no FFN; :mod:`vocabseg.methods.proxyclip.method`).
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
from typing import ClassVar

import torch
import torch.nn.functional as F

from vocabseg.methods.base import Preset, Protocol, as_bool, register
from vocabseg.methods.dino_helper import DinoMethod
from vocabseg.methods.proxyclip.method import proxy_attention, proxy_block_output, proxy_similarity
from vocabseg.models.dino import CLIP_MEAN, CLIP_STD, renormalise
from vocabseg.models.sam import SamModel, load_sam
from vocabseg.pipeline import inference, timing

#: The grid of every Trident window and image: CLIP ViT-B/16's patch.
CELL = 16
#: Images per SAM encoder pass on a GPU (a CPU runs one: larger batches only add memory traffic).
SAM_IMAGES_PER_PASS = 4


def _trident_presets() -> dict[str, Preset]:
    """``configs/cfg_voc21.py`` and ``cfg_voc20.py`` (over ``base_config.py``), and the same with ``--sam_refine``."""
    table = {"voc21": (448, 224, 0.2), "voc20": (336, 112, 0.0)}  # short side, stride, prob_thd (crop 336)
    presets = {}
    for dataset, (short, stride, thd) in table.items():
        protocol = Protocol(short_side=short, crop=336, stride=stride, logit_scale=40.0, prob_thd=thd)
        presets[dataset] = Preset(protocol, dataset, "proxyclip")
        presets[f"{dataset}-refined"] = Preset(protocol, dataset, "proxyclip", {"sam_refinement": True})
    return presets


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


# --- the method ---------------------------------------------------------------------------------------------------

@register
@dataclass
class Trident(DinoMethod):
    """Trident: ProxyCLIP features of sub-images spliced and aggregated by SAM's attention; optional SAM refinement."""

    name: ClassVar[str] = "trident"
    summary: ClassVar[str] = ("ProxyCLIP windows spliced and aggregated by SAM attention, optional SAM refinement "
                              "(Shi et al. 2025; helpers: DINO, SAM)")
    default_protocol: ClassVar[Protocol] = Protocol(short_side=448, crop=336, stride=224, logit_scale=40.0)
    presets: ClassVar[dict[str, Preset]] = _trident_presets()

    dino: str = "dino_vitb16"
    sam: str = "vit_b"
    beta: float = 1.2
    gamma: float = 3.0
    cos_fac: float = 1.2
    sam_refinement: bool = False
    coarse_thresh: float = 0.2
    minimal_area: int = 225
    sam_iou_thresh: float = 0.8
    sam_mask_coff: float = 0.005
    batched_mask_prompt: bool = False
    class_merge: str = "official"

    def __post_init__(self):
        for flag in ("sam_refinement", "batched_mask_prompt"):
            setattr(self, flag, as_bool(getattr(self, flag), flag))
        if self.class_merge not in ("official", "per_class"):
            raise ValueError(f"class_merge must be 'official' or 'per_class' (got {self.class_merge!r})")

    def sam_model(self, backbone) -> SamModel:
        """The helper SAM on the CLIP backbone's device."""
        return load_sam(str(self.sam), str(backbone.device))

    def helper_models(self, backbone) -> dict[str, dict[str, str]]:
        sam = self.sam_model(backbone)
        return {**super().helper_models(backbone), "sam": {"arch": sam.name, "source": sam.source}}

    # --- SAM branch ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def sam_guidance(self, sam: SamModel, images: list[torch.Tensor], embedding: bool = False) -> list[dict]:
        """The SAM branch of uint8 ``H0,W0,3`` images (their encoder passes batched, :data:`SAM_IMAGES_PER_PASS`).

        Per image: ``guidance`` ``n,n`` on the valid grid ``grid`` (``vh,vw``), the last block's values ``v``
        ``heads,n,hd``, the sizes SAM saw (``input_size``, ``original_size``) and, with ``embedding``, the image
        embedding ``1,256,64,64`` (for the refinement).
        """
        last = len(sam.blocks) - 1
        per_pass = SAM_IMAGES_PER_PASS if sam.device.type == "cuda" else 1
        out = []
        for start in range(0, len(images), per_pass):
            prepared = []
            for image in images[start:start + per_pass]:
                rounded = inference.resize_uint8(image, (round_up(image.shape[0]), round_up(image.shape[1])))
                x, input_size = sam.preprocess(rounded.cpu().numpy())
                prepared.append((x, input_size, tuple(rounded.shape[:2])))
            tokens = sam.run_blocks(sam.embed(torch.cat([x for x, _, _ in prepared])), 0, last)
            q, k, v = sam.qkv(last, tokens)
            for i, (_, input_size, original_size) in enumerate(prepared):
                branch = self._last_block_guidance(sam, tokens[i:i + 1], q[i:i + 1], k[i:i + 1], v[i:i + 1],
                                                   input_size, embedding)
                out.append({**branch, "input_size": input_size, "original_size": original_size})
        return out

    def _last_block_guidance(self, sam: SamModel, tokens, q, k, v, input_size, embedding: bool) -> dict:
        """Guidance (and optionally the image embedding) from the last block's inputs of one image; heads one at
        a time, so that only one head's attention is held."""
        last = len(sam.blocks) - 1
        grid = tuple(tokens.shape[1:3])
        valid = (input_size[0] // sam.patch_size, input_size[1] // sam.patch_size)
        keep = torch.arange(grid[0] * grid[1], device=q.device).view(grid)[:valid[0], :valid[1]].flatten()
        v_valid = v[0, :, keep].float()
        threshold = guidance_threshold(v_valid, self.cos_fac)
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
        out = {"guidance": normalise_rows(total), "grid": valid, "v": v_valid}
        if embedding:
            out["embedding"] = sam.neck(sam.finish_block(last, tokens, torch.cat(heads_out, dim=1))).float()
        return out

    # --- CLIP + DINO branch -------------------------------------------------------------------------------------

    def window_tokens(self, backbone, crops: torch.Tensor, proxy: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """ProxyCLIP's last-block output ``out_proj(A V)`` ``B,h*w,D`` of CLIP-normalised crops ``B,3,h,w`` with
        DINO tokens ``proxy`` ``B,h*w,C`` and the similarity ``mean`` (``B,1,1``: each crop's image's)."""
        grid = backbone.grid(*crops.shape[-2:])
        attention = proxy_attention(proxy, self.beta, self.gamma, mean)
        x = backbone.run_blocks(backbone.embed(crops), 0, backbone.num_blocks - 1)
        return proxy_block_output(backbone, x, attention, grid, grid)

    def spliced_tokens(self, backbone, inputs: list[torch.Tensor], protocol: Protocol) -> list[torch.Tensor]:
        """Window tokens of normalised ``1,3,H,W`` inputs (sides multiples of 16) spliced: ``D,H/16,W/16`` each.

        Windows of equal size, from one image or several, share forward passes. The official code runs all windows
        of an image as one batch, so the proxy attention's similarity mean is taken over every window of the image
        (not per window as in ProxyCLIP): DINO runs on all windows first.
        """
        jobs = []
        for index, x in enumerate(inputs):
            height, width = x.shape[-2:]
            for w in inference.sliding_windows(height, width, protocol.crop or max(height, width), protocol.stride):
                if any(value % CELL for value in (w.y1, w.x1, w.y2, w.x2)):
                    raise ValueError(f"Trident's windows must start and end on {CELL}-pixel cells: use a crop and "
                                     f"stride that are multiples of {CELL} (got {protocol.crop}, {protocol.stride})")
                jobs.append((index, w))
        batch = self.windows_per_pass(backbone, protocol, max(max(x.shape[-2:]) for x in inputs))
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (_, w) in enumerate(jobs):
            groups.setdefault((w.y2 - w.y1, w.x2 - w.x1), []).append(j)
        chunks = [members[start:start + batch] for members in groups.values()
                  for start in range(0, len(members), batch)]

        def crops(chunk):
            return torch.cat([inputs[i][:, :, w.y1:w.y2, w.x1:w.x2] for i, w in (jobs[j] for j in chunk)])

        dino = self.dino_encoder(backbone)
        proxies: dict[int, torch.Tensor] = {}
        with inference.autocast(protocol.precision, inputs[0].device), timing.stage("dino"):
            for chunk in chunks:
                images = crops(chunk)
                proxy, grid = dino.patch_tokens(renormalise(images, CLIP_MEAN, CLIP_STD))
                if tuple(grid) != tuple(backbone.grid(*images.shape[-2:])):
                    raise ValueError(f"Trident needs a DINO with CLIP's patch size (its grid {tuple(grid)} differs "
                                     "from CLIP's); use a patch-16 DINO such as dino_vitb16")
                proxies.update(zip(chunk, proxy.float(), strict=True))
        sums, counts = [0.0] * len(inputs), [0] * len(inputs)
        for j, (i, _) in enumerate(jobs):
            sums[i] = sums[i] + proxy_similarity(proxies[j][None]).sum()
            counts[i] += proxies[j].shape[0] ** 2
        means = [total / count for total, count in zip(sums, counts, strict=True)]
        outputs: dict[int, torch.Tensor] = {}
        with inference.autocast(protocol.precision, inputs[0].device), timing.stage("clip"):
            for chunk in chunks:
                mean = torch.stack([means[jobs[j][0]] for j in chunk]).view(-1, 1, 1)
                tokens = self.window_tokens(backbone, crops(chunk), torch.stack([proxies[j] for j in chunk]), mean)
                outputs.update(zip(chunk, tokens.float(), strict=True))
        spliced = []
        for index, x in enumerate(inputs):
            mine = [j for j, (i, _) in enumerate(jobs) if i == index]
            cells = [(w.y1 // CELL, w.x1 // CELL, w.y2 // CELL, w.x2 // CELL) for w in (jobs[j][1] for j in mine)]
            spliced.append(splice_windows(torch.stack([outputs[j] for j in mine]), cells,
                                          (x.shape[-2] // CELL, x.shape[-1] // CELL)))
        return spliced

    # --- the whole pipeline -------------------------------------------------------------------------------------

    def predict(self, backbone, image, classifier, protocol):
        return self.predict_batch(backbone, [image], classifier, protocol)[0]

    @torch.inference_mode()
    def predict_batch(self, backbone, images, classifier, protocol, image_ids=None):
        """Trident on uint8 ``H0,W0,3`` images: SAM encoder passes batched on a GPU, windows of all images sharing
        CLIP/DINO passes, then per image the guided features, logits, scores and optional refinement."""
        with timing.stage("sam"):
            sam = self.sam_model(backbone)
            if self.sam_refinement:
                sam.require_decoder("Trident's SAM refinement")
            with inference.autocast(protocol.precision, backbone.device):
                branches = self.sam_guidance(sam, images, embedding=self.sam_refinement)
        with timing.stage("preprocess"):
            inputs = [trident_resize(inference.preprocess(image, protocol.short_side, protocol.max_long_side),
                                     protocol.crop or 0) for image in images]
        with timing.stage("vit"):
            spliced = self.spliced_tokens(backbone, inputs, protocol)
        if self.class_merge == "official":
            query_class = official_query_class(len(classifier.query_class), classifier.spec.num_classes)
            classifier = dataclasses.replace(classifier, query_class=query_class.to(classifier.query_class.device))
        return [self._finish(backbone, sam, image, x, tokens, branch, classifier, protocol)
                for image, x, tokens, branch in zip(images, inputs, spliced, branches, strict=True)]

    def _finish(self, backbone, sam, image, inputs, spliced, branch, classifier, protocol) -> dict:
        """Guided features -> logits at the image size -> scores and labels (-> SAM refinement) of one image."""
        with timing.stage("upsample"):
            features = backbone.head(guided_tokens(spliced, branch["guidance"], branch["grid"]).to(backbone.dtype))
            text = classifier.embeddings.to(features.dtype)
            logits = (F.normalize(features, dim=-1) @ text.T).T.reshape(-1, *branch["grid"]).float()
            logits = inference.upsample(logits, tuple(image.shape[:2]))
        scores, labels = self.scores_and_labels(logits, inputs[0], classifier, protocol)
        if self.sam_refinement:
            with timing.stage("sam_refinement"):
                labels, scores = refine_with_sam(
                    sam, branch["embedding"], (branch["input_size"], branch["original_size"]), labels, scores,
                    self.coarse_thresh, self.minimal_area, self.sam_iou_thresh, self.sam_mask_coff,
                    self.batched_mask_prompt)
        return {"logits": logits, "scores": scores, "labels": labels}

    def vit_passes(self, height, width, protocol):
        h, w = inference.resized_shape(height, width, protocol.short_side) if protocol.short_side else (height, width)
        h, w = trident_resize(torch.empty(1, 1, h, w, device="meta"), protocol.crop or 0).shape[-2:]
        return len(inference.sliding_windows(h, w, protocol.crop, protocol.stride)) if protocol.crop else 1

