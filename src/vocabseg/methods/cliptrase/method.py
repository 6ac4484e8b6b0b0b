"""CLIPtrase (Shao et al., ECCV 2024): self-correlation recalibration and clustering (spec section 2.6).

* Semantic correlation. Block ``L-1`` (the second to last) runs unchanged; from its q, k, v (``ln_1`` input, per
  head) it also gives ``W = mean_h (cos(q_i, q_j) + cos(k_i, k_j) + cos(v_i, v_j)) / 3``, a ``(1+N) x (1+N)``
  matrix over all tokens.
* Last block: ``A_h = softmax(s QQ^T) + softmax(s KK^T) + softmax(s VV^T)`` (rows sum to 3), residual and FFN
  kept; patch logits are cosines with the text.
* Clustering. ``R = max(W[1:, 1:] - W[0, 1:], 0)`` (the class-token row subtracted column-wise); DBSCAN
  (Euclidean, on the rows of R; eps 0.7 / min_samples 3 at 224, 1.1 / 7 at 336); each cluster's map is the mean
  of its member rows, upsampled x4 (bilinear), median-filtered (7), upsampled to the output size; every pixel takes
  the cluster of highest map and every cluster region takes the majority predicted class. Without any cluster the
  raw argmax stays. The clusters are returned as class-agnostic ``masks``.

Two protocols (option ``protocol_mode``):

* ``"paper"``: CLIPtrase's own. Short side to ``short_side`` (bicubic, PIL), OpenAI's ``ToTensor`` + ``Normalize``,
  optionally a centre crop of ``short_side x short_side`` (``center_crop``, on in the presets), one whole-image
  pass, no sliding window. With the centre crop the result covers only the cropped region of the original image;
  pixels outside are 255 (ignore), and ``meta["crop_box"]`` gives the region ``(y1, y2, x1, x2)`` in original pixels.
* ``"harness"``: the common SCLIP-lineage harness (bilinear resize, sliding windows, PAMR and thresholds as set),
  with the clustering computed on one extra whole-image pass of the resized input; for comparisons under one
  protocol.

Presets ``<dataset>-224`` and ``<dataset>-336`` reproduce the paper's two input sizes on its nine benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import Method, Preset
from vocabseg.methods.registry import register
from vocabseg.models.encoder import OPENAI_NORMALIZATION
from vocabseg.pipeline import timing, windows
from vocabseg.pipeline.preprocess import preprocess
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.run import Dense, Prepared

#: DBSCAN settings of the paper per input size: size -> (eps, min_samples).
DBSCAN_PARAMS = {224: (0.7, 3), 336: (1.1, 7)}
#: The nine benchmarks CLIPtrase reports (its presets: ``<dataset>-224`` and ``<dataset>-336``).
CLIPTRASE_DATASETS = ("coco-stuff", "voc20", "pc59", "pc459", "ade150", "ade847", "coco-object", "voc21", "pc60")
# --- the two modified blocks ------------------------------------------------------------------------------------

def semantic_correlation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``mean_h (cos(q_i,q_j) + cos(k_i,k_j) + cos(v_i,v_j)) / 3`` of ``B,heads,T,hd`` tensors -> ``B,T,T``."""
    total = None
    for t in (q, k, v):
        t = F.normalize(t.float(), dim=-1)
        cos = t @ t.transpose(-1, -2)
        total = cos if total is None else total + cos
    return (total / 3).mean(dim=1)


def trase_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Head outputs ``(softmax(s QQ^T) + softmax(s KK^T) + softmax(s VV^T)) V`` (``B,heads,T,hd``)."""
    scale = q.shape[-1] ** -0.5
    attn = sum(torch.softmax(scale * t @ t.transpose(-1, -2), dim=-1) for t in (q, k, v))
    return attn @ v


# --- clustering -------------------------------------------------------------------------------------------------

def denoised_correlation(correlation: torch.Tensor) -> torch.Tensor:
    """``R = max(W[1:,1:] - W[0,1:], 0)``: patch-patch correlation minus the class token's, column-wise."""
    return (correlation[1:, 1:] - correlation[0:1, 1:]).clamp(min=0)


