"""OFA's image stem: a torchvision-style ResNet (bottlenecks, stride on the 3x3 convolution) truncated after layer3.

Output ``B,1024,H/16,W/16``. BatchNorm is frozen (IFSeg's ``FrozenBatchNorm2d``: fixed statistics and affine
parameters held as buffers, ``num_batches_tracked`` of BatchNorm checkpoints ignored). Residual branches carry drop
path with rates rising linearly from 0 to ``drop_path`` within each layer, as OFA's ``_make_layer``.
"""

from __future__ import annotations

import torch
from torch import nn


def linear_rates(rate: float, count: int) -> list[float]:
    """Drop-path rates rising linearly from 0 to ``rate`` over ``count`` blocks (``torch.linspace``, as OFA)."""
    return torch.linspace(0, rate, count, device="cpu").tolist()


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples (dim 0) with probability ``rate``, rescale the others."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).add_(keep).floor_()
    return x / keep * mask


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with frozen statistics: ``(x - mean) / sqrt(var + eps) * weight + bias`` as one scale and shift."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path_rate: float = 0.0):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + drop_path(out, self.drop_path_rate, self.training))


class ResNet(nn.Module):
    """conv1 (7x7/2), maxpool (3x3/2), layer1 (64), layer2 (128, /2), layer3 (256, /2); ``blocks`` per layer."""

    def __init__(self, blocks: tuple[int, int, int], drop_path_rate: float = 0.0):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, blocks[0], 1, drop_path_rate)
        self.layer2 = self._make_layer(128, blocks[1], 2, drop_path_rate)
        self.layer3 = self._make_layer(256, blocks[2], 2, drop_path_rate)

    def _make_layer(self, planes: int, blocks: int, stride: int, drop_path_rate: float) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                       FrozenBatchNorm2d(out))
        rates = linear_rates(drop_path_rate, blocks)
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, rates[0])]
        self.inplanes = out
        layers += [Bottleneck(out, planes, drop_path_rate=rate) for rate in rates[1:]]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``B,3,H,W`` -> features ``B,1024,ceil(H/16),ceil(W/16)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))
