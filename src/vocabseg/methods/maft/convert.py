"""``vocabseg convert maft-checkpoint``: a released MAFT checkpoint -> a CLIP state dict this library loads.

The released file (spec A.2) is a detectron2 checkpoint: a dict whose ``model`` entry holds ``IPCLIP.*`` (the
fine-tuned image tower, OpenAI key names), ``clip_adapter.clip_model.*`` (frozen CLIP with its text tower) and
keys of the proposal generator. The output is an OpenAI-layout CLIP state dict (``visual.*`` from ``IPCLIP.*``,
the text tower from ``clip_adapter.clip_model.*`` or from ``--clip``) in safetensors, usable as ``--weights``.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch

from vocabseg.errors import UsageError
from vocabseg.io.outputs import atomic_write

log = logging.getLogger(__name__)

IPCLIP_PREFIX = "IPCLIP."
CLIP_PREFIX = "clip_adapter.clip_model."


def read_maft_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat ``model`` state dict of a released MAFT checkpoint, loaded without executing code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as exc:
        raise UsageError(f"{path} holds objects other than tensors and plain containers, refused for safety "
                         f"({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UsageError(f"{path} is not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def convert_maft(state: dict[str, torch.Tensor], clip_state: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """``IPCLIP.*`` -> ``visual.*``; the text tower and ``logit_scale`` from ``clip_adapter.clip_model.*`` (or
    from ``clip_state`` when the checkpoint has none)."""
    visual = {"visual." + k[len(IPCLIP_PREFIX):]: v for k, v in state.items() if k.startswith(IPCLIP_PREFIX)}
    if not visual:
        raise UsageError("no IPCLIP.* keys: this is not a MAFT checkpoint")
    base = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)} or clip_state or {}
    text = {k: v for k, v in base.items() if not k.startswith("visual.")}
    if "text_projection" not in text:
        raise UsageError("the checkpoint has no CLIP text tower (clip_adapter.clip_model.*); pass the base CLIP "
                         "weights with --clip, e.g. OpenAI's ViT-B-16.pt")
    expected = {k for k in base if k.startswith("visual.")}
    if expected and expected != set(visual):
        missing, extra = sorted(expected - set(visual)), sorted(set(visual) - expected)
        raise UsageError(f"IPCLIP.* does not match the CLIP image tower: missing {missing[:5]}, extra {extra[:5]}")
    return {**text, **visual}


def convert_file(source: str | os.PathLike, out: str | os.PathLike, clip: str | os.PathLike | None = None) -> Path:
    """Convert ``source`` and write ``out`` (safetensors, atomically); the result loads with
    :func:`vocabseg.models.openclip.load_clip` (``--weights OUT``)."""
    from safetensors.torch import save_file

    from vocabseg.models.checkpoints import read_state_dict
    from vocabseg.models.openclip import build_from_state_dict

    clip_state = read_state_dict(clip) if clip else None
    state = convert_maft(read_maft_checkpoint(source), clip_state)
    build_from_state_dict(state)  # fails early, with a clear message, if the result is not a loadable CLIP
    out = Path(out)
    with atomic_write(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    log.info("wrote %s (%d tensors)", out, len(state))
    return out
