"""The interfaces dense methods program against: a ViT image encoder seen as primitives, a text encoder, a CLIP
pair of both, and the set of models a method runs on.

Layouts: images ``B,3,H,W`` (normalised); token sequences ``B,T,D`` with the ``prefix_tokens`` (class token,
registers) first, then the ``gh*gw`` patch tokens in row-major order; per-head tensors ``B,heads,T,head_dim``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation ``(x / unit - mean) / std`` of RGB pixel values ``x`` in 0..255.

    ``unit=255`` is torchvision's ``ToTensor`` + ``Normalize`` (statistics in 0..1); ``unit=1`` is the mmcv/mmseg
    convention (statistics in 0..255). The two differ in float rounding, so each official pipeline's own form is
    kept.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    unit: float = 1.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel values ``B,3,H,W`` (0..255, any dtype) -> normalised float32."""
        x = images.float()
        if self.unit != 1:
            x = x / self.unit
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``B,3,H,W`` -> pixel values in this normalisation's units (``x * std + mean``)."""
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return images * std + mean


#: CLIP's statistics as the mmseg configs of the SCLIP lineage write them (0..255).
CLIP_NORMALIZATION = Normalization((122.771, 116.746, 104.094), (68.501, 66.632, 70.323))
#: CLIP's statistics in OpenAI's own preprocessing (torchvision ``ToTensor`` + ``Normalize``).
OPENAI_NORMALIZATION = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 255.0)
#: ImageNet statistics of the mmseg 0.x configs (MaskCLIP's own protocol).
IMAGENET_NORMALIZATION = Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
#: ImageNet statistics in torchvision's form (DINO, DINOv2).
IMAGENET_TORCHVISION_NORMALIZATION = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0)
#: SigLIP's statistics (0.5 / 0.5, torchvision's form).
SIGLIP_NORMALIZATION = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 255.0)


