"""Class lists with synonyms and background names, prompt templates, and the cached text classifier.

A *class* has one or more *names* (synonyms). Every name is a text query; the prediction for a class is the
maximum over its names. With a background, class 0 is the background and its names are a list of stuff words.
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

from vocabseg.io.outputs import atomic_write

log = logging.getLogger(__name__)

#: The 80 OpenAI ImageNet prompt templates (the list SCLIP, NACLIP, ClearCLIP and ITACLIP use).
IMAGENET_TEMPLATES: tuple[str, ...] = ()

SYNONYM_SEPARATOR = "|"
BACKGROUND_LABEL = "background"


def _imagenet_templates() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


IMAGENET_TEMPLATES = _imagenet_templates()
#: MaskCLIP's 85: the 80 ImageNet templates plus five scene templates (its ``prompt_engineering.py``).
MASKCLIP_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + tuple(
    f"{lead} {{}} in the scene." for lead in ("there is a", "there is the", "this is a", "this is the", "this is one"))


def default_background_names() -> tuple[str, ...]:
    """The 26 stuff names SCLIP and NACLIP use as VOC21's background class."""
    from vocabseg.data.classes import query_names

    return query_names("voc21", "sclip")[0]


@dataclass(frozen=True)
class ClassSpec:
    """Classes to segment: a display label and the query names of each class, background first if any."""

    labels: tuple[str, ...]
    names: tuple[tuple[str, ...], ...]
    has_background: bool

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def queries(self) -> tuple[str, ...]:
        return tuple(name for names in self.names for name in names)

    @property
    def query_class(self) -> tuple[int, ...]:
        return tuple(index for index, names in enumerate(self.names) for _ in names)


ClassesArg = str | Sequence[str | Sequence[str]] | Mapping[str, str | Sequence[str]]
BackgroundArg = bool | str | Sequence[str] | None


def _split_names(item: str | Sequence[str], separator: str = SYNONYM_SEPARATOR) -> tuple[str, ...]:
    parts = item.split(separator) if isinstance(item, str) else list(item)
    return tuple(dict.fromkeys(p.strip() for p in parts if p and p.strip()))


def parse_classes(classes: ClassesArg, background: BackgroundArg = True) -> ClassSpec:
    """Build a :class:`ClassSpec`.

    ``classes``: ``"cat,dog|puppy"`` (comma between classes, ``|`` between synonyms), a list of strings (each may
    hold ``|`` synonyms) or of name lists, or a mapping ``label -> names``.
    ``background``: ``True`` for the default stuff-name background, a name or list of names, or ``False``/``None``.
    """
    if isinstance(classes, str):
        classes = [c for c in classes.split(",")]
    if isinstance(classes, Mapping):
        items = [(str(label), _split_names(names)) for label, names in classes.items()]
    else:
        items = []
        for item in classes:
            names = _split_names(item)
            items.append((names[0] if names else "", names))
    items = [(label.strip(), names) for label, names in items if names]
    if not items:
        raise ValueError("The class list is empty: give at least one class name (e.g. --classes 'cat,dog').")
    seen: dict[str, str] = {}
    for label, names in items:
        for name in names:
            key = name.lower()
            if key in seen:
                raise ValueError(f"Duplicate class name {name!r} (in {seen[key]!r} and {label!r}); "
                                 "each name may appear once.")
            seen[key] = label
    labels = [label for label, _ in items]
    names = [n for _, n in items]
    if background is True:
        background = default_background_names()
    if background:
        bg_names = tuple(n for n in _split_names(background) if n.lower() not in seen)
        if not bg_names:
            raise ValueError("Every background name is also a class name; give other background names.")
        if BACKGROUND_LABEL in (label.lower() for label in labels):
            raise ValueError("'background' is added automatically; "
                             "remove it from the classes or pass background=False.")
        labels.insert(0, BACKGROUND_LABEL)
        names.insert(0, bg_names)
    return ClassSpec(labels=tuple(labels), names=tuple(names), has_background=bool(background))


def read_classes_file(path: str | os.PathLike) -> list[tuple[str, ...]]:
    """One class per line, synonyms separated by ', ' (the SCLIP name-file format); '#' starts a comment."""
    classes = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            classes.append(_split_names(line, ","))
    return classes


# --- embeddings -------------------------------------------------------------------------------------------------

def _default_cache_dir() -> Path:
    root = os.environ.get("VOCABSEG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vocabseg")
    return Path(root) / "text"


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
    backbone,
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
    known = cache.load(backbone.text_fingerprint(), templates) if cache else {}
    missing = [n for n in dict.fromkeys(names) if n not in known]
    if missing:
        prompts = [t.format(n) for n in missing for t in templates]
        lengths = [len(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lengths.__getitem__)
        features = torch.empty(len(prompts), backbone.embed_dim, device=backbone.device)
        from tqdm import tqdm

        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=f"text embeddings ({len(missing)} names)", unit="batch",
                          disable=None if len(starts) > 1 else True, leave=False):
            index = order[start:start + batch_size]
            features[index] = F.normalize(backbone.encode_text([prompts[i] for i in index]).float(), dim=-1)
        per_name = F.normalize(features.reshape(len(missing), len(templates), -1).mean(dim=1), dim=-1)
        computed = dict(zip(missing, per_name.cpu(), strict=True))
        if cache:
            cache.store(backbone.text_fingerprint(), templates, computed)
        known = {**known, **computed}
    return torch.stack([known[n] for n in names]).to(backbone.device)


@dataclass
class TextClassifier:
    """Query embeddings ``(Q, E)`` and, for each query, the index of its class."""

    spec: ClassSpec
    embeddings: torch.Tensor
    query_class: torch.Tensor

    @classmethod
    def build(cls, backbone, spec: ClassSpec, templates: Sequence[str] = IMAGENET_TEMPLATES,
              cache: TextCache | None = None) -> TextClassifier:
        embeddings = embed_names(backbone, spec.queries, templates, cache)
        query_class = torch.tensor(spec.query_class, dtype=torch.long, device=embeddings.device)
        return cls(spec=spec, embeddings=embeddings, query_class=query_class)
