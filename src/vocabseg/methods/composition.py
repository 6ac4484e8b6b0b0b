"""Plug-in methods and their composition with a base method: ``base+plugin`` (``clearclip+resclip``, ``sclip+floss``,
``naclip+resclip+floss``).

A plug-in (ResCLIP, FLOSS) changes another method instead of standing alone. :func:`compose` builds the method class
of a pair, a plain :class:`Method` for the rest of the library:

* its name spells the chain (``naclip+resclip``), which :meth:`Segmenter.describe` and eval results report;
* its options are the plug-in's and the base's together (``--option`` routes each to the one that declares it; the
  two may not share a name), so ``Segmenter("naclip+resclip", gaussian_std=3, temp_thd=0.3)`` sets both;
* its default protocol and presets are the plug-in's: a composition runs the plug-in's harness (its official
  configs), and a preset also takes the options that the base's preset of the same benchmark sets (so
  ``naclip+resclip+floss --preset voc20`` uses FLOSS's voc20 protocol with ResCLIP's voc20 weights).

A plug-in named alone runs on the base of its paper (``resclip`` is ``naclip+resclip``). Compositions named with
``+`` are built and registered on first use (:func:`compose_named`, called by ``create_method``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from vocabseg.methods.base import METHODS, Method, Preset, method_options

#: Registered plug-ins by name (the method classes that need a base).
PLUGINS: dict[str, type[Plugin]] = {}


@dataclass
class Plugin(Method):
    """A method that wraps a base method; concrete only as a composition (:func:`compose`), which sets
    :attr:`base_class`. The base instance, built from the composition's base options, is :attr:`base`."""

    base_class: ClassVar[type[Method] | None] = None
    #: The base of the plug-in's paper: the plug-in's name alone means ``<default_base.name>+<name>``.
    default_base: ClassVar[type[Method]]

    def __post_init__(self):
        if self.base_class is None:
            raise TypeError(f"{type(self).__name__} is a plug-in: compose it with a base, e.g. "
                            f"create_method('{self.default_base.name}+{self.name}')")
        self.base = self.base_class(**{name: getattr(self, name) for name in method_options(self.base_class)})

    @classmethod
    def check_base(cls, base: type[Method]) -> None:
        """Raise ``ValueError`` (saying why) when ``base`` does not fit this plug-in."""


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: adds a plug-in, and its paper's composition under the plug-in's own name."""
    PLUGINS[cls.name] = cls
    METHODS[cls.name] = compose(cls.default_base, cls)
    return cls


def compose(base: type[Method], plugin: type[Plugin]) -> type[Method]:
    """The method class of ``plugin`` applied to ``base`` (see the module docstring)."""
    plugin.check_base(base)
    base_fields = [f for f in dataclasses.fields(base) if f.init]
    shared = set(method_options(plugin)) & {f.name for f in base_fields}
    if shared:
        raise ValueError(f"{plugin.name} and {base.name} both have the option(s) {', '.join(sorted(shared))}")
    presets = {key: _with_inner_options(preset, base.presets.get(key)) for key, preset in plugin.presets.items()}
    namespace = {
        "name": f"{base.name}+{plugin.name}",
        "summary": f"{plugin.summary}; on {base.name}",
        "base_class": base,
        "presets": presets,
        "__module__": plugin.__module__,
    }
    fields = [(f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory))
              for f in base_fields]
    return dataclasses.make_dataclass(f"{plugin.__name__}On{base.__name__}", fields, bases=(plugin,),
                                      namespace=namespace)


def _with_inner_options(preset: Preset, inner: Preset | None) -> Preset:
    if inner is None or not inner.options:
        return preset
    return dataclasses.replace(preset, options={**inner.options, **preset.options})


def compose_named(name: str) -> type[Method]:
    """Build and register the composition ``name`` = ``base+plugin[+plugin...]``."""
    first, *plugins = [part.strip() for part in name.split("+")]
    if first not in METHODS:
        raise ValueError(f"unknown base method {first!r} in {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[first]
    for part in plugins:
        if part not in PLUGINS:
            raise ValueError(f"{part!r} in {name!r} is not a plug-in; plug-ins: {', '.join(sorted(PLUGINS))}")
        cls = compose(cls, PLUGINS[part])
    METHODS[name] = cls
    return cls
