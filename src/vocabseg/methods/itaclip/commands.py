"""ITACLIP's command: ``vocabseg aux-texts`` (auxiliary class texts from an LLM), and its ``--aux-texts`` flag."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vocabseg.methods.commands import Command
from vocabseg.methods.itaclip.auxtexts import DEFAULT_API_KEY_ENV, DEFAULT_LLM_MODEL, DEFAULT_LLM_URL

log = logging.getLogger("vocabseg")

#: ``--aux-texts FILE`` sets ITACLIP's ``aux_texts`` option.
OPTION_FLAGS = {"--aux-texts": ("aux_texts", "auxiliary class texts for itaclip ('classname >=text' lines, JSON or "
                                             "YAML; see `vocabseg aux-texts`)")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", help="comma-separated classes; '|' separates synonyms (the first name is used)")
    parser.add_argument("--classes-file", help="one class per line, synonyms separated by ', '")
    parser.add_argument("--dataset", help="the classes of a benchmark (background excluded), e.g. voc21")
    parser.add_argument("--kind", choices=("definition", "synonym"), default="definition",
                        help="a brief definition (at most 50 words) or one synonym per class (default: definition)")
    parser.add_argument("--out", required=True, help="output file: .txt ('classname >=text'), .json or .yaml")
    parser.add_argument("--llm-url", default=DEFAULT_LLM_URL,
                        help=f"base URL of the OpenAI-compatible server (default: a local Ollama, {DEFAULT_LLM_URL})")
    parser.add_argument("--llm-model", default=DEFAULT_LLM_MODEL,
                        help=f"model name on that server (default: {DEFAULT_LLM_MODEL})")
    parser.add_argument("--api-key-env", default=DEFAULT_API_KEY_ENV,
                        help="environment variable holding the API key, sent as a Bearer token when set "
                             f"(default: {DEFAULT_API_KEY_ENV})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer (default: 60)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run(args: argparse.Namespace) -> int:
    from vocabseg.errors import UsageError
    from vocabseg.methods.itaclip.auxtexts import generate_aux_texts, write_aux_texts

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    names = class_names(args)
    pairs = generate_aux_texts(names, kind=args.kind, url=args.llm_url, model=args.llm_model,
                               api_key_env=args.api_key_env, timeout=args.timeout,
                               progress=lambda name, text: log.info("%s >=%s", name, text))
    write_aux_texts(out, pairs)
    log.info("wrote %d %s(s) to %s", len(pairs), args.kind, out)
    return 0


def class_names(args: argparse.Namespace) -> list[str]:
    """The first name of each non-background class (as ITACLIP's generation scripts take them)."""
    from vocabseg.data.classes import BACKGROUND, CLASSES, query_names, sources
    from vocabseg.errors import UsageError
    from vocabseg.text.classes import parse_classes, read_classes_file

    if sum([bool(args.classes), bool(args.classes_file), bool(args.dataset)]) != 1:
        raise UsageError("give exactly one of --classes, --classes-file and --dataset")
    if args.dataset:
        if args.dataset not in CLASSES:
            raise UsageError(f"unknown dataset {args.dataset!r}; known: {', '.join(CLASSES)}")
        names = query_names(args.dataset, "itaclip") if "itaclip" in sources(args.dataset) else [
            (label,) for label in CLASSES[args.dataset]]
        first = 1 if CLASSES[args.dataset][0] == BACKGROUND else 0
        return [n[0] for n in names[first:]]
    classes = read_classes_file(args.classes_file) if args.classes_file else args.classes
    return [names[0] for names in parse_classes(classes, background=False).names]


COMMANDS = (
    Command("aux-texts", "generate auxiliary class texts (definitions or synonyms) with an LLM, for itaclip",
            add_arguments, run,
            description="Asks an OpenAI-compatible chat endpoint (e.g. a local Ollama or vLLM server) for one "
                        "definition or synonym per class with the ITACLIP paper's prompts (temperature 0.6, top-p "
                        "0.9) and writes them as 'classname >=text' lines (.txt), JSON or YAML, ready for "
                        "--aux-texts. Nothing is sent anywhere else."),
)
