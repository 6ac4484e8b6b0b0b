"""IP-CLIP (MAFT): one CLIP ViT pass that classifies any number of proposal masks of an image (spec A.3).

Blocks ``0 .. L-1`` run as plain CLIP. From block ``L`` on the class token is repeated once per proposal; copy
``i`` attends to itself and to the patches where the proposal, bilinearly resized to the patch grid, is at least
``mask_threshold``. Patch tokens attend to patches only. Two equal computations are offered: ``"naive"`` (one
attention over the ``N + P`` tokens with an additive mask, as the released code) and ``"split"`` (patch
self-attention once, masked cross-attention for the class tokens, chunked over proposals).

Layouts: images ``B,3,H,W`` (CLIP-normalised), masks ``B,N,h,w`` in ``[0, 1]``, grid masks ``B,N,P`` (bool).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.models.encoder import TO_SIZE_ALIGNED, DenseEncoder, Normalization
from vocabseg.pipeline.preprocess import preprocess

#: CLIP statistics in 0..255 units at full precision (spec A.3 item 1).
MAFT_NORMALIZATION = Normalization((0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255),
                                   (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255))

#: The 14 ViLD-style prompt templates MAFT's text classifier averages over.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
    "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.", "a photo of a large {}.",
    "This is a photo of a small {}.", "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.", "There is a large {} in the scene.",
)


def default_start_layer(num_blocks: int) -> int:
    """The first masked block: 8 of 12 (ViT-B/16), 16 of 24 (ViT-L/14), two thirds in general."""
    return (2 * num_blocks) // 3


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """``height, width`` rounded up to a multiple of ``multiple`` (detectron2's ``ImageList``; 0: unchanged)."""
    if multiple <= 0:
        return height, width
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def resize_shortest_edge(image: torch.Tensor, short_side: int, max_size: int = 2560) -> torch.Tensor:
    """uint8 ``H,W,3`` resized as detectron2's ``ResizeShortestEdge`` test transform (MAFT's ``MIN_SIZE_TEST`` 640,
    ``MAX_SIZE_TEST`` 2560): the short side to ``short_side``, the long side capped at ``max_size``, sizes rounded
    half up, PIL bilinear on the 8-bit image."""
    from PIL import Image

    height, width = image.shape[:2]
    scale = short_side / min(height, width)
    new_h, new_w = (short_side, scale * width) if height < width else (scale * height, short_side)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    size = (int(new_w + 0.5), int(new_h + 0.5))
    if size == (width, height):
        return image
    resized = Image.fromarray(image.cpu().numpy()).resize(size, Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).to(image.device)


def prepare_image(image: torch.Tensor, size: int = 480, multiple: int = 0) -> torch.Tensor:
    """uint8 ``H,W,3`` -> ``1,3,size,size`` as MAFT's inference: normalise (full-precision CLIP statistics),
    zero-pad at the bottom and right to a multiple of ``multiple`` (detectron2's ``ImageList``, 32 in the released
    configs), then bilinear resize of the padded image to ``size x size`` (the aspect ratio is not kept)."""
    x = preprocess(image, None, normalization=MAFT_NORMALIZATION)
    height, width = x.shape[-2:]
    padded_h, padded_w = padded_size(height, width, multiple)
    x = F.pad(x, (0, padded_w - width, 0, padded_h - height))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def grid_masks(masks: torch.Tensor, grid: tuple[int, int], threshold: float = 0.5, keep_small: bool = False
               ) -> torch.Tensor:
    """Soft masks ``B,N,h,w`` -> allowed patches ``B,N,P``: bilinear resize (align_corners=False), ``>= threshold``.

    ``keep_small``: a mask that is non-empty at full resolution but has no patch above the threshold keeps the
    patch it covers most (area average); otherwise it becomes empty and its class token sees only itself, as in
    the released code. Bilinear downsampling samples sparse points, so it can miss small masks entirely.
    """
    b, n = masks.shape[:2]
    flat = masks.reshape(b * n, 1, *masks.shape[-2:]).float()
    small = F.interpolate(flat, size=grid, mode="bilinear", align_corners=False).reshape(b, n, -1)
    allowed = small >= threshold
    if keep_small:
        lost = ~allowed.any(-1) & (masks.flatten(2) > 0).any(-1)
        cover = F.interpolate(flat, size=grid, mode="area").reshape(b, n, -1)
        best = F.one_hot(cover.argmax(-1), cover.shape[-1]).bool()
        allowed = allowed | (best & lost[..., None])
    return allowed


class IPCLIP:
    """The IP-CLIP encoder over a CLIP image encoder with one class token (no weights of its own). Position
    embeddings are resized straight to the input's grid with ``align_corners=True``, as MAFT's code does."""

    def __init__(self, encoder: DenseEncoder, start_layer: int | None = None, mask_threshold: float = 0.5,
                 keep_small: bool = False, path: str = "split", chunk: int = 128):
        if path not in ("split", "naive"):
            raise UsageError(f"IP-CLIP attention path must be 'split' or 'naive' (got {path!r})")
        if encoder.prefix_tokens != 1:
            raise UsageError(f"IP-CLIP repeats the image encoder's class token per proposal; "
                             f"{encoder.name or 'this encoder'} has {encoder.prefix_tokens} prefix tokens, not one "
                             "class token (use a CLIP ViT such as OpenAI's, LAION's or MetaCLIP's)")
        self.encoder = encoder
        self.start_layer = default_start_layer(encoder.num_blocks) if start_layer is None else int(start_layer)
        if not 0 <= self.start_layer <= encoder.num_blocks:
            raise UsageError(f"start_layer must lie in 0..{encoder.num_blocks} (got {self.start_layer})")
        self.mask_threshold = mask_threshold
        self.keep_small = keep_small
        self.path = path
        self.chunk = chunk

    def allowed_patches(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The patches each proposal's class token sees: :func:`grid_masks` of masks ``B,N,h,w`` on the token grid
        of ``images`` ``B,3,H,W`` -> ``B,N,P``."""
        if masks.dim() != 4 or masks.shape[0] != images.shape[0]:
            raise ValueError(f"masks must be B,N,h,w with B={images.shape[0]} (got {tuple(masks.shape)})")
        grid = self.encoder.grid(*images.shape[-2:])
        return grid_masks(masks.to(images.device), grid, self.mask_threshold, self.keep_small)

    def encode(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised embeddings: ``B,N,E`` per proposal, or ``B,E`` for the whole image when ``masks`` is None."""
        if masks is None:
            return self.encode_image(images)
        return self.encode_allowed(images, self.allowed_patches(images, masks))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Plain CLIP: the class token's L2-normalised embedding ``B,E``."""
        enc = self.encoder
        return F.normalize(enc.head(enc.run_blocks(enc.embed(images, TO_SIZE_ALIGNED))[:, 0]), dim=-1)

    def encode_allowed(self, images: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """L2-normalised proposal embeddings ``B,N,E`` given each proposal's allowed patches ``B,N,P`` (bool)."""
        enc = self.encoder
        x = enc.run_blocks(enc.embed(images, TO_SIZE_ALIGNED), 0, self.start_layer)
        cls = x[:, :1].expand(-1, allowed.shape[1], -1)
        patches = x[:, 1:]
        step = self._naive_block if self.path == "naive" else self._split_block
        for index in range(self.start_layer, enc.num_blocks):
            cls, patches = step(index, cls, patches, allowed)
        return F.normalize(enc.head(cls), dim=-1)

    def _naive_block(self, index, cls, patches, allowed):
        n = cls.shape[1]
        p = patches.shape[1]
        seq = torch.cat([cls, patches], dim=1)
        allow = torch.zeros(seq.shape[0], n + p, n + p, dtype=torch.bool, device=seq.device)
        allow[:, :n, :n] = torch.eye(n, dtype=torch.bool, device=seq.device)
        allow[:, :n, n:] = allowed
        allow[:, n:, n:] = True
        bias = torch.zeros(allow.shape, dtype=seq.dtype, device=seq.device).masked_fill_(~allow, float("-inf"))
        q, k, v = self.encoder.qkv(index, seq)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None])
        seq = self.encoder.ffn(index, seq + self.encoder.attention_out(index, heads))
        return seq[:, :n], seq[:, n:]

    def _split_block(self, index, cls, patches, allowed):
        enc = self.encoder
        qp, kp, vp = enc.qkv(index, patches)
        new_patches = enc.ffn(index, patches + enc.attention_out(index, F.scaled_dot_product_attention(qp, kp, vp)))
        outputs = []
        for start in range(0, cls.shape[1], self.chunk):
            part = cls[:, start:start + self.chunk]
            qc, kc, vc = enc.qkv(index, part)
            scale = qc.shape[-1] ** -0.5
            to_patches = (qc @ kp.transpose(-1, -2)) * scale  # B,h,n,P
            to_patches = to_patches.masked_fill(~allowed[:, None, start:start + self.chunk], float("-inf"))
            to_self = (qc * kc).sum(-1, keepdim=True) * scale  # B,h,n,1
            weights = torch.softmax(torch.cat([to_self, to_patches], dim=-1), dim=-1)
            heads = weights[..., :1] * vc + weights[..., 1:] @ vp
            outputs.append(enc.ffn(index, part + enc.attention_out(index, heads)))
        return torch.cat(outputs, dim=1), new_patches


def is_trainable(name: str, policy: str = "maft") -> bool:
    """Whether a CLIP parameter trains under ``policy`` (names as in ``model.named_parameters()``).

    ``"maft"`` (spec A.3 item 9): every image-block parameter except the MLPs (attention projections, ``ln_1``,
    ``ln_2``) and ``ln_post``; ``"attention"``: the attention projections only; ``"all"``: the whole image tower.
    """
    if not name.startswith("visual."):
        return False
    name = name[len("visual."):]
    in_block = name.startswith("transformer.resblocks.")
    if policy == "maft":
        return (in_block and ".mlp." not in name) or name.startswith("ln_post.")
    if policy == "attention":
        return in_block and ".attn." in name
    if policy == "all":
        return True
    raise UsageError(f"unknown freeze policy {policy!r}; use maft, attention or all")


def set_trainable(model: torch.nn.Module, policy: str = "maft") -> list[str]:
    """Set ``requires_grad`` on a CLIP model by ``policy`` (see :func:`is_trainable`); returns the trainable names."""
    names = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_trainable(name, policy))
        if parameter.requires_grad:
            names.append(name)
    return names
