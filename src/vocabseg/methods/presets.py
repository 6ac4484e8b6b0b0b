"""Published protocols as data: each method package's ``presets.toml`` holds, per method, its default protocol
and one table per benchmark preset (see the comment at the top of any such file)."""

from __future__ import annotations

import functools
import tomllib
from importlib import resources
from typing import Any

from vocabseg.methods.base import Preset
from vocabseg.pipeline.protocol import Protocol

_TABLE_KEYS = ("dataset", "names", "options")


@functools.cache
def _package_table(package: str) -> dict[str, Any]:
    return tomllib.loads(resources.files(package).joinpath("presets.toml").read_text(encoding="utf-8"))


def _method_table(package: str, method: str) -> dict[str, Any]:
    table = _package_table(package)
    if method not in table:
        raise KeyError(f"{package}/presets.toml has no table for {method!r}")
    return table[method]


def default_protocol(package: str, method: str) -> Protocol:
    """``method``'s default protocol from ``package``'s ``presets.toml``."""
    return Protocol().replace(**_method_table(package, method).get("default", {}))


def presets(package: str, method: str) -> dict[str, Preset]:
    """``method``'s presets from ``package``'s ``presets.toml`` (with those of its ``presets_of`` method first)."""
    table = _method_table(package, method)
    shared = presets(package, table["presets_of"]) if "presets_of" in table else {}
    own = {}
    for name, entry in table.items():
        if not isinstance(entry, dict) or name == "default":
            continue
        knobs = {k: v for k, v in entry.items() if k not in _TABLE_KEYS}
        own[name] = Preset(Protocol().replace(**knobs), entry.get("dataset"), entry.get("names"),
                           dict(entry.get("options", {})))
    return {**shared, **own}
