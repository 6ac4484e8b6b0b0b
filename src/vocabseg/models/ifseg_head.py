"""The head of ``ifseg-clip`` (spec B.10), a model of its own (the ``ifseg_head`` kind, loaded from a checkpoint of
``vocabseg train ifseg-clip`` by :func:`load_ifseg_head`): a light transformer over dense features of a training-free
recipe.

Features ``z_p`` (L2-normalised, ``E``-dim, on a ``gh x gw`` grid) come from a frozen backbone through a
training-free recipe (ClearCLIP by default). The head returns ``z'_p = z_p + W_out h_p`` where ``h`` is a small
pre-LN transformer over the (optionally centred) features with learned 2D positions, bilinearly resized to any
grid; ``W_out`` starts at zero, so an untrained head returns the recipe's features unchanged and its logits
``<z'_p, t_q>`` equal the training-free baseline exactly. Nothing in the head depends on the class list: a head
trained on one vocabulary applies to another (the cross-dataset protocol).

Modality centring (spec B.10-4): the head's input is ``normalize(z - mu)`` with ``mu`` the mean text embedding
of the training words during training and the image's mean patch feature at test time, so only the test image
itself is used. The residual is added to the uncentred ``z``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vocabseg.models.checkpoints import WeightsError, read_training_checkpoint

#: Format tag of the checkpoints ``vocabseg train ifseg-clip`` writes.
CHECKPOINT_FORMAT = "vocabseg-ifseg/1"


@dataclass(frozen=True)
class HeadConfig:
    """Shape of the head, stored in checkpoints."""

    embed_dim: int
    width: int = 256
    layers: int = 2
    heads: int = 8
    base_grid: tuple[int, int] = (16, 16)
    centering: bool = True
    recipe: str = "clearclip"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        return cls(**{**data, "base_grid": tuple(data["base_grid"])})


class IFSegHead(nn.Module):
    """Residual refinement of dense features; zero-initialised output so it starts as the identity."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width {config.width} must be a multiple of heads {config.heads}")
        self.config = config
        self.inp = nn.Linear(config.embed_dim, config.width)
        self.pos = nn.Parameter(torch.randn(1, config.width, *config.base_grid) * 0.02)
        layer = nn.TransformerEncoderLayer(config.width, config.heads, 4 * config.width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, config.embed_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Learned positions resized to ``grid``: ``gh*gw, width``."""
        pos = self.pos
        if tuple(grid) != tuple(pos.shape[-2:]):
            pos = F.interpolate(pos, size=tuple(grid), mode="bilinear", align_corners=False)
        return pos.flatten(2)[0].T

    def forward(self, features: torch.Tensor, grid: tuple[int, int], center: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``B,N,E`` features on ``grid`` -> refined ``B,N,E``; ``center`` (``E`` or ``B,1,E``) is subtracted
        from the head's input when centring is on (default: each image's mean feature)."""
        x = features
        if self.config.centering:
            if center is None:
                center = features.mean(dim=1, keepdim=True)
            x = F.normalize(features - center, dim=-1)
        h = self.inp(x) + self.positions(grid).to(x.dtype)
        h = self.norm(self.blocks(h))
        return features + self.out(h)


@dataclass(frozen=True, eq=False)
class LoadedHead:
    """The ``ifseg_head`` model of ``ifseg-clip``: a trained head (eval mode) and its checkpoint, or no head
    (``head=None``: the untrained head, which is the identity, so the recipe's features pass unchanged)."""

    head: IFSegHead | None
    source: str
    device: torch.device
    checkpoint: dict

    @property
    def name(self) -> str:
        if self.head is None:
            return "untrained"
        config = self.head.config
        return f"ifseg-head-w{config.width}-l{config.layers}-{config.recipe}"

    @property
    def recipe(self) -> str | None:
        """The training-free method the head was trained over (``None`` without a head)."""
        return None if self.head is None else self.head.config.recipe


def load_head_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint of ``vocabseg train ifseg-clip`` safely (``weights_only=True``)."""
    return read_training_checkpoint(path, CHECKPOINT_FORMAT, "IFSeg checkpoint", "train ifseg-clip")


def load_ifseg_head(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LoadedHead:
    """The trained head of a checkpoint on ``device``; ``None``: no head (the untrained identity)."""
    device = torch.device(device)
    if weights is None:
        return LoadedHead(None, "untrained", device, {})
    state = load_head_checkpoint(weights)
    head = IFSegHead(HeadConfig.from_dict(state["head_config"]))
    head.load_state_dict(state["head"])
    return LoadedHead(head.eval().to(device), str(Path(weights).resolve()), device, state)


def check_feature_width(loaded: LoadedHead, embed_dim: int) -> None:
    """Refuse a head trained for features of another width than the CLIP's."""
    if loaded.head is not None and loaded.head.config.embed_dim != embed_dim:
        raise WeightsError(f"{loaded.source} was trained for {loaded.head.config.embed_dim}-d CLIP features but the "
                           f"CLIP gives {embed_dim}-d ones; use the weights it was trained with "
                           f"({loaded.checkpoint.get('meta', {}).get('weights')})")
