"""The inference settings of the common pipeline (spec section 1.3): one frozen dataclass whose fields, with their
types and help texts, are also the command line's protocol flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from vocabseg.config import check_ranges, coerce_fields, setting
from vocabseg.errors import UsageError

#: The smallest sliding window: the smallest patch of the CLIP models that methods slide over an image (the main
#: model's own patch is checked once it is loaded).
MIN_CROP = 16

#: Autocast precisions (``fp32`` disables autocast).
PRECISION_NAMES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Protocol:
    """Every inference knob: resize, windows, softmax temperature, thresholds, PAMR, batching and precision."""

    short_side: int | None = setting(336, "resize the short side to this (none or 0: keep the image size)",
                                     at_least=0)
    max_long_side: int = setting(2048, "cap the long side at this when resizing", above=0)
    crop: int | None = setting(224, "sliding-window size, at least one patch (none: whole-image inference)",
                               at_least=0)
    stride: int = setting(112, "sliding-window stride, at most the crop", above=0)
    logit_scale: float = setting(40.0, "softmax temperature applied to the cosine logits", above=0)
    prob_thd: float = setting(0.0, "below this probability a pixel becomes background (or 255 without one)",
                              at_least=0, at_most=1)
    area_thd: float | None = setting(None, "drop classes covering at most this share of the foreground",
                                     at_least=0, below=1)
    pamr: bool = setting(False, "PAMR refinement of the logits")
    pamr_steps: int = setting(10, "PAMR iterations", at_least=0)
    pamr_dilations: tuple[int, ...] = setting((8, 16), "PAMR dilations, e.g. 8,16", above=0)
    window_batch: int = setting(0, "sliding windows per forward pass (0: automatic)", at_least=0)
    precision: Literal["fp32", "bf16", "fp16"] = setting("fp32", "autocast the models to bf16/fp16 (GPU)")

    def replace(self, **changes: Any) -> Protocol:
        """A copy with ``changes`` (converted to each field's type; unknown names are an error)."""
        return dataclasses.replace(self, **coerce_fields(Protocol, changes, "protocol setting"))

    def __post_init__(self):
        self.validate()

    def validate(self) -> Protocol:
        """Check every setting's range, and that sliding windows cover the image: the crop at least
        :data:`MIN_CROP` pixels and the stride at most the crop (the models' patch size is checked once they are
        loaded: :meth:`vocabseg.methods.base.Method.check_protocol`)."""
        check_ranges(self)
        if self.crop and self.crop < MIN_CROP:
            raise UsageError(f"crop {self.crop} is smaller than a CLIP patch: give at least {MIN_CROP} pixels, or "
                             "none for whole-image inference")
        if self.crop and self.stride > self.crop:
            raise UsageError(f"stride {self.stride} is larger than crop {self.crop}: the windows would leave pixels "
                             f"uncovered; give a stride of at most {self.crop}")
        return self
