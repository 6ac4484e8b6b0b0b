"""The training recipe of ``train maft`` (spec A.5) as one dataclass; standard library only, so that the command line
derives its flags from it without loading torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

#: The self-distillation weight λ_dis and the weight decay: the released code's and the paper's (``--paper``).
CODE_DIS_WEIGHT = 0.1
PAPER_DIS_WEIGHT = 1.0
CODE_WEIGHT_DECAY = 1e-4
PAPER_WEIGHT_DECAY = 1e-5


def _setting(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """The recipe of the released code (spec A.5); :meth:`paper` switches to the paper's values. Each field is also
    a ``train maft`` flag (``--batch-size`` for ``batch_size``)."""

    iterations: int = _setting(1000, "optimisation steps (default 1000)")
    batch_size: int = _setting(16, "images per iteration, over all processes (default 16)")
    micro_batch: int = _setting(2, "images per forward pass; batch_size / (micro_batch x processes) accumulation "
                                   "steps (default 2)")
    lr: float = _setting(1e-5, "peak learning rate of the poly schedule (default 1e-5)")
    weight_decay: float = _setting(CODE_WEIGHT_DECAY, "AdamW weight decay, 0 on LayerNorm parameters (default 1e-4)")
    dis_weight: float = _setting(CODE_DIS_WEIGHT, "weight of the self-distillation loss (default 0.1)")
    dis_loss: Literal["smoothl1", "mse", "kl"] = _setting("smoothl1", "self-distillation distance")
    grad_clip: float = _setting(0.01, "clip the gradients' global L2 norm to this; 0: no clipping (default 0.01)")
    poly_power: float = _setting(0.9, "power of the poly learning-rate decay (default 0.9)")
    crop_size: int = _setting(640, "training crop side (default 640)")
    input_size: int = _setting(480, "IP-CLIP input side; the crop is squashed to it (default 480)")
    scale_range: tuple[float, float] = _setting((0.5, 1.5), "random rescale of the short side, times crop_size")
    augment: bool = _setting(True, "random rescale, crop and flip (--no-augment: images are only padded, or cut, "
                                   "to --crop-size)")
    start_layer: int | None = _setting(None, "first masked block (default: two thirds of the blocks)")
    freeze: Literal["maft", "attention", "all"] = _setting("maft", "trainable parameters (default: maft)")
    temperature: float = _setting(100.0, "softmax temperature of the class probabilities (default 100)")
    max_proposals: int = _setting(32, "proposals per image (default 32)")
    seed: int = _setting(123, "seed of the sample order, augmentation and proposals (default 123)")
    checkpoint_every: int = _setting(100, "write OUT/last.pt every this many iterations (default 100)")
    log_every: int = _setting(10, "log the losses every this many iterations (default 10)")
    amp: bool = _setting(False, "bf16 autocast on CUDA")

    def paper(self) -> TrainConfig:
        """The paper's values where they differ from the code: λ_dis = 1, weight decay 1e-5."""
        return dataclasses.replace(self, dis_weight=PAPER_DIS_WEIGHT, weight_decay=PAPER_WEIGHT_DECAY)
