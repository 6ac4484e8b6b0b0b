"""``vocabseg demo``: the local web page (see :mod:`vocabseg.demo`)."""

from __future__ import annotations

import argparse

from vocabseg.cli.common import add_weights_arguments
from vocabseg.config import parse_key_value

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_READ_TIMEOUT = 60.0


def register(sub) -> None:
    demo = sub.add_parser(
        "demo", help="start the local demo page (upload an image, type classes, compare methods)",
        description="Starts a local web page where you upload an image (or pick an example), type class names, "
                    "choose methods, a preset and PAMR, and compare the overlays, label maps and pixel shares. "
                    "The models load once at start; the page works offline.")
    demo.add_argument("--host", default=DEFAULT_HOST,
                      help=f"address to bind (default: {DEFAULT_HOST}, this machine only)")
    demo.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"port (default: {DEFAULT_PORT}; 0 picks a free port)")
    add_weights_arguments(demo)
    demo.add_argument("--model", type=parse_key_value, action="append", default=[], metavar="ROLE=WEIGHTS",
                      help="weights of another model the methods use, e.g. --model dino=PATH or --model ofa=CKPT "
                           "(repeatable); methods whose extra models cannot be loaded are not offered")
    demo.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                      help=f"refuse uploads larger than this many megabytes (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    demo.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                      help="refuse a request whose upload has not arrived in full after this many seconds "
                           f"(default: {DEFAULT_READ_TIMEOUT:g})")
    demo.add_argument("--max-pixels", type=int, default=None,
                      help="refuse images with more pixels than this (default: 25,000,000)")
    demo.add_argument("--no-text-cache", action="store_true", help="do not read or write cached text embeddings")
    demo.add_argument("--option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                      help="a method option for the methods that have it (repeatable)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vocabseg.demo.web import run_demo

    return run_demo(host=args.host, port=args.port, weights=args.weights, arch=args.arch, device=args.device,
                    max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, text_cache=not args.no_text_cache,
                    models=dict(args.model), method_options=dict(args.option), read_timeout=args.read_timeout)
