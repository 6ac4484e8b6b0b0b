"""Access to the official-code goldens in ``../shared/oracle`` (outputs of each paper's own code on tiny seeded models).

The folder sits next to the repository (``VOCABSEG_ORACLE`` overrides it). Without it the parity tests skip on a
developer machine but *fail* under CI (``CI`` set), where the folder is always present: a parity test that silently
skips in CI proves nothing.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ORACLE = Path(os.environ.get("VOCABSEG_ORACLE") or Path(__file__).resolve().parents[2] / "shared" / "oracle")


def oracle_path(*parts: str) -> Path:
    """A path inside the oracle folder; skips the test (fails it under CI) when the file is missing."""
    path = ORACLE.joinpath(*parts)
    if not path.exists():
        message = f"official-code golden {path} is missing (set VOCABSEG_ORACLE to the shared/oracle folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@functools.cache
def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def golden(*parts: str) -> dict[str, torch.Tensor]:
    """The tensors of a golden file (``__meta__`` removed; see :func:`golden_meta`). Cached per file."""
    return {k: v for k, v in _load(oracle_path(*parts)).items() if k != "__meta__"}


def golden_meta(*parts: str) -> dict:
    """The ``__meta__`` JSON of a golden file: the exact parameters of each variant."""
    return json.loads(_load(oracle_path(*parts))["__meta__"])


@functools.cache
def voc_rgb() -> np.ndarray:
    """The oracle's canonical input photo ``voc.png`` (188x250 RGB uint8)."""
    from PIL import Image

    with Image.open(oracle_path("voc.png")) as image:
        return np.asarray(image.convert("RGB")).copy()


def voc_class_spec():
    """The oracle's 21 VOC classes (``names_voc.txt``: line 0 = the background names ``sky, wall, floor``; 25
    queries in reading order) as a :class:`~vocabseg.text.classes.ClassSpec`."""
    from vocabseg.text.classes import parse_classes, read_classes_file

    lines = read_classes_file(oracle_path("names_voc.txt"))
    return parse_classes(lines[1:], background=lines[0])


def tiny_clip_weights() -> Path:
    """The tiny seeded OpenAI-format CLIP every CLIP golden was computed with."""
    return oracle_path("tiny_clip_vitb16w128.pt")


def tiny_clip():
    """The tiny seeded CLIP (:class:`~vocabseg.models.encoder.CLIP`) on the CPU, through the model factory (loaded
    once per process)."""
    from vocabseg.models.factory import load_model

    return load_model("clip", str(tiny_clip_weights()), "cpu")


def assert_close_logits(ours: torch.Tensor | np.ndarray, theirs: torch.Tensor, atol: float = 1e-4,
                        what: str = "logits") -> float:
    """Max |diff| <= ``atol``; returns it (printed with ``-s`` for the closing notes)."""
    ours = torch.as_tensor(np.asarray(ours)).float()
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != official {tuple(theirs.shape)}"
    diff = float((ours - theirs.float()).abs().max())
    print(f"{what}: max |diff| {diff:.2e}")
    assert diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol}"
    return diff


def assert_labels_agree(ours: torch.Tensor | np.ndarray, theirs: torch.Tensor, minimum: float = 0.995,
                        what: str = "labels") -> float:
    """At least ``minimum`` of the pixels carry the official label; returns the agreement."""
    ours = torch.as_tensor(np.asarray(ours).astype(np.int64))
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != official {tuple(theirs.shape)}"
    agreement = float((ours == theirs.long()).float().mean())
    print(f"{what}: {agreement:.2%} equal")
    assert agreement >= minimum, f"{what}: only {agreement:.2%} of the pixels equal the official labels"
    return agreement


def oracle_class_spec(*parts: str, separator: str = "; "):
    """The :class:`ClassSpec` of an oracle name file (one class per line, synonyms split on ``separator``; line 0
    is the background's names)."""
    from vocabseg.text.classes import BACKGROUND_LABEL, ClassSpec

    lines = [line for line in oracle_path(*parts).read_text(encoding="utf-8").splitlines() if line.strip()]
    names = tuple(tuple(line.split(separator)) for line in lines)
    labels = (BACKGROUND_LABEL, *(n[0] for n in names[1:]))
    return ClassSpec(labels=labels, names=names, has_background=True)
