"""Plug-in methods and their composition with a base method: ``base+plugin`` (``clearclip+resclip``, ``sclip+floss``,
``naclip+resclip+floss``).

A plug-in (ResCLIP, FLOSS) changes another method instead of standing alone. :func:`compose` builds the method class
of a pair, a plain :class:`Method` for the rest of the library:

* its name spells the chain (``naclip+resclip``), which :meth:`Segmenter.describe` and eval results report;
* its options are the plug-in's and the base's together, typed as each declares them (so ``--option`` converts them
  as it does any method's); the two may not share a name. ``Segmenter("naclip+resclip", gaussian_std=3,
  temp_thd=0.3)`` sets both;
* the base recipe comes from the registry (:func:`vocabseg.methods.registry.create`, with the base's options) and
  runs on the composition's own models: the plug-in's hooks call the base's hooks with the same ``models``;
* its default protocol and presets are the plug-in's: a composition runs the plug-in's harness (its official
  configs), and a preset also takes the options that the base's preset of the same benchmark sets (so
  ``naclip+resclip+floss --preset voc20`` uses FLOSS's voc20 protocol with ResCLIP's voc20 weights).

A plug-in named alone runs on the base of its paper (``resclip`` is ``naclip+resclip``). Compositions named with
``+`` are built and registered on first use (:func:`compose_named`, called by the registry).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

from vocabseg.config import coerce_fields, field_types
from vocabseg.errors import UsageError
from vocabseg.methods import registry
from vocabseg.methods.base import Method, Preset

#: Registered plug-ins by name (the method classes that need a base).
PLUGINS: dict[str, type[Plugin]] = {}


@dataclass
class Plugin(Method):
    """A method that wraps a base method; concrete only as a composition (:func:`compose`), which sets
    :attr:`base_class`. The base recipe, created through the registry from the composition's base options, is
    :attr:`base`; the base's text classifier, normalisation and model checks are the composition's."""

    base_class: ClassVar[type[Method] | None] = None
    #: The base of the plug-in's paper: the plug-in's name alone means ``<default_base.name>+<name>``.
    default_base: ClassVar[type[Method]]

    def __post_init__(self):
        if self.base_class is None:
            raise UsageError(f"{self.name} is a plug-in: compose it with a base, e.g. "
                             f"'{self.default_base.name}+{self.name}'")
        options = {name: getattr(self, name) for name in registry.option_names(self.base_class)}
        self.base: Method = registry.create(self.base_class.name, **options)

    @classmethod
    def check_base(cls, base: type[Method]) -> None:
        """Raise :class:`UsageError` (saying why) when ``base`` does not fit this plug-in."""

    def check_models(self, models):
        self.base.check_models(models)
        super().check_models(models)

    def text_classifier(self, models, spec, cache):
        return self.base.text_classifier(models, spec, cache)

    def normalization(self, models):
        return self.base.normalization(models)


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: adds a plug-in, and its paper's composition under the plug-in's own name."""
    PLUGINS[cls.name] = cls
    registry.METHODS[cls.name] = compose(cls.default_base, cls)
    return cls


@functools.cache
def compose(base: type[Method], plugin: type[Plugin]) -> type[Method]:
    """The method class of ``plugin`` applied to ``base`` (see the module docstring); one class per pair."""
    plugin.check_base(base)
    base_types = field_types(base)
    shared = set(registry.option_names(plugin)) & set(base_types)
    if shared:
        raise UsageError(f"{plugin.name} and {base.name} both have the option(s) {', '.join(sorted(shared))}")
    namespace = {
        "name": f"{base.name}+{plugin.name}",
        "summary": f"{plugin.summary}; on {base.name}",
        "base_class": base,
        "__module__": plugin.__module__,
    }
    fields = [(f.name, base_types[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                           metadata=f.metadata))
              for f in dataclasses.fields(base) if f.init]
    cls = dataclasses.make_dataclass(f"{plugin.__name__}On{base.__name__}", fields, bases=(plugin,),
                                     namespace=namespace)
    cls.presets = {key: _with_base_options(cls, preset, base.presets.get(key))
                   for key, preset in plugin.presets.items()}
    return cls


def _with_base_options(cls: type[Method], preset: Preset, inner: Preset | None) -> Preset:
    """``preset`` with the options of the base's preset of the same benchmark, typed as ``cls`` declares them."""
    options = {**(inner.options if inner else {}), **preset.options}
    return dataclasses.replace(preset, options=coerce_fields(cls, options, f"preset option of {cls.name!r}"))


def compose_named(name: str) -> type[Method]:
    """Build and register the composition ``name`` = ``base+plugin[+plugin...]`` (and each shorter chain)."""
    first, *plugins = [part.strip() for part in name.split("+")]
    methods = registry.available()
    if first not in methods:
        raise UsageError(f"unknown base method {first!r} in {name!r}; available: {', '.join(sorted(methods))}")
    cls = methods[first]
    for part in plugins:
        if part not in PLUGINS:
            raise UsageError(f"{part!r} in {name!r} is not a plug-in; plug-ins: {', '.join(sorted(PLUGINS))}")
        cls = compose(cls, PLUGINS[part])
        methods.setdefault(cls.name, cls)
    methods[name] = cls
    return cls
