"""Command-line interface: ``vocabseg segment | methods | aux-texts | floss-rank | eval | compare | data | demo``.

Argument parsing, progress and file output only; all model logic lives in :mod:`vocabseg.api`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}

log = logging.getLogger("vocabseg")


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _size_or_zero(text: str) -> int:
    """An integer size; 'none', 'keep' or 'whole' mean 0 (keep the image size / whole-image inference)."""
    return 0 if text.lower() in ("none", "keep", "whole") else int(text)


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for convert in (int, float):
        try:
            return key.strip(), convert(value)
        except ValueError:
            pass
    return key.strip(), value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Method, weights, device and every protocol knob (shared by segment, eval and demo)."""
    group = parser.add_argument_group("model")
    group.add_argument("--method", default="sclip", help="segmentation method (see `vocabseg methods`)")
    group.add_argument("--preset", help="published per-dataset protocol, e.g. voc21 (see `vocabseg methods`)")
    group.add_argument("--weights",
                       help="open_clip pretrained tag or a local checkpoint file (default: the method's: openai; "
                            "ifseg: ofa-base, or OFA's ofa_base.pt)")
    group.add_argument("--arch", help="open_clip architecture (default: ViT-B-16; inferred for state-dict files)")
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    group.add_argument("--no-text-cache", action="store_true", help="do not read or write cached text embeddings")
    group.add_argument("--checkpoint", help="the method's trained model (ifseg, ifseg-clip: from `vocabseg train`)")
    knobs = parser.add_argument_group("protocol overrides (default: the preset's or the method's)")
    knobs.add_argument("--short-side", type=_size_or_zero, help="resize the short side to this (none: keep size)")
    knobs.add_argument("--crop", type=_size_or_zero, help="sliding-window crop (none: whole image)")
    knobs.add_argument("--stride", type=int, help="sliding-window stride")
    knobs.add_argument("--logit-scale", type=float, help="softmax temperature applied to cosine logits")
    knobs.add_argument("--prob-thd", type=float, help="below this probability a pixel becomes background")
    knobs.add_argument("--area-thd", type=float, help="drop classes covering at most this share of the foreground")
    knobs.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None, help="PAMR refinement")
    knobs.add_argument("--pamr-steps", type=int, help="PAMR iterations")
    knobs.add_argument("--pamr-dilations", type=_csv_ints, help="PAMR dilations, e.g. 8,16")
    knobs.add_argument("--window-batch", type=int, help="sliding windows per forward pass (default 0: automatic)")
    knobs.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                       help="autocast the ViT to bf16/fp16 (GPU; logits are merged in fp32)")
    knobs.add_argument("--option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="a method option, e.g. --option gaussian_std=3 (repeatable)")
    knobs.add_argument("--aux-texts", metavar="FILE",
                       help="auxiliary class texts for itaclip ('classname >=text' lines, JSON or YAML; "
                            "see `vocabseg aux-texts`); sets the method option aux_texts")


def build_segmenter(args: argparse.Namespace, **kwargs):
    """The Segmenter the model arguments describe; ``kwargs`` go to it as well (e.g. a shared ``backbone``)."""
    from vocabseg.api import Segmenter

    overrides = {key: getattr(args, key) for key in (
        "short_side", "crop", "stride", "logit_scale", "prob_thd", "area_thd", "pamr", "pamr_steps",
        "pamr_dilations", "window_batch", "precision") if getattr(args, key) is not None}
    overrides.update(dict(args.option))
    if getattr(args, "aux_texts", None):
        overrides["aux_texts"] = args.aux_texts
    if getattr(args, "checkpoint", None):
        overrides["checkpoint"] = args.checkpoint
    return Segmenter(args.method, weights=args.weights, arch=args.arch, device=args.device, preset=args.preset,
                     text_cache=not args.no_text_cache, **overrides, **kwargs)


def collect_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Image files named directly or found (non-recursively) in named folders; missing paths are reported."""
    files, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.exists():
            files.append(path)
        else:
            missing.append(item)
    return files, missing


def _unique_stems(files: list[Path]) -> list[str]:
    stems, seen = [], {}
    for file in files:
        stem = file.stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vocabseg.io.images import ImageError, load_image
    from vocabseg.text.classifier import parse_classes, read_classes_file

    if args.classes and args.classes_file:
        raise SystemExit("error: give --classes or --classes-file, not both")
    background = False if args.no_background else (args.background or True)
    classes = read_classes_file(args.classes_file) if args.classes_file else args.classes
    spec = parse_classes(classes, background) if classes is not None else None
    files, missing = collect_images(args.images)
    for item in missing:
        log.error("%s: no such file or folder", item)
    if not files:
        raise SystemExit("error: no images to segment")
    segmenter = build_segmenter(args)
    spec = segmenter.class_spec(spec)
    failures = len(missing)
    jobs = list(zip(files, _unique_stems(files), strict=True))
    for file, stem in tqdm(jobs, desc="segment", unit="img", disable=None):
        try:
            image = load_image(file, max_pixels=args.max_pixels)
        except ImageError as exc:
            log.error("skipped: %s", exc)
            failures += 1
            continue
        result = segmenter.segment(image, spec, maps=False, image_id=file.stem)
        result.meta["image"] = str(file)
        result.save(args.out, stem)
    done = len(files) - (failures - len(missing))
    log.info("wrote %d segmentation(s) to %s", done, args.out)
    if failures:
        log.error("%d of %d input(s) failed", failures, len(files) + len(missing))
        return 1
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from vocabseg.methods.base import METHODS, create_method, method_options

    create_method("sclip")
    for name in sorted(METHODS):
        cls = METHODS[name]
        print(f"{name:12s} {cls.summary}")
        options = ", ".join(f"{k}={getattr(cls, k, '')}" for k in method_options(cls))
        if options:
            print(f"{'':12s} options: {options}")
        print(f"{'':12s} presets: {', '.join(cls.presets) or 'none'}")
    from vocabseg.methods.composition import PLUGINS

    print(f"\nplug-ins ({', '.join(sorted(PLUGINS))}) compose with a base method as BASE+PLUGIN, e.g. "
          "clearclip+resclip, sclip+floss, naclip+resclip+floss (options and presets of both apply; a plug-in named "
          "alone runs on its paper's base)")
    return 0


def cmd_aux_texts(args: argparse.Namespace) -> int:
    from vocabseg.methods.itaclip.auxtexts import AuxTextError, generate_aux_texts, write_aux_texts

    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"error: {out} exists; pass --force to overwrite it")
    try:
        names = _aux_class_names(args)
        pairs = generate_aux_texts(
            names, kind=args.kind, url=args.llm_url, model=args.llm_model, api_key_env=args.api_key_env,
            timeout=args.timeout, progress=lambda name, text: log.info("%s >=%s", name, text))
    except AuxTextError as exc:
        log.error("%s", exc)
        return 2
    write_aux_texts(out, pairs)
    log.info("wrote %d %s(s) to %s", len(pairs), args.kind, out)
    return 0


def _aux_class_names(args: argparse.Namespace) -> list[str]:
    """The first name of each non-background class (as ITACLIP's generation scripts take them)."""
    from vocabseg.text.classifier import parse_classes, read_classes_file

    given = [bool(args.classes), bool(args.classes_file), bool(args.dataset)]
    if sum(given) != 1:
        raise SystemExit("error: give exactly one of --classes, --classes-file and --dataset")
    if args.dataset:
        from vocabseg.data.classes import CLASSES, QUERY_NAMES, query_names

        if args.dataset not in CLASSES:
            raise SystemExit(f"error: unknown dataset {args.dataset!r}; known: {', '.join(CLASSES)}")
        names = query_names(args.dataset, "itaclip") if (args.dataset, "itaclip") in QUERY_NAMES else [
            (label,) for label in CLASSES[args.dataset]]
        first = 1 if CLASSES[args.dataset][0] == "background" else 0
        return [n[0] for n in names[first:]]
    classes = read_classes_file(args.classes_file) if args.classes_file else args.classes
    spec = parse_classes(classes, background=False)
    return [names[0] for names in spec.names]


def build_parser() -> argparse.ArgumentParser:
    from vocabseg.methods.itaclip import auxtexts

    parser = argparse.ArgumentParser(prog="vocabseg", description="Segment any image into any list of words.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment images into the given classes",
                         description="Writes per image: <name>.png (palette label map), <name>_overlay.png "
                                     "(colour overlay with legend) and <name>.json (classes, palette, pixel shares, "
                                     "method and protocol).")
    seg.add_argument("images", nargs="+", help="image files or folders of images")
    seg.add_argument("--classes", help="comma-separated classes; '|' separates synonyms: 'person|man,dog'")
    seg.add_argument("--classes-file", help="one class per line, synonyms separated by ', '")
    seg.add_argument("--background", help="background names separated by '|' (default: 26 stuff words)")
    seg.add_argument("--no-background", action="store_true", help="no background class")
    seg.add_argument("--out", required=True, help="output folder")
    seg.add_argument("--max-pixels", type=int, help="refuse images larger than this many pixels")
    add_model_arguments(seg)
    seg.set_defaults(func=cmd_segment)

    aux = sub.add_parser(
        "aux-texts", help="generate auxiliary class texts (definitions or synonyms) with an LLM, for itaclip",
        description="Asks an OpenAI-compatible chat endpoint (e.g. a local Ollama or vLLM server) for one "
                    "definition or synonym per class with the ITACLIP paper's prompts (temperature 0.6, top-p 0.9) "
                    "and writes them as 'classname >=text' lines (.txt), JSON or YAML, ready for --aux-texts. "
                    "Nothing is sent anywhere else.")
    aux.add_argument("--classes", help="comma-separated classes; '|' separates synonyms (the first name is used)")
    aux.add_argument("--classes-file", help="one class per line, synonyms separated by ', '")
    aux.add_argument("--dataset", help="the classes of a benchmark (background excluded), e.g. voc21")
    aux.add_argument("--kind", choices=("definition", "synonym"), default="definition",
                     help="a brief definition (at most 50 words) or one synonym per class (default: definition)")
    aux.add_argument("--out", required=True, help="output file: .txt ('classname >=text'), .json or .yaml")
    aux.add_argument("--llm-url", default=auxtexts.DEFAULT_LLM_URL,
                     help=f"base URL of the OpenAI-compatible server (default: a local Ollama, "
                          f"{auxtexts.DEFAULT_LLM_URL})")
    aux.add_argument("--llm-model", default=auxtexts.DEFAULT_LLM_MODEL,
                     help=f"model name on that server (default: {auxtexts.DEFAULT_LLM_MODEL})")
    aux.add_argument("--api-key-env", default=auxtexts.DEFAULT_API_KEY_ENV,
                     help="environment variable holding the API key, sent as a Bearer token when set "
                          f"(default: {auxtexts.DEFAULT_API_KEY_ENV})")
    aux.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer (default: 60)")
    aux.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    aux.set_defaults(func=cmd_aux_texts)

    methods = sub.add_parser("methods", help="list methods, their options and presets")
    methods.set_defaults(func=cmd_methods)

    from vocabseg.demo import add_demo_parser
    from vocabseg.eval.cli import add_subcommands
    from vocabseg.methods.floss.commands import add_rank_parser as add_floss_rank
    from vocabseg.methods.ifseg.commands import add_ofa_train_parser as add_ifseg_train
    from vocabseg.methods.ifseg.commands import add_train_parser as add_ifseg_clip_train
    from vocabseg.methods.maft.convert import add_convert_parser as add_maft_convert
    from vocabseg.methods.maft.train import add_train_parser as add_maft_train

    add_subcommands(sub)  # eval, compare, data
    add_floss_rank(sub)
    train = sub.add_parser("train", help="train a method's model (maft: fine-tune CLIP; ifseg, ifseg-clip: from "
                                          "class names alone)")
    train_sub = train.add_subparsers(dest="trainer", required=True, metavar="METHOD")
    add_maft_train(train_sub)
    add_ifseg_train(train_sub)
    add_ifseg_clip_train(train_sub)
    convert = sub.add_parser("convert", help="convert released checkpoints into this library's format")
    convert_sub = convert.add_subparsers(dest="conversion", required=True)
    add_maft_convert(convert_sub)
    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from vocabseg.models.factory import WeightsError

    try:
        return args.func(args)
    except (WeightsError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
