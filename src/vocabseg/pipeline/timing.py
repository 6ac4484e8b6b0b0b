"""Opt-in per-stage timing of inference (ViT, PAMR, post-processing...), used by the benchmarks.

Code marks its stages with ``with stage("vit"):``; nothing is measured unless a caller opened
``with record() as times:``, so the marks cost nothing in normal use. CUDA work is synchronised at stage
boundaries while recording, so GPU time is charged to the stage that queued it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from contextvars import ContextVar

import torch

_current: ContextVar[dict[str, float] | None] = ContextVar("vocabseg_timing", default=None)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def record():
    """Collect seconds per stage name into the yielded dict (nested stages are charged to the outer one too)."""
    times: dict[str, float] = defaultdict(float)
    token = _current.set(times)
    try:
        yield times
    finally:
        _current.reset(token)


@contextlib.contextmanager
def stage(name: str):
    """Charge the wall time of the block to ``name`` when recording; a no-op otherwise."""
    times = _current.get()
    if times is None:
        yield
        return
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        times[name] += time.perf_counter() - start
