"""Command-line commands that method packages contribute (ITACLIP's ``aux-texts``, ``train maft``, ...).

Only the standard library is imported here and in the modules that list commands, so that building the command line
(``vocabseg --help``) loads no model code; a command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

#: Modules whose ``COMMANDS`` (and ``OPTION_FLAGS``: shortcut flags for method options) the command line adds.
COMMAND_MODULES = (
    "vocabseg.methods.itaclip.commands",
    "vocabseg.methods.floss.commands",
    "vocabseg.methods.maft.commands",
    "vocabseg.methods.ifseg.commands",
)


@dataclass(frozen=True)
class Command:
    """``vocabseg <name>``, or ``vocabseg <group> <name>`` (``train``, ``convert``)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    group: str | None = None
    description: str = ""
    #: Add the shared model arguments (``--weights``, ``--arch``, ``--device``) before the command's own.
    model_arguments: bool = False
    #: Add instead everything ``segment`` takes to describe a segmenter (method, preset, models, options, protocol
    #: flags; ``add_arguments`` may change their defaults); ``run`` then builds it with
    #: ``args.build_segmenter(args, **overrides)`` (a command module may not import the command line).
    segmenter_arguments: bool = False
