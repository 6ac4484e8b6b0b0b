"""Every method by name: the built-in ones (imported on first use, so that nothing heavy loads before it is needed),
compositions of a base method with plug-ins (``naclip+resclip``), and construction with typed options.

Method packages may also contribute command-line commands (:data:`vocabseg.methods.commands.COMMAND_MODULES`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from vocabseg.config import coerce_fields
from vocabseg.errors import UsageError
from vocabseg.methods.base import Method

#: Modules that register the built-in methods, in listing order.
BUILTIN_MODULES = (
    "vocabseg.methods.last_block.method",
    "vocabseg.methods.itaclip.method",
    "vocabseg.methods.cliptrase.method",
    "vocabseg.methods.scclip.method",
    "vocabseg.methods.scclip.sfp",
    "vocabseg.methods.pearl.method",
    "vocabseg.methods.resclip.method",
    "vocabseg.methods.floss.method",
    "vocabseg.methods.maft.method",
    "vocabseg.methods.ifseg.method",
    "vocabseg.methods.ifseg.clip_method",
    "vocabseg.methods.proxyclip.method",
    "vocabseg.methods.cass.method",
    "vocabseg.methods.corrclip.method",
    "vocabseg.methods.trident.method",
)


METHODS: dict[str, type[Method]] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def available() -> dict[str, type[Method]]:
    """Every registered method by name (importing the built-in ones on first call)."""
    global _loaded
    if not _loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True
    return METHODS


def method_class(name: str) -> type[Method]:
    """The class of method ``name``; a composition ``base+plugin[+plugin]`` is built on first use."""
    methods = available()
    if name not in methods and "+" in name:
        from vocabseg.methods.composition import compose_named

        compose_named(name)
    if name not in methods:
        raise UsageError(f"unknown method {name!r}; available: {', '.join(sorted(methods))} "
                         "(see `vocabseg methods`)")
    return methods[name]


def option_names(cls: type[Method]) -> tuple[str, ...]:
    """The method's options (its init fields)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def create(name: str, **options: Any) -> Method:
    """Method ``name`` with ``options``, each converted to its field's type (``"false"`` -> ``False``); an unknown
    option or a value of the wrong type is a :class:`~vocabseg.errors.UsageError` naming it."""
    cls = method_class(name)
    return cls(**coerce_fields(cls, options, f"option of {name!r}"))
