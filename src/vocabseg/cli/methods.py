"""``vocabseg methods``: every method with its models, options (type, default, help) and presets."""

from __future__ import annotations

import argparse
import dataclasses


def register(sub) -> None:
    parser = sub.add_parser("methods", help="list the methods, their models, options and presets",
                            description="Lists every method; compositions of a base with plug-ins are written "
                                        "base+plugin (e.g. naclip+resclip).")
    parser.add_argument("method", nargs="?", help="show only this method")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vocabseg.config import field_help, field_ranges, field_types, type_name
    from vocabseg.methods import registry

    names = [args.method] if args.method else list(registry.available())
    for name in names:
        cls = registry.method_class(name)
        print(f"{name}: {cls.summary}")
        for role, slot in cls.models.items():
            print(f"    model {role}: {slot.kind} (default {slot.default}){' - ' + slot.help if slot.help else ''}")
        types, helps, ranges = field_types(cls), field_help(cls), field_ranges(cls)
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
        for option, annotation in types.items():
            text = f" - {helps[option]}" if helps.get(option) else ""
            kind = type_name(annotation) + (f", {ranges[option]}" if option in ranges else "")
            print(f"    option {option}={defaults[option]!r} ({kind}){text}")
        print(f"    presets: {', '.join(cls.presets) or 'none'}")
    print("\nPlug-ins compose with a base method as base+plugin (e.g. naclip+resclip, sclip+floss).")
    return 0
