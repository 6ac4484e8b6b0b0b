"""The command line: ``vocabseg segment | methods | eval | compare | data | demo``, plus the commands method
packages contribute (``aux-texts``, ``floss-rank``, ``train maft|ifseg|ifseg-clip``, ``convert maft-checkpoint``).

Exit codes: 0 success, 1 a runtime failure (some images failed, a download failed), 2 a usage error (a bad option,
file, class list or setting), 130 interrupted. Errors are one line, without a traceback (``-v`` shows debug logs).
"""

from __future__ import annotations

import argparse
import logging
import sys

from vocabseg.errors import VocabsegError

log = logging.getLogger("vocabseg")


def build_parser() -> argparse.ArgumentParser:
    from vocabseg.cli import common, data, demo, eval, methods, segment

    parser = argparse.ArgumentParser(prog="vocabseg", description="Segment any image into any list of words.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (segment, methods, eval, data, demo):
        module.register(sub)
    groups = {"train": "train a method's model (maft: fine-tune CLIP; ifseg: OFA from class names alone; "
                       "ifseg-clip: a head over CLIP)",
              "convert": "convert released checkpoints into this library's format"}
    group_parsers = {}
    for module in common.command_modules():
        for command in module.COMMANDS:
            if command.group is None:
                target = sub
            else:
                if command.group not in group_parsers:
                    parent = sub.add_parser(command.group, help=groups.get(command.group, ""))
                    group_parsers[command.group] = parent.add_subparsers(dest=f"{command.group}_command",
                                                                         required=True, metavar="COMMAND")
                target = group_parsers[command.group]
            parser_ = target.add_parser(command.name, help=command.help, description=command.description or None)
            if command.segmenter_arguments:
                common.add_model_arguments(parser_)
                parser_.set_defaults(build_segmenter=common.build_segmenter)
            elif command.model_arguments:
                common.add_weights_arguments(parser_)
            command.add_arguments(parser_)
            parser_.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except VocabsegError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
