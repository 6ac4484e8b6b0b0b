"""Typed settings from dataclass fields: one place that turns user input (Python values, ``--option KEY=VALUE``
strings, command-line flags) into the field's type, with a clear error naming the setting.

A settings class is a dataclass whose fields carry their type annotation (``bool``, ``int``, ``float``, ``str``,
``Literal[...]``, ``tuple[int, ...]``, ``X | None``) and, in ``metadata``, a ``help`` text and optionally the range
of a number (:func:`setting`, checked by :func:`check_ranges`). :func:`coerce` converts one value,
:func:`coerce_fields` a mapping of them, and :func:`add_field_flags` / :func:`field_flag_values` derive command-line
flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Union

from vocabseg.errors import UsageError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
NONE_WORDS = ("none", "null")


def as_bool(value: Any, name: str) -> bool:
    """A boolean given as a bool, 0/1 or a word (true/false, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise UsageError(f"{name} must be true or false (got {value!r})")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's init fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` as ``annotation`` says; strings are parsed. Raises :class:`UsageError` naming ``name``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, name)
    if origin is Literal:
        text = value.strip() if isinstance(value, str) else value
        if text not in args:
            raise UsageError(f"{name} must be one of {', '.join(map(str, args))} (got {value!r})")
        return text
    if origin is tuple:
        return _coerce_tuple(value, args[0] if args else Any, name)
    if annotation is bool:
        return as_bool(value, name)
    if annotation in (int, float):
        return _number(value, annotation, name)
    if annotation is str and not isinstance(value, str):
        raise UsageError(f"{name} must be text (got {value!r})")
    return value


def _coerce_union(value: Any, args: tuple, name: str) -> Any:
    empty = value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)
    if empty and type(None) in args:
        return None
    errors = []
    for option in (a for a in args if a is not type(None)):
        try:
            return coerce(value, option, name)
        except UsageError as exc:
            errors.append(str(exc))
    raise UsageError(errors[0] if len(errors) == 1 else f"{name}: {value!r} fits none of its types")


def _coerce_tuple(value: Any, item_type: Any, name: str) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)  # one item
    items = [p for p in value.replace(";", ",").split(",") if p.strip()] if isinstance(value, str) else value
    if not isinstance(items, Iterable) or isinstance(items, Mapping):
        raise UsageError(f"{name} must be a comma-separated list (got {value!r})")
    return tuple(coerce(item.strip() if isinstance(item, str) else item, item_type, name) for item in items)


def _number(value: Any, kind: type, name: str) -> int | float:
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise UsageError(f"{name} must be {what} (got {value!r})")
    if isinstance(value, (int, float)):
        if kind is int and value != int(value):
            raise UsageError(f"{name} must be {what} (got {value!r})")
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    raise UsageError(f"{name} must be {what} (got {value!r})")


def coerce_fields(cls: type, values: Mapping[str, Any], what: str = "option") -> dict[str, Any]:
    """Each of ``values`` converted to the type of ``cls``'s field of that name; unknown names are an error."""
    known = field_types(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(sorted(known)) or 'none'}")
    return {key: coerce(value, known[key], key) for key, value in values.items()}


def field_help(cls: type) -> dict[str, str]:
    """Each init field's ``help`` metadata (empty when none)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.init}


def field_ranges(cls: type) -> dict[str, str]:
    """Each init field's allowed range in words (see :func:`setting`), for fields that declare one."""
    return {f.name: range_text(f.metadata["range"]) for f in dataclasses.fields(cls)
            if f.init and f.metadata.get("range")}


def type_name(annotation: Any) -> str:
    """A short readable name of a field type: ``int``, ``bool``, ``a|b``, ``list of int``, ``float or none``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) if a is not type(None) else "none" for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0]) if args else 'values'}"
    return getattr(annotation, "__name__", str(annotation))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_field_flags(parser: argparse.ArgumentParser | Any, cls: type, names: Iterable[str] | None = None) -> None:
    """One flag per field (``--short-side`` for ``short_side``), all defaulting to None (= not given); booleans get
    ``--x/--no-x``. Values are parsed by :func:`field_flag_values`."""
    types_ = field_types(cls)
    helps, ranges = field_help(cls), field_ranges(cls)
    for name in names or types_:
        annotation = types_[name]
        text = helps.get(name, "")
        kind = type_name(annotation) + (f", {ranges[name]}" if name in ranges else "")
        if annotation is bool:
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None
            parser.add_argument(flag(name), default=None, choices=choices, metavar=None if choices else "VALUE",
                                help=f"{text} ({kind})" if text else kind)


def field_flag_values(args: argparse.Namespace, cls: type, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The flags of :func:`add_field_flags` that were given, converted to their fields' types."""
    types_ = field_types(cls)
    given = {name: getattr(args, name) for name in names or types_ if getattr(args, name, None) is not None}
    return {name: coerce(value, types_[name], flag(name)) for name, value in given.items()}


def setting(default: Any, help: str = "", *, above: float | None = None, below: float | None = None,
            at_least: float | None = None, at_most: float | None = None) -> Any:
    """A dataclass field with a ``help`` text and, for a number (or each number of a tuple), its allowed range:
    ``> above``, ``< below``, ``>= at_least``, ``<= at_most``; :func:`check_ranges` enforces it."""
    bounds = {k: v for k, v in dict(above=above, below=below, at_least=at_least, at_most=at_most).items()
              if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, "range": bounds})


_RANGE_TESTS = {"above": lambda v, b: v > b, "below": lambda v, b: v < b, "at_least": lambda v, b: v >= b,
                "at_most": lambda v, b: v <= b}


def range_text(bounds: Mapping[str, float]) -> str:
    """``positive``, ``in [0, 1)``, ``>= 0``, ... for the bounds of :func:`setting`."""
    if bounds == {"above": 0}:
        return "positive"
    low = next(((mark, bounds[name]) for name, mark in (("at_least", "["), ("above", "(")) if name in bounds), None)
    high = next(((bounds[name], mark) for name, mark in (("at_most", "]"), ("below", ")")) if name in bounds), None)
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"
    words = {"above": ">", "below": "<", "at_least": ">=", "at_most": "<="}
    return " and ".join(f"{words[name]} {bound:g}" for name, bound in bounds.items())


def check_ranges(obj: Any) -> None:
    """Raise :class:`UsageError` for the first field of dataclass ``obj`` outside the range its :func:`setting`
    declares (NaN is outside every range; ``None`` is left to the field's type)."""
    for f in dataclasses.fields(obj):
        bounds = f.metadata.get("range")
        value = getattr(obj, f.name)
        if not bounds or value is None or isinstance(value, (bool, str)):
            continue
        values = value if isinstance(value, tuple) else (value,)
        if not all(_RANGE_TESTS[name](v, bound) for v in values for name, bound in bounds.items()):
            raise UsageError(f"{f.name} must be {range_text(bounds)} (got {value!r})")


def parse_key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (as ``--option`` takes it); the value stays text until the option's type converts it."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value
