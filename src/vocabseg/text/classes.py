"""Class lists: each class has a display label and one or more names (synonyms); every name is a text query and a
class scores the maximum over its names. With a background, class 0 is the background and its names are stuff words.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vocabseg.errors import UsageError

SYNONYM_SEPARATOR = "|"
BACKGROUND_LABEL = "background"


#: The name list whose background names a custom class list gets by default: SCLIP's 26 stuff words.
DEFAULT_BACKGROUND_LIST = "voc21.sclip"


def default_background_names() -> tuple[str, ...]:
    """The background names added to a custom class list by default (class 0 of :data:`DEFAULT_BACKGROUND_LIST`)."""
    from vocabseg.data.classes import name_list

    return name_list(DEFAULT_BACKGROUND_LIST)[0]


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
    items = _class_items(classes)
    seen = _unique_names(items)
    labels = [label for label, _ in items]
    names = [n for _, n in items]
    if background is True:
        background = default_background_names()
    if background:
        bg_names = tuple(n for n in _split_names(background) if n.lower() not in seen)
        _check_names(bg_names)
        if not bg_names:
            raise UsageError("Every background name is also a class name; give other background names.")
        if BACKGROUND_LABEL in (label.lower() for label in labels):
            raise UsageError("'background' is added automatically; "
                             "remove it from the classes or pass background=False.")
        labels.insert(0, BACKGROUND_LABEL)
        names.insert(0, bg_names)
    return ClassSpec(labels=tuple(labels), names=tuple(names), has_background=bool(background))


def _class_items(classes: ClassesArg) -> list[tuple[str, tuple[str, ...]]]:
    """``(label, names)`` of each class, empty entries dropped; an empty list is an error."""
    if isinstance(classes, str):
        classes = classes.split(",")
    if isinstance(classes, Mapping):
        items = [(str(label), _split_names(names)) for label, names in classes.items()]
    else:
        items = [(names[0] if names else "", names) for names in map(_split_names, classes)]
    items = [(label.strip(), names) for label, names in items if names]
    if not items:
        raise UsageError("The class list is empty: give at least one class name (e.g. --classes 'cat,dog').")
    return items


def _unique_names(items: list[tuple[str, tuple[str, ...]]]) -> dict[str, str]:
    """Each name (lower case) -> its class label; a name in two classes, or one with a line break, is an error."""
    seen: dict[str, str] = {}
    for label, names in items:
        _check_names((label, *names))
        for name in names:
            key = name.lower()
            if key in seen:
                raise UsageError(f"Duplicate class name {name!r} (in {seen[key]!r} and {label!r}); "
                                 "each name may appear once.")
            seen[key] = label
    return seen


def _check_names(names: Sequence[str]) -> None:
    for name in names:
        if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in name):
            raise UsageError(f"Class name {name!r} contains a line break or another control character; "
                             "give each name on one line.")


def read_classes_file(path: str | os.PathLike) -> list[tuple[str, ...]]:
    """One class per line, synonyms separated by ', ' (the SCLIP name-file format); '#' starts a comment."""
    classes = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            classes.append(_split_names(line, ","))
    return classes


def benchmark_spec(dataset: str | None, names: str | None = None) -> ClassSpec:
    """The classes of benchmark ``dataset`` with the query names of name list ``names`` (a list id such as
    ``voc21.sclip``; default: each class's canonical name)."""
    from vocabseg.data.classes import BACKGROUND, CLASSES, name_list

    if dataset is None:
        raise UsageError("this preset has no class list; pass classes")
    if dataset not in CLASSES:
        raise UsageError(f"unknown dataset {dataset!r}; known: {', '.join(CLASSES)}")
    labels = CLASSES[dataset]
    queries = name_list(names) if names else tuple((label,) for label in labels)
    return ClassSpec(labels=labels, names=queries, has_background=labels[0] == BACKGROUND)
