"""One place that turns a model request into a loaded model: the kind of model, its weights (a tag, a hub id or a
local file) and the device; each distinct request is loaded once per process and shared by every segmenter, the demo
and eval.

Kinds: ``clip`` (:func:`vocabseg.models.openclip.load_clip`), ``dino`` (:func:`vocabseg.models.dino.load_dino`),
``sam`` (:func:`vocabseg.models.sam.load_sam`), ``sam2`` (:func:`vocabseg.models.sam.load_sam2`), ``ofa``
(:func:`vocabseg.models.ofa.weights.load_ofa`) and ``ifseg_head`` (:func:`vocabseg.models.ifseg_head.load_ifseg_head`).
Every loader reads weights safely and, with no network and no cache, fails at once with a message that says how to
supply them (:class:`~vocabseg.models.checkpoints.WeightsError`).
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

import torch

from vocabseg.errors import UsageError
from vocabseg.models.checkpoints import WeightsError

#: Model kind -> ``module:function`` of its loader, called as ``loader(weights, arch=..., device=...)``.
LOADERS = {
    "clip": "vocabseg.models.openclip:load_clip",
    "dino": "vocabseg.models.dino:load_dino",
    "sam": "vocabseg.models.sam:load_sam",
    "sam2": "vocabseg.models.sam:load_sam2",
    "ofa": "vocabseg.models.ofa.weights:load_ofa",
    "ifseg_head": "vocabseg.models.ifseg_head:load_ifseg_head",
}

_loaded: dict[tuple, Any] = {}
_lock = threading.Lock()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``None`` picks CUDA when available; an impossible choice is a clear
    :class:`~vocabseg.errors.UsageError`."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for, but no CUDA GPU is usable here; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    elif resolved.type != "cpu":
        available = getattr(torch.backends, resolved.type, None)
        if available is None or not getattr(available, "is_available", lambda: False)():
            raise UsageError(f"device {device!r} is not usable with this PyTorch build; use cpu or cuda")
    return resolved


def load_model(kind: str, weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
               arch: str | None = None) -> Any:
    """The model of ``kind`` with ``weights`` (``None``: the kind's default) on ``device``, loaded once per
    process: later requests for the same kind, weights, architecture and device get the same object."""
    if kind not in LOADERS:
        raise UsageError(f"unknown model kind {kind!r}; known: {', '.join(LOADERS)}")
    device = resolve_device(device)
    key = (kind, None if weights is None else os.fspath(weights), arch, str(device))
    with _lock:
        if key not in _loaded:
            module, name = LOADERS[kind].split(":")
            loader = getattr(importlib.import_module(module), name)
            options = {"arch": arch} if arch is not None else {}
            _loaded[key] = loader(weights, device=device, **options)
        return _loaded[key]


def forget_models() -> None:
    """Drop every loaded model (they are freed once nothing else holds them)."""
    with _lock:
        _loaded.clear()


__all__ = ["LOADERS", "WeightsError", "forget_models", "load_model", "resolve_device"]
