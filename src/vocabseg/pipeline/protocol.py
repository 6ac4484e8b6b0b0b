"""The inference settings of the common pipeline (spec section 1.3): one frozen dataclass whose fields, with their
types and help texts, are also the command line's protocol flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from vocabseg.config import coerce_fields
from vocabseg.errors import UsageError

#: Autocast precisions (``fp32`` disables autocast).
PRECISION_NAMES = ("fp32", "bf16", "fp16")


def _knob(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class Protocol:
    """Every inference knob: resize, windows, softmax temperature, thresholds, PAMR, batching and precision."""

    short_side: int | None = _knob(336, "resize the short side to this (none: keep the image size)")
    max_long_side: int = _knob(2048, "cap the long side at this when resizing")
    crop: int | None = _knob(224, "sliding-window size (none: whole-image inference)")
    stride: int = _knob(112, "sliding-window stride")
    logit_scale: float = _knob(40.0, "softmax temperature applied to the cosine logits")
    prob_thd: float = _knob(0.0, "below this probability a pixel becomes background (or 255 without one)")
    area_thd: float | None = _knob(None, "drop classes covering at most this share of the foreground")
    pamr: bool = _knob(False, "PAMR refinement of the logits")
    pamr_steps: int = _knob(10, "PAMR iterations")
    pamr_dilations: tuple[int, ...] = _knob((8, 16), "PAMR dilations, e.g. 8,16")
    window_batch: int = _knob(0, "sliding windows per forward pass (0: automatic)")
    precision: Literal["fp32", "bf16", "fp16"] = _knob("fp32", "autocast the models to bf16/fp16 (GPU)")

    def replace(self, **changes: Any) -> Protocol:
        """A copy with ``changes`` (converted to each field's type; unknown names are an error)."""
        return dataclasses.replace(self, **coerce_fields(Protocol, changes, "protocol setting")).validate()

    def validate(self) -> Protocol:
        if (self.crop or 0) < 0 or (self.crop and self.crop < 16):
            raise UsageError(f"crop must be at least 16 pixels, or none for the whole image (got {self.crop})")
        if self.stride <= 0:
            raise UsageError(f"stride must be positive (got {self.stride})")
        if self.window_batch < 0:
            raise UsageError(f"window_batch must be >= 0 (0: automatic; got {self.window_batch})")
        if (self.short_side or 0) < 0:
            raise UsageError(f"short_side must be >= 0 (0: keep the image size; got {self.short_side})")
        if self.max_long_side <= 0:
            raise UsageError(f"max_long_side must be positive (got {self.max_long_side})")
        if not 0 <= self.prob_thd <= 1:
            raise UsageError(f"prob_thd must lie in [0, 1] (got {self.prob_thd})")
        if self.area_thd is not None and not 0 <= self.area_thd < 1:
            raise UsageError(f"area_thd must lie in [0, 1) (got {self.area_thd})")
        if self.logit_scale <= 0:
            raise UsageError(f"logit_scale must be positive (got {self.logit_scale})")
        if self.pamr_steps < 0 or any(d <= 0 for d in self.pamr_dilations):
            raise UsageError("pamr_steps must be >= 0 and pamr_dilations positive")
        return self
