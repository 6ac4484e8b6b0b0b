"""What several commands share: the model arguments (method, preset, models, protocol flags derived from the
``Protocol`` dataclass, method options), class-list arguments, the segmenter they describe.

Only the standard library and light modules are imported at import time, so that ``vocabseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from vocabseg.config import add_field_flags, field_flag_values, parse_key_value
from vocabseg.errors import UsageError
from vocabseg.pipeline.protocol import Protocol


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def command_modules() -> list:
    """The method packages' command modules (:data:`vocabseg.methods.commands.COMMAND_MODULES`)."""
    from vocabseg.methods.commands import COMMAND_MODULES

    return [importlib.import_module(name) for name in COMMAND_MODULES]


def option_flags() -> dict[str, tuple[str, str]]:
    """Shortcut flags for method options that the method packages declare (``--aux-texts`` -> ``aux_texts``)."""
    flags: dict[str, tuple[str, str]] = {}
    for module in command_modules():
        flags.update(getattr(module, "OPTION_FLAGS", {}))
    return flags


def add_weights_arguments(parser: argparse.ArgumentParser | Any, default_weights: str | None = None) -> None:
    """``--weights``, ``--arch`` and ``--device``: the main model and where it runs."""
    parser.add_argument("--weights", default=default_weights,
                        help="the main model's weights: an open_clip pretrained tag (default for CLIP methods: "
                             "openai) or a local checkpoint file")
    parser.add_argument("--arch", help="open_clip architecture (default: ViT-B-16; inferred for state-dict files)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The method, its models, its options and every protocol setting (shared by segment, eval and demo)."""
    group = parser.add_argument_group("method and models")
    group.add_argument("--method", default="sclip",
                       help="segmentation method (default: %(default)s; see `vocabseg methods`)")
    group.add_argument("--preset", help="a published per-benchmark protocol, e.g. voc21 (see `vocabseg methods`)")
    add_weights_arguments(group)
    group.add_argument("--model", type=parse_key_value, action="append", default=[], metavar="ROLE=WEIGHTS",
                       help="the weights of another model of the method, e.g. --model dino=PATH (repeatable)")
    group.add_argument("--no-text-cache", action="store_true", help="do not read or write cached text embeddings")
    group.add_argument("--option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="a method option, e.g. --option gaussian_std=3 (repeatable; see `vocabseg methods`)")
    for flag, (option, text) in option_flags().items():
        group.add_argument(flag, dest=f"option_{option}", metavar="VALUE", help=text)
    add_field_flags(parser.add_argument_group("protocol overrides (default: the preset's or the method's)"), Protocol)


def segmenter_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :class:`~vocabseg.api.Segmenter` that the model arguments describe."""
    settings = field_flag_values(args, Protocol)
    options = dict(args.option)
    for option, _ in option_flags().values():
        value = getattr(args, f"option_{option}", None)
        if value is not None:
            options[option] = value
    clashes = sorted(set(settings) & set(options))
    if clashes:
        raise UsageError(f"{', '.join(clashes)} given both as a flag and as --option; give it once")
    return dict(method=args.method, weights=args.weights, arch=args.arch, device=args.device, preset=args.preset,
                models=dict(args.model) or None, text_cache=not args.no_text_cache, **settings, **options)


def build_segmenter(args: argparse.Namespace, **kwargs: Any):
    """The :class:`~vocabseg.api.Segmenter` the model arguments describe (``kwargs`` override them)."""
    from vocabseg.api import Segmenter

    return Segmenter(**{**segmenter_arguments(args), **kwargs})


def add_classes_arguments(parser: argparse.ArgumentParser, background: bool = True) -> None:
    """``--classes`` / ``--classes-file`` (and the background flags)."""
    parser.add_argument("--classes", help="comma-separated classes; '|' separates synonyms: 'person|man,dog'")
    parser.add_argument("--classes-file", help="one class per line, synonyms separated by ', '")
    if background:
        parser.add_argument("--background", help="background names separated by '|' (default: 26 stuff words)")
        parser.add_argument("--no-background", action="store_true", help="no background class")


def classes_from_args(args: argparse.Namespace):
    """The class list of ``--classes``/``--classes-file`` (``None`` when neither is given: the preset's; without a
    ``--preset`` that is a usage error)."""
    from vocabseg.text.classes import parse_classes, read_classes_file

    if args.classes and args.classes_file:
        raise UsageError("give --classes or --classes-file, not both")
    classes = read_classes_file(args.classes_file) if args.classes_file else args.classes
    if classes is None:
        if getattr(args, "preset", None) is None:
            raise UsageError("no classes given: use --classes 'cat,dog' or --classes-file FILE, or --preset NAME "
                             "for a benchmark's classes (see `vocabseg methods`)")
        return None
    background = False if getattr(args, "no_background", False) else (getattr(args, "background", None) or True)
    return parse_classes(classes, background)