@dataclass(frozen=True)
class PositionResize:
    """How a position-embedding grid is resized to another token grid (bicubic unless ``mode`` says otherwise).

    ``by="scale"`` calls the interpolation with scale factors ``(g + offset) / g0`` (the output size floors to the
    target; the sampling positions follow the scale factor), ``by="size"`` resizes straight to the target size.
    """

    by: str = "scale"
    offset: float = 0.1
    align_corners: bool = False
    antialias: bool = False
    mode: str = "bicubic"

    def __call__(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``1,D,g0h,g0w`` -> ``1,D,gh,gw``."""
        if tuple(grid.shape[-2:]) == tuple(size):
            return grid
        common = dict(mode=self.mode, align_corners=self.align_corners, antialias=self.antialias)
        if self.by == "scale":
            factors = tuple((g + self.offset) / g0 for g, g0 in zip(size, grid.shape[-2:], strict=True))
            out = F.interpolate(grid, scale_factor=factors, **common)
        else:
            out = F.interpolate(grid, size=tuple(size), **common)
        if tuple(out.shape[-2:]) != tuple(size):
            raise RuntimeError(f"position embedding resized to {tuple(out.shape[-2:])}, wanted {tuple(size)}")
        return out


#: The DINO trick of the SCLIP lineage: bicubic with scale factors (g + 0.1) / g0.
SCALE_PLUS_OFFSET = PositionResize("scale", 0.1)
#: Bicubic straight to the target size (official MaskCLIP).
TO_SIZE = PositionResize("size", 0.0)
#: Bicubic straight to the target size with ``align_corners=True`` (MAFT's IP-CLIP).
TO_SIZE_ALIGNED = PositionResize("size", 0.0, align_corners=True)
#: Bicubic straight to the target size with antialiasing (DINOv2 with registers).
TO_SIZE_ANTIALIASED = PositionResize("size", 0.0, antialias=True)


class DenseEncoder(abc.ABC):
    """A ViT image encoder as the primitives dense recipes are written with (see the module docstring for layouts).

    Every block ``i`` is ``x + attn(norm1(x))`` then ``+ ffn(norm2(.))``; a recipe may run blocks unchanged
    (:meth:`run_blocks`) or rebuild one from :meth:`qkv`, its own attention, :meth:`attention_out` and :meth:`ffn`.
    :meth:`head` is the per-token readout into the embedding space (final norm and projection, applied to every
    token, not only the pooled one).
    """

    name: str = ""
    source: str = ""
    patch_size: int
    prefix_tokens: int
    num_blocks: int
    num_heads: int
    width: int
    embed_dim: int
    #: The input normalisation the weights were trained with.
    normalization: Normalization
    #: How :meth:`embed` resizes position embeddings when not told otherwise.
    position_resize: PositionResize = SCALE_PLUS_OFFSET

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype: ...

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an input: the strided patch convolution floors."""
        return height // self.patch_size, width // self.patch_size

    @abc.abstractmethod
    def embed(self, images: torch.Tensor, resize: PositionResize | None = None) -> torch.Tensor:
        """Patch embedding, prefix tokens and position embeddings (resized by ``resize``): ``B,3,H,W -> B,T,D``."""

    @abc.abstractmethod
    def block(self, index: int, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``index`` unchanged (``attn_mask``: an additive ``T,T`` mask)."""

    def run_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks ``start .. end-1`` unchanged."""
        for index in range(start, self.num_blocks if end is None else end):
            x = self.block(index, x, attn_mask)
        return x

    @abc.abstractmethod
    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of block ``index`` from its first norm of ``x``, each ``B,heads,T,head_dim`` (with the block's
        q/k norms when it has them)."""

    @abc.abstractmethod
    def attention_out(self, index: int, heads: torch.Tensor) -> torch.Tensor:
        """Concatenated heads ``B,heads,T,hd`` through block ``index``'s output projection (and layer scale)."""

    @abc.abstractmethod
    def ffn(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``x + FFN(norm2(x))`` of block ``index`` (with its layer scale)."""

    @abc.abstractmethod
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token readout into the embedding space: ``B,T,D -> B,T,E``."""

    def fingerprint(self) -> str:
        """A content hash of the weights, to key caches of this model's outputs."""
        from vocabseg.models.checkpoints import state_fingerprint

        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = state_fingerprint(self.state_items())
        return self._fingerprint

    @abc.abstractmethod
    def state_items(self):
        """``(name, tensor)`` pairs of the weights (for :meth:`fingerprint`)."""


class TextEncoder(abc.ABC):
    """A text tower: prompts -> unnormalised embeddings ``N,E``."""

    embed_dim: int

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unnormalised embeddings ``(len(texts), E)``."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A content hash of the tower and its tokenizer, to key the text-embedding cache."""


@dataclass(eq=False)
class CLIP:
    """A CLIP-like model: a dense image encoder and a text encoder sharing one embedding space."""

    image: DenseEncoder
    text: TextEncoder
    name: str
    source: str
    logit_scale: float = 100.0

    @property
    def device(self) -> torch.device:
        return self.image.device

    def describe(self) -> dict[str, str]:
        return {"arch": self.name, "source": self.source}


class Models(Mapping[str, Any]):
    """The models a method runs on, by role (``models.clip``, ``models.dino``); read-only."""

    def __init__(self, models: Mapping[str, Any]):
        self._models = dict(models)

    def __getitem__(self, role: str) -> Any:
        return self._models[role]

    def __getattr__(self, role: str) -> Any:
        try:
            return self._models[role]
        except KeyError:
            raise AttributeError(f"no {role!r} model here (roles: {', '.join(self._models) or 'none'})") from None

    def __iter__(self):
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    @property
    def device(self) -> torch.device:
        """The device of the first model (all models of a segmenter share one)."""
        first = next(iter(self._models.values()))
        return first.device

    def describe(self) -> dict[str, dict[str, str]]:
        """Each model's architecture and weights source, for run descriptions and eval fingerprints."""
        return {role: model.describe() if hasattr(model, "describe") else {"arch": getattr(model, "name", ""),
                                                                              "source": getattr(model, "source", "")}
                for role, model in self._models.items()}


def require_class_token(encoder: DenseEncoder, method: str) -> None:
    """Refuse an encoder without a class token for a recipe that reads one."""
    if encoder.prefix_tokens < 1:
        raise UsageError(f"{method} reads the image encoder's class token, which {encoder.name or 'this encoder'} "
                         "does not have; use a CLIP with a class token (e.g. OpenAI, LAION or MetaCLIP ViTs)")
