"""Artificial image-segmentation pairs (IFSeg section 2.3, spec B.5): random category grids made of words.

A sample is a ``U x V`` grid (``U, V`` uniform in ``1..S``) of categories drawn i.i.d. with replacement; each cell
then draws one of its category's words (a category's own names, plus its fine-grained words under a hierarchy).
Both maps are nearest-upsampled to the model's token grid; the class map is the ground truth, the word map says
which word embedding fills each token.

Hierarchy files (``--hierarchy F``): one line per coarse class, ``class: word, word, ...``; the class must be a
label of the class list, its words are added to that class's own names; ``#`` starts a comment, blank lines are
skipped, classes not listed keep only their own names. ``--hierarchy coco-stuff`` is the built-in COCO-Stuff
hierarchy (27 coarse classes, the 171 fine names as words); ``--hierarchy ifseg-coco27`` the words of the paper's
Table 15.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError

#: The paper's S = 32: the original code draws U, V with randint(1, 33).
DEFAULT_MAX_CELLS = 32
BUILTIN_HIERARCHIES = ("coco-stuff", "ifseg-coco27")


def coco_stuff_hierarchy() -> dict[str, tuple[str, ...]]:
    """The 27 COCO-Stuff coarse classes and, for each, its fine class names (``FINE_TO_COARSE``)."""
    from vocabseg.data.classes import CLASSES, COARSE_27, FINE_TO_COARSE

    return {coarse: tuple(fine for fine, c in zip(CLASSES["coco-stuff"], FINE_TO_COARSE, strict=True) if c == i)
            for i, coarse in enumerate(COARSE_27)}


def read_hierarchy(source: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """A hierarchy from a file (``class: word, word``) or a built-in name: ``coco-stuff`` (the 171 benchmark names
    under their coarse class) or ``ifseg-coco27`` (the words of IFSeg's Table 15)."""
    if str(source) == "coco-stuff":
        return coco_stuff_hierarchy()
    if str(source) == "ifseg-coco27":
        from vocabseg.data.classes import IFSEG_COARSE_WORDS

        return dict(IFSEG_COARSE_WORDS)
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"hierarchy {str(source)!r} is neither a file nor one of: {', '.join(BUILTIN_HIERARCHIES)}")
    hierarchy: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if ":" not in line:
            raise UsageError(f"{path}:{number}: expected 'class: word, word, ...', got {line!r}")
        label, words = line.split(":", 1)
        label = label.strip()
        if label in hierarchy:
            raise UsageError(f"{path}:{number}: class {label!r} is listed twice")
        hierarchy[label] = tuple(w.strip() for w in words.split(",") if w.strip())
    return hierarchy


@dataclass(frozen=True)
class WordSet:
    """The words that may stand for each class: ``words[i]`` belongs to class ``word_class[i]``."""

    words: tuple[str, ...]
    word_class: tuple[int, ...]
    num_classes: int

    @classmethod
    def build(cls, names: Sequence[Sequence[str]], labels: Sequence[str] | None = None,
              hierarchy: Mapping[str, Sequence[str]] | None = None) -> WordSet:
        """Each class's own ``names`` plus its hierarchy words (keyed by ``labels``, default the first names)."""
        labels = list(labels) if labels is not None else [n[0] for n in names]
        hierarchy = dict(hierarchy or {})
        unknown = set(hierarchy) - set(labels)
        if unknown:
            raise UsageError(f"hierarchy classes not in the class list: {', '.join(sorted(unknown))}; "
                             f"the classes are: {', '.join(labels)}")
        words, word_class = [], []
        for index, (label, own) in enumerate(zip(labels, names, strict=True)):
            for word in dict.fromkeys([*own, *hierarchy.get(label, ())]):
                words.append(word)
                word_class.append(index)
        return cls(tuple(words), tuple(word_class), len(labels))

    def class_words(self) -> list[torch.Tensor]:
        """Per class, the indices of its words."""
        table = torch.tensor(self.word_class)
        return [torch.nonzero(table == c).flatten() for c in range(self.num_classes)]


def sample_cells(words: WordSet, generator: torch.Generator, max_cells: int = DEFAULT_MAX_CELLS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``U x V`` grid, ``U, V ~ U{1..max_cells}``: (class ids, word ids), a class per cell uniformly and then
    one of that class's words uniformly, all drawn from ``generator``."""
    if max_cells < 1:
        raise UsageError(f"max_cells must be >= 1 (got {max_cells})")
    per_class = words.class_words()
    counts = torch.tensor([len(w) for w in per_class])
    if (counts == 0).any():
        raise UsageError("every class needs at least one word")
    offsets = torch.cumsum(counts, 0) - counts
    grouped = torch.cat(per_class)  # word ids grouped by class
    u, v = torch.randint(1, max_cells + 1, (2,), generator=generator).tolist()
    cells = torch.randint(0, words.num_classes, (u, v), generator=generator)
    pick = (torch.rand((u, v), generator=generator) * counts[cells]).long()
    return cells, grouped[offsets[cells] + pick]


def upsample_nearest(cells: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer ``U x V`` map to ``grid`` (cell ``floor(i * U / gh)``)."""
    return F.interpolate(cells[None, None].double(), size=tuple(grid), mode="nearest")[0, 0].long()


def sample_maps(words: WordSet, batch: int, grid: tuple[int, int], generator: torch.Generator,
                max_cells: int = DEFAULT_MAX_CELLS) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` artificial pairs on the token ``grid``: (class ids ``B,gh,gw``, word ids ``B,gh,gw``).

    Each is :func:`sample_cells` upsampled with :func:`upsample_nearest`; the class map is the ground truth.
    """
    classes, chosen = [], []
    for _ in range(batch):
        cells, cell_words = sample_cells(words, generator, max_cells)
        classes.append(upsample_nearest(cells, grid))
        chosen.append(upsample_nearest(cell_words, grid))
    return torch.stack(classes), torch.stack(chosen)
