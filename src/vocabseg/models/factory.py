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
    """The device to run on: ``None`` picks CUDA when available; a device this machine and PyTorch build lack (mps,
    xpu, ... without one, a GPU index past the last) is a clear :class:`~vocabseg.errors.UsageError`, raised before
    any model loads."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = _accelerator()
    choices = "cpu" + (f", {accelerator} or {accelerator}:N" if accelerator else "")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use {choices}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != accelerator:
        missing = "no CUDA GPU is usable here" if resolved.type == "cuda" else \
            f"this machine and PyTorch build have no {resolved.type!r} device"
        raise UsageError(f"device {device!r} asked for, but {missing}; use {choices}")
    count = _device_count()
    if resolved.index is not None and resolved.index >= count:
        raise UsageError(f"device {device!r} asked for, but only {count} {accelerator} device(s) are visible")
    return resolved


def _accelerator() -> str | None:
    """The type of the accelerator PyTorch can use here (cuda, mps, xpu, ...), or None."""
    api = getattr(torch, "accelerator", None)  # PyTorch >= 2.6
    if api is not None:
        return api.current_accelerator().type if api.is_available() else None
    return "cuda" if torch.cuda.is_available() else None


def _device_count() -> int:
    api = getattr(torch, "accelerator", None)
    return api.device_count() if api is not None else torch.cuda.device_count()


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