def dbscan_labels(rows: torch.Tensor, eps: float, min_samples: int) -> np.ndarray:
    """scikit-learn DBSCAN (Euclidean) on the rows of ``rows`` (``N,D``); -1 marks noise."""
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=eps, min_samples=min_samples).fit_predict(rows.detach().float().cpu().numpy())


def cluster_maps(rows: torch.Tensor, labels: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """The mean of each cluster's member rows, as ``K,gh,gw`` maps (clusters in increasing id; noise excluded)."""
    ids = [int(c) for c in np.unique(labels) if c >= 0]
    if not ids:
        return rows.new_zeros(0, *grid)
    label_t = torch.as_tensor(labels, device=rows.device)
    return torch.stack([rows[label_t == c].mean(dim=0) for c in ids]).reshape(len(ids), *grid)


def median_filter(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``scipy.ndimage.median_filter(m, size)`` of each ``H,W`` map of ``maps`` (``K,H,W``), on the maps' device:
    a ``size x size`` window centred at ``size // 2``, edges mirrored with the edge value repeated (scipy's
    ``reflect``), and the ``n // 2``-th smallest of its ``n`` values (0-based; the upper median when ``n`` is even).
    """
    height, width = maps.shape[-2:]
    before, after = size // 2, size - 1 - size // 2

    def reflect(n: int) -> torch.Tensor:
        index = torch.arange(-before, n + after, device=maps.device)
        index = torch.where(index < 0, -index - 1, index)
        return torch.where(index >= n, 2 * n - 1 - index, index).clamp(0, n - 1)

    padded = maps[:, reflect(height)][:, :, reflect(width)]
    windows = padded.unfold(1, size, 1).unfold(2, size, 1).reshape(*maps.shape, size * size)
    return windows.kthvalue(size * size // 2 + 1, dim=-1).values


def cluster_assignment(maps: torch.Tensor, size: tuple[int, int], ratio: int = 4, median: int = 7) -> torch.Tensor:
    """Pixel-to-cluster map ``H,W``: maps upsampled x``ratio`` (bilinear), median-filtered, upsampled to ``size``,
    argmax over clusters."""
    _, gh, gw = maps.shape
    up = F.interpolate(maps[None].float(), size=(ratio * gh, ratio * gw), mode="bilinear", align_corners=False)[0]
    if median and median > 1:
        up = median_filter(up, median)
    up = F.interpolate(up[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return up.max(dim=0).indices  # the argmax (torch's argmax over a leading dim is ~20x slower on CPU)


def majority_vote(labels: torch.Tensor, assignment: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Every cluster region takes its most frequent label (ties: the smallest label)."""
    span = int(labels.max()) + 1
    counts = torch.bincount((assignment * span + labels).flatten(), minlength=num_clusters * span)
    winners = counts.view(num_clusters, span).max(dim=1).indices  # the first maximum: the smallest label
    return winners[assignment].to(labels.dtype)


def paper_resize(image: torch.Tensor, size: int | None, center_crop: bool
                 ) -> tuple[torch.Tensor, tuple[tuple[int, int, int, int], tuple[int, int]] | None]:
    """torchvision's ``Resize(size, BICUBIC)`` (PIL) then ``CenterCrop(size)`` of a uint8 ``H,W,3`` image.

    Returns the processed image and, with the crop, its box ``(top, top+size, left, left+size)`` in the pixels of
    the resized image and that image's size ``(h, w)``.
    """
    from PIL import Image

    height, width = image.shape[:2]
    array = image.cpu().numpy()
    if size:
        short, long = sorted((height, width))
        new_short, new_long = size, int(size * long / short)
        new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
        if (new_h, new_w) != (height, width):
            array = np.array(Image.fromarray(array).resize((new_w, new_h), Image.BICUBIC))
    box = None
    if center_crop and size:
        h, w = array.shape[:2]
        top, left = round((h - size) / 2.0), round((w - size) / 2.0)
        array = array[top:top + size, left:left + size]
        box = ((top, top + size, left, left + size), (h, w))
    return torch.from_numpy(np.ascontiguousarray(array)).to(image.device), box


def original_region(box: tuple[int, int, int, int], resized: tuple[int, int], original: tuple[int, int]
                    ) -> tuple[int, int, int, int]:
    """A box ``(y1, y2, x1, x2)`` of the resized image mapped to the original's pixels (at least one pixel)."""
    (top, bottom, left, right), (rh, rw), (height, width) = box, resized, original
    y1, y2 = round(top * height / rh), round(bottom * height / rh)
    x1, x2 = round(left * width / rw), round(right * width / rw)
    return y1, max(y2, y1 + 1), x1, max(x2, x1 + 1)


@register
@dataclass
class CLIPtrase(Method):
    """CLIPtrase: q-q + k-k + v-v last block, block-11 semantic correlation, DBSCAN clusters voting on labels."""

    name: ClassVar[str] = "cliptrase"
    summary: ClassVar[str] = ("q-q + k-k + v-v attention, correlation clustering (DBSCAN) with majority vote "
                              "(Shao et al. 2024)")
    needs_class_token: ClassVar[bool] = True
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "cliptrase")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "cliptrase")

    protocol_mode: Literal["paper", "harness"] = "paper"
    center_crop: bool = False
    clustering: bool = True
    eps: float | None = None  # None: the paper's value for the nearest input size (by token count)
    min_samples: int | None = None
    cls_prior: bool = False
    upsample_ratio: int = 4
    median_size: int = 7

    def __post_init__(self):
        if self.eps is not None and self.eps <= 0:
            raise UsageError(f"eps must be positive (got {self.eps})")
        if self.min_samples is not None and self.min_samples < 1:
            raise UsageError(f"min_samples must be at least 1 (got {self.min_samples})")

    # --- forward ------------------------------------------------------------------------------------------------

    def encode(self, encoder, images: torch.Tensor, correlation: bool = False):
        """Normalised features of all tokens ``B,T,E``, the grid and (optionally) block ``L-1``'s correlation."""
        if encoder.num_blocks < 2:
            raise UsageError("CLIPtrase needs an image encoder with at least two blocks")
        grid = encoder.grid(*images.shape[-2:])
        last = encoder.num_blocks - 1
        x = encoder.run_blocks(encoder.embed(images), 0, last - 1)
        corr = semantic_correlation(*encoder.qkv(last - 1, x)) if correlation else None
        x = encoder.block(last - 1, x)
        q, k, v = encoder.qkv(last, x)
        x = encoder.ffn(last, x + encoder.attention_out(last, trase_attention(q, k, v)))
        return F.normalize(encoder.head(x), dim=-1), grid, corr

    def encode_at(self, precision: str, encoder, images: torch.Tensor, correlation: bool = False):
        """:meth:`encode` under ``precision``'s autocast, with float32 results."""
        with windows.autocast(precision, images.device):
            features, grid, corr = self.encode(encoder, images, correlation)
        return features.float(), grid, None if corr is None else corr.float()

    def patch_features(self, encoder, crops):
        features, grid, _ = self.encode(encoder, crops)
        return features[:, 1:], grid

    def dbscan_params(self, num_tokens: int) -> tuple[float, int]:
        """The configured eps/min_samples, or the paper's for the nearest input size by token count."""
        nearest = min(DBSCAN_PARAMS, key=lambda s: abs((s // 16) ** 2 - num_tokens))
        eps, min_samples = DBSCAN_PARAMS[nearest]
        return (float(self.eps) if self.eps is not None else eps,
                int(self.min_samples) if self.min_samples is not None else min_samples)

    def clusters(self, correlation: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]):
        """Pixel-to-cluster assignment ``H,W`` and the number of clusters (0: no cluster) of one image."""
        rows = denoised_correlation(correlation)
        eps, min_samples = self.dbscan_params(rows.shape[0])
        labels = dbscan_labels(rows, eps, min_samples)
        maps = cluster_maps(rows, labels, grid)
        if maps.shape[0] == 0:
            return None, 0
        return cluster_assignment(maps, size, self.upsample_ratio, self.median_size), maps.shape[0]

    def _cls_prior(self, logits: torch.Tensor, cls_feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """VOC20's image-level prior: logits times the class token's cosines, rescaled to mean magnitude 1 (the
        argmax of the official product of the two logit maps)."""
        prior = cls_feature @ text.T
        prior = prior / prior.abs().mean().clamp_min(1e-6)
        return logits * prior[:, None, None]

    # --- the pipeline's hooks -----------------------------------------------------------------------------------

    def prepare(self, models, image, protocol, image_id=None):
        if self.protocol_mode == "harness":
            return super().prepare(models, image, protocol, image_id)
        resized, box = paper_resize(image, protocol.short_side, self.center_crop)
        inputs = preprocess(resized, None, normalization=OPENAI_NORMALIZATION)
        if box is None:
            return Prepared(image, inputs, image_id)
        region = original_region(*box, (int(image.shape[0]), int(image.shape[1])))
        return Prepared(image, inputs, image_id, output_size=tuple(resized.shape[:2]), region=region)

    def dense(self, models, inputs, classifier, protocol):
        """Paper protocol: one whole-image pass per image (images of one size share it), the correlation from the
        same pass, grid logits upsampled straight to the output size. Harness protocol: the common windows, plus one
        whole-image pass for the correlation (and the class-token prior) when they are on."""
        harness = self.protocol_mode == "harness"
        windowed = super().dense(models, inputs, classifier, protocol) if harness and protocol.crop else None
        passes = self._whole_passes(models.clip.image, inputs, protocol.precision) \
            if windowed is None or self.clustering or self.cls_prior else [(None, None, None)] * len(inputs)
        text = classifier.embeddings.float()
        out = []
        for index, (prepared, (features, grid, correlation)) in enumerate(zip(inputs, passes, strict=True)):
            if windowed is not None:
                logits = windowed[index].logits
            else:
                size = prepared.input.shape[-2:] if harness else prepared.size
                logits = windows.grid_logits_to_crop(features[:, 1:] @ text.T, grid, size)[0]
            if self.cls_prior:
                logits = self._cls_prior(logits, features[0, 0], text)
            masks = None
            if correlation is not None:
                with timing.stage("cluster"):
                    masks = self.cluster_masks(correlation, grid, prepared.size)
            out.append(Dense(logits, masks=masks))
        return out

    def cluster_masks(self, correlation: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """The clusters of one image as masks ``K,H,W`` (bool; ``K = 0`` without any cluster)."""
        assignment, count = self.clusters(correlation, grid, size)
        if not count:
            return torch.zeros(0, *size, dtype=torch.bool, device=correlation.device)
        return assignment[None] == torch.arange(count, device=assignment.device)[:, None, None]

    def _whole_passes(self, encoder, inputs: list[Prepared], precision: str) -> list[tuple]:
        """``(features 1,T,E, grid, correlation T,T or None)`` of each whole input; inputs of one size share a
        forward pass."""
        by_size: dict[tuple, list[int]] = {}
        for index, prepared in enumerate(inputs):
            by_size.setdefault(tuple(prepared.input.shape[-2:]), []).append(index)
        passes: list[tuple] = [None] * len(inputs)
        for indices in by_size.values():
            with timing.stage("vit"):
                features, grid, corr = self.encode_at(precision, encoder, torch.cat([inputs[i].input for i in indices]),
                                                      self.clustering)
            for row, index in enumerate(indices):
                passes[index] = (features[row:row + 1], grid, None if corr is None else corr[row])
        return passes

    def refine_labels(self, labels, prepared, dense, protocol):
        """Every cluster region takes its majority label."""
        if dense.masks is None or not len(dense.masks):
            return labels
        assignment = dense.masks.int().argmax(dim=0)
        return majority_vote(labels, assignment, dense.masks.shape[0])

    def forward_passes(self, height, width, protocol):
        if self.protocol_mode == "paper" or not protocol.crop:
            return 1
        extra = 1 if (self.clustering or self.cls_prior) else 0
        return super().forward_passes(height, width, protocol) + extra
