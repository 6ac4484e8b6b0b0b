"""The text classifier: every query name embedded with the prompt templates, cached on disk per name.

Layouts: embeddings ``Q,E`` (one row per query name, L2-normalised), ``query_class`` ``Q`` (the class of each).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vocabseg.io.cache import cache_dir
from vocabseg.io.outputs import atomic_write
from vocabseg.models.encoder import TextEncoder
from vocabseg.text.classes import ClassSpec
from vocabseg.text.templates import IMAGENET_TEMPLATES

log = logging.getLogger(__name__)


def _default_cache_dir() -> Path:
    return cache_dir("text")


class TextCache:
    """Per-name text embeddings on disk, keyed by text-tower content, template set and name.

    One file per (model, templates) holds a ``name -> embedding`` dict, read with ``weights_only=True`` and
    rewritten atomically, so adding a class computes only the new names.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory else _default_cache_dir()

    def _file(self, model_key: str, templates: Sequence[str]) -> Path:
        digest = hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16]
        return self.directory / f"{model_key}-{digest}.pt"

    def load(self, model_key: str, templates: Sequence[str]) -> dict[str, torch.Tensor]:
        file = self._file(model_key, templates)
        if not file.exists():
            return {}
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged cache is rebuilt, never fatal
            log.warning("ignoring unreadable text cache %s: %s", file, exc)
            return {}

    def store(self, model_key: str, templates: Sequence[str], new: Mapping[str, torch.Tensor]) -> None:
        file = self._file(model_key, templates)
        merged = {**self.load(model_key, templates), **{k: v.detach().cpu().float() for k, v in new.items()}}
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(file) as tmp:
            torch.save(merged, tmp)


@torch.inference_mode()
def embed_names(
    encoder: TextEncoder,
    names: Iterable[str],
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    cache: TextCache | None = None,
    batch_size: int = 640,
) -> torch.Tensor:
    """Per-name embedding: normalised mean of the normalised template embeddings, ``(len(names), E)``.

    Names found in ``cache`` cost nothing; the rest run through the text tower in batches of prompts sorted by
    length (each batch runs only as far as its longest prompt).
    """
    names = list(names)
    known = cache.load(encoder.fingerprint(), templates) if cache else {}
    missing = [n for n in dict.fromkeys(names) if n not in known]
    if missing:
        prompts = [t.format(n) for n in missing for t in templates]
        lengths = [len(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lengths.__getitem__)
        features = torch.empty(len(prompts), encoder.embed_dim, device=encoder.device)
        from tqdm import tqdm

        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=f"text embeddings ({len(missing)} names)", unit="batch",
                          disable=None if len(starts) > 1 else True, leave=False):
            index = order[start:start + batch_size]
            features[index] = F.normalize(encoder.encode([prompts[i] for i in index]).float(), dim=-1)
        per_name = F.normalize(features.reshape(len(missing), len(templates), -1).mean(dim=1), dim=-1)
        computed = dict(zip(missing, per_name.cpu(), strict=True))
        if cache:
            cache.store(encoder.fingerprint(), templates, computed)
        known = {**known, **computed}
    return torch.stack([known[n] for n in names]).to(encoder.device)


@dataclass
class TextClassifier:
    """Query embeddings ``(Q, E)`` and, for each query, the index of its class."""

    spec: ClassSpec
    embeddings: torch.Tensor
    query_class: torch.Tensor

    @classmethod
    def build(cls, encoder: TextEncoder, spec: ClassSpec, templates: Sequence[str] = IMAGENET_TEMPLATES,
              cache: TextCache | None = None) -> TextClassifier:
        embeddings = embed_names(encoder, spec.queries, templates, cache)
        query_class = torch.tensor(spec.query_class, dtype=torch.long, device=embeddings.device)
        return cls(spec=spec, embeddings=embeddings, query_class=query_class)
