"""``vocabseg demo``: a local, offline web page to segment an image with several methods and compare them.

The page (``static/index.html``) is one self-contained file: inline CSS and JavaScript, no fonts, scripts or
analytics from the internet. :mod:`vocabseg.demo.server` holds the request logic (:class:`DemoApp`, testable
without a socket) and a small standard-library HTTP server.
"""

from __future__ import annotations

import argparse

from vocabseg.cli import _key_value

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20.0


def add_demo_parser(sub) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command to the ``vocabseg`` sub-parsers."""
    demo = sub.add_parser(
        "demo", help="start the local demo page (upload an image, type classes, compare methods)",
        description="Starts a local web page where you upload an image (or pick an example), type class names, "
                    "choose methods, a preset and PAMR, and compare the overlays, label maps and pixel shares. "
                    "The model loads once at start; the page works offline.")
    demo.add_argument("--host", default=DEFAULT_HOST,
                      help=f"address to bind (default: {DEFAULT_HOST}, this machine only)")
    demo.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"port (default: {DEFAULT_PORT}; 0 picks a free port)")
    demo.add_argument("--weights", default="openai",
                      help="open_clip pretrained tag (default: openai) or a local checkpoint file")
    demo.add_argument("--arch", help="open_clip architecture (default: ViT-B-16; inferred for state-dict files)")
    demo.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    demo.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                      help=f"refuse uploads larger than this many megabytes (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    demo.add_argument("--max-pixels", type=int, default=None,
                      help="refuse images with more pixels than this (default: 25,000,000)")
    demo.add_argument("--no-text-cache", action="store_true", help="do not read or write cached text embeddings")
    demo.add_argument("--option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                      help="a method option for the methods that have it, e.g. --option dino=PATH (repeatable)")
    demo.set_defaults(func=cmd_demo)
    return demo


def cmd_demo(args: argparse.Namespace) -> int:
    from vocabseg.demo.server import run_demo

    return run_demo(host=args.host, port=args.port, weights=args.weights, arch=args.arch, device=args.device,
                    max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                    text_cache=not args.no_text_cache, method_options=dict(args.option))


__all__ = ["add_demo_parser", "cmd_demo"]
