"""The demo's request handler (no socket), its HTTP routes on a real localhost socket (uvicorn), the CLI entry and
the command in a subprocess (SIGTERM). Sockets are loopback only; waits are bounded by socket timeouts."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from vocabseg.demo.server import DemoApp, DemoError
from vocabseg.demo.web import SECURITY_HEADERS, DemoServer, bind_socket, create_asgi_app, page_html

VOC_CLASSES = "person,bottle,chair,dining table|table"
VOC_LABELS = ["background", "person", "bottle", "chair", "dining table"]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_data_url(url: str) -> Image.Image:
    header, payload = url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    """One text-embedding cache for this module's apps (the test of the cache itself uses a fresh one)."""
    return str(tmp_path_factory.mktemp("demo-text-cache"))


@pytest.fixture
def app(clip, text_cache):
    return DemoApp(clip, max_upload_bytes=5_000_000, text_cache=text_cache)


@pytest.fixture(scope="module")
def voc_png(voc):
    return png_bytes(voc[0])


def test_methods_with_other_models_are_offered_when_those_are_given(clip, text_cache, chelsea):
    """IFSeg runs on OFA, not on the shared CLIP: listed when its model is given (``--model ofa=...``)."""
    from oracle import oracle_path

    assert "ifseg" not in [m["name"] for m in DemoApp(clip, text_cache=text_cache).info()["methods"]]
    app = DemoApp(clip, text_cache=text_cache, models={"ofa": str(oracle_path("ifseg_ofa", "tiny_ifseg_ofa_d64.pt"))})
    assert "ifseg" in [m["name"] for m in app.info()["methods"]]
    out = app.segment(png_bytes(chelsea[:64, :96]), "cat, dog", background="false", methods=["ifseg", "sclip"])
    assert [r["ok"] for r in out["results"]] == [True, True]


def multipart(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]]) -> tuple[str, bytes]:
    boundary = "----vocabsegTestBoundary7MA4YWxkTrZu0gW"
    chunks = []
    for name, value in fields:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, data in files:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)


# --- the handler ------------------------------------------------------------------------------------------------

def test_segment_returns_overlay_labels_legend_and_sidecar(app, voc, voc_png):
    rgb = voc[0]
    out = app.segment(voc_png, VOC_CLASSES, background=True, methods=["sclip", "clearclip"], filename="voc.png")
    assert (out["width"], out["height"]) == (rgb.shape[1], rgb.shape[0])
    assert out["classes"] == VOC_LABELS
    assert np.array_equal(np.asarray(decode_data_url(out["image"]).convert("RGB")), rgb)
    assert [r["method"] for r in out["results"]] == ["sclip", "clearclip"]
    for result in out["results"]:
        assert result["ok"], result.get("error")
        overlay = decode_data_url(result["overlay"])
        assert overlay.size == (rgb.shape[1], rgb.shape[0])
        labels_png = decode_data_url(result["labels"])
        assert labels_png.mode == "P" and labels_png.size == overlay.size
        labels = np.asarray(labels_png)
        assert labels.max() < len(VOC_LABELS)  # with a background every pixel gets a class
        # legend: every class in order, its palette colour, its pixel count and share of the label map
        legend = result["legend"]
        assert [e["name"] for e in legend] == VOC_LABELS
        assert legend[4]["names"] == ["dining table", "table"]
        assert len(legend[0]["names"]) > 10  # the default stuff-word background
        counts = np.bincount(labels.ravel(), minlength=len(VOC_LABELS))
        assert [e["pixels"] for e in legend] == counts[: len(VOC_LABELS)].tolist()
        assert sum(e["fraction"] for e in legend) == pytest.approx(1.0)
        palette = np.array(labels_png.getpalette()[: 3 * len(VOC_LABELS)]).reshape(-1, 3)
        assert [e["color"] for e in legend] == ["#{:02x}{:02x}{:02x}".format(*c) for c in palette]
        # the overlay is the photo blended half-and-half with those colours
        expected = (rgb.astype(np.float32) * 0.5 + palette[labels].astype(np.float32) * 0.5).round()
        assert np.abs(np.asarray(overlay.convert("RGB")).astype(np.float32) - expected).max() <= 1
        # the sidecar is the CLI's JSON
        sidecar = result["sidecar"]
        assert sidecar["classes"] == VOC_LABELS
        assert sidecar["method"] == result["method"]
        assert sidecar["image"] == "voc.png"
        assert sidecar["pixel_fraction"] == {e["name"]: pytest.approx(e["fraction"]) for e in legend}
        assert sidecar["size"] == {"height": rgb.shape[0], "width": rgb.shape[1]}
        json.dumps(sidecar)
        assert result["seconds"] >= result["inference_seconds"] > 0
        assert result["ignored_fraction"] == 0.0
    json.dumps(out)  # the whole answer is JSON


def test_second_request_with_same_classes_runs_no_text_forward(clip, voc_png, monkeypatch):
    app = DemoApp(clip)  # the default cache folder, fresh for each test
    calls = []
    original = clip.text.encode
    monkeypatch.setattr(clip.text, "encode", lambda texts: calls.append(len(texts)) or original(texts))
    first = app.segment(voc_png, VOC_CLASSES, methods=["sclip", "clearclip"])
    assert calls, "the first request embeds the class names"
    calls.clear()
    second = app.segment(voc_png, VOC_CLASSES, methods=["sclip", "clearclip"])
    assert calls == []
    for a, b in zip(first["results"], second["results"], strict=True):
        assert a["labels"] == b["labels"]
    # the model and segmenters are reused, and a restarted demo reads the names from the disk cache
    assert app.segmenter("sclip").models.clip is clip
    DemoApp(clip).segment(voc_png, VOC_CLASSES, methods=["sclip"])
    assert calls == []


def test_no_background_marks_unconfident_pixels(app, chelsea):
    out = app.segment(png_bytes(chelsea), "cat, dog|puppy", background="false", methods=["sclip"],
                      preset="voc21")  # voc21's probability threshold leaves some pixels without a class
    result = out["results"][0]
    assert result["ok"] and result["preset"] == "voc21"
    assert [e["name"] for e in result["legend"]] == ["cat", "dog"]
    total = sum(e["fraction"] for e in result["legend"]) + result["ignored_fraction"]
    assert total == pytest.approx(1.0)
    assert result["sidecar"]["protocol"]["prob_thd"] == 0.1


def test_preset_and_pamr_toggle(app, chelsea):
    image, classes = png_bytes(chelsea[:48, :64]), "cat,wall"
    on = app.segment(image, classes, False, methods=["naclip", "sclip"], pamr="on")["results"]
    off = app.segment(image, classes, False, methods=["naclip"], pamr="off")["results"]
    default = app.segment(image, classes, False, methods=["naclip", "sclip"])["results"]
    assert [r["pamr"] for r in on] == [True, True]
    assert off[0]["pamr"] is False and off[0]["sidecar"]["protocol"]["pamr"] is False
    assert [r["pamr"] for r in default] == [True, False]  # NACLIP refines by default, SCLIP does not
    voc21 = app.segment(image, classes, False, methods=["clearclip"], preset="voc21")["results"][0]
    assert voc21["sidecar"]["preset"] == "voc21" and voc21["sidecar"]["protocol"]["logit_scale"] == 50.0


def test_a_failing_method_is_reported_in_its_own_result(app, chelsea, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(app.segmenter("clearclip").method, "dense", broken)
    out = app.segment(png_bytes(chelsea), "cat", methods=["clearclip", "sclip"])
    failed, fine = out["results"]
    assert failed == {"method": "clearclip", "ok": False, "error": "RuntimeError: out of cheese",
                      "seconds": failed["seconds"]}
    assert fine["ok"] and fine["method"] == "sclip"


@pytest.mark.parametrize(("kwargs", "status", "words"), [
    (dict(classes=""), 400, "class list is empty"),
    (dict(classes=" , ,"), 400, "class list is empty"),
    (dict(classes="cat,dog,Cat"), 400, "Duplicate class name"),
    (dict(classes="cat|kitty,kitty"), 400, "Duplicate class name"),
    (dict(classes="cat,background"), 400, "added automatically"),
    (dict(classes=",".join(f"thing{i}" for i in range(300))), 400, "too many"),
    (dict(methods=[]), 400, "at least one method"),
    (dict(methods=["sclip", "nonsense"]), 400, "Unknown method"),
    (dict(preset="kitti"), 400, "Unknown preset"),
    (dict(pamr="sometimes"), 400, "pamr"),
    (dict(background="maybe|perhaps", classes="cat"), None, None),  # explicit background names are fine
])
def test_bad_requests_get_clear_messages(app, chelsea, kwargs, status, words):
    request = dict(image_bytes=png_bytes(chelsea[:64, :64]), classes="cat", methods=["sclip"]) | kwargs
    if status is None:
        out = app.segment(**request)
        assert out["classes"] == ["background", "cat"]
        assert out["results"][0]["legend"][0]["names"] == ["maybe", "perhaps"]
        return
    with pytest.raises(DemoError, match=words) as info:
        app.segment(**request)
    assert info.value.status == status


def test_images_that_are_too_large_or_unreadable_are_refused(clip, chelsea, voc_png):
    small = DemoApp(clip, max_upload_bytes=10_000)
    with pytest.raises(DemoError, match=r"limit is 0\.0 MB|--max-upload-mb") as info:
        small.segment(voc_png, "cat")
    assert info.value.status == 413
    few_pixels = DemoApp(clip, max_pixels=100 * 100)
    with pytest.raises(DemoError, match="exceeds the limit of 10,000 pixels") as info:
        few_pixels.segment(png_bytes(chelsea), "cat")
    assert info.value.status == 413
    app = DemoApp(clip)
    not_images = (b"this is not an image", voc_png[: len(voc_png) // 2], bytes(range(256)) * 4,
                  b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b"GIF89a" + b"\xff" * 32, b"\xff\xd8\xff\xe0" + b"\0" * 64)
    for data in not_images:
        with pytest.raises(DemoError, match="Cannot read the image") as info:
            app.segment(data, "cat")
        assert info.value.status == 415
        assert not re.search(r"<[^>]*>|object at|0x[0-9a-f]{6,}", str(info.value)), str(info.value)  # no reprs
    with pytest.raises(DemoError, match="No image"):
        app.segment(b"", "cat")


def test_uploads_obey_the_demos_pixel_limit_not_pillows(clip, chelsea, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse (and warn below twice that)
    upload = png_bytes(chelsea[:64, :80])
    assert DemoApp(clip, max_pixels=64 * 80).decode_image(upload).shape == (64, 80, 3)
    with pytest.raises(DemoError, match=r"5,120 pixels\) exceeds the limit of 5,119 pixels") as info:
        DemoApp(clip, max_pixels=64 * 80 - 1).decode_image(upload)
    assert info.value.status == 413 and Image.MAX_IMAGE_PIXELS == 1000


def test_any_image_mode_is_accepted(app, chelsea):
    gray = Image.fromarray(chelsea[:64, :80]).convert("L")
    rgba = Image.fromarray(chelsea[:64, :80]).convert("RGBA")
    for image in (gray, rgba):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out = app.segment(buffer.getvalue(), "cat", methods=["sclip"])
        assert (out["width"], out["height"]) == (80, 64) and out["results"][0]["ok"]


def test_json_requests(app, voc_png):
    request = {"image": "data:image/png;base64," + base64.b64encode(voc_png).decode(), "classes": VOC_CLASSES,
               "methods": "sclip,clearclip", "background": True, "pamr": None, "filename": "C:\\photos\\voc.png"}
    out = app.handle_json(json.dumps(request).encode())
    assert [r["method"] for r in out["results"]] == ["sclip", "clearclip"]
    assert out["filename"] == "voc.png" and out["results"][0]["sidecar"]["image"] == "voc.png"
    with pytest.raises(DemoError, match="not valid base64"):
        app.handle_json(json.dumps({"image": "%%%", "classes": "cat"}).encode())
    with pytest.raises(DemoError, match="not valid JSON"):
        app.handle_json(b"{")
    with pytest.raises(DemoError, match="must be an object"):
        app.handle_json(b"[1, 2]")
    with pytest.raises(DemoError, match="No image"):
        app.handle_form({"classes": "cat", "methods": ["sclip"]})


@pytest.mark.parametrize(("field", "value", "expected", "got"), [
    ("methods", 5, "a list of method names or a comma-separated string", "a number"),
    ("methods", ["sclip", 7], "a list of method names or a comma-separated string", "a number"),
    ("methods", {"sclip": 1}, "a list of method names or a comma-separated string", "an object"),
    ("classes", 5, "a string such as 'cat, dog|puppy'", "a number"),
    ("classes", ["cat"], "a string such as 'cat, dog|puppy'", "a list"),
    ("preset", 5, "a preset name or null", "a number"),
    ("pamr", [True], "true, false or null (the method's default)", "a list"),
    ("background", 1.5, "true, false or background names such as 'sky|wall'", "a number"),
    ("image", 5, "a base64 string or a data URL", "a number"),
    ("filename", {}, "a string", "an object"),
])
def test_json_fields_of_the_wrong_type_get_clear_messages(app, field, value, expected, got):
    """Each a 400 naming the field and the type, before any work (the old server answered 500 with a TypeError)."""
    request = {"image": base64.b64encode(b"not read").decode(), "classes": "cat", "methods": ["sclip"]}
    with pytest.raises(DemoError) as info:
        app.handle_json(json.dumps(request | {field: value}).encode())
    assert str(info.value) == f"'{field}' must be {expected} (got {got})."
    assert info.value.status == 400
    assert "Error" not in str(info.value) and "object at" not in str(info.value)


def test_info_and_examples(app):
    info = app.info()
    names = [m["name"] for m in info["methods"]]
    assert {"sclip", "clearclip", "naclip"} <= set(names)
    assert info["default_methods"] == ["sclip"]
    assert "voc21" in info["presets"]
    assert info["model"]["arch"] == "tiny"
    examples = {e["name"]: e for e in app.examples()}
    assert set(examples) == {"voc", "astronaut", "chelsea", "coffee"}
    assert examples["voc"]["classes"] == VOC_CLASSES
    assert Image.open(io.BytesIO(app.example_png("chelsea"))).size == (451, 300)
    with pytest.raises(DemoError) as info:
        app.example_png("../../etc/passwd")
    assert info.value.status == 404


def test_page_is_self_contained():
    html = page_html().decode("utf-8")
    assert "<script>" in html and "<style>" in html
    assert re.findall(r"(?:https?:)?//[\w-]+(?:\.[\w-]+)+", html) == []  # no external host anywhere
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html and "@import" not in html


# --- HTTP on a real socket --------------------------------------------------------------------------------------

def start_server(app: DemoApp, read_timeout: float = 60.0) -> tuple[DemoServer, threading.Thread]:
    server = DemoServer(app, bind_socket("127.0.0.1", 0), read_timeout=read_timeout)  # listening: no wait needed
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def server(clip):
    server, thread = start_server(DemoApp(clip, max_upload_bytes=400_000))
    yield server
    server.stop()
    thread.join(30)
    assert not thread.is_alive()


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def raw_http(port: int, request: bytes, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` bytes as they are and read until the server closes the connection (a socket timeout fails
    the test if it does not). Returns (status, headers with lower-case names, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict((key.strip().lower(), value.strip()) for key, value in (line.split(":", 1) for line in lines))
    return int(status_line.split()[1]), headers, body


def post_head(length: str | int, content_type: str = "application/json", extra: str = "") -> bytes:
    return (f"POST /api/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def assert_security_headers(headers: dict) -> None:
    lower = {key.lower(): value for key, value in headers.items()}
    assert {key.lower(): value for key, value in SECURITY_HEADERS.items()}.items() <= lower.items()


def test_http_routes(server, voc_png):
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"
    status, headers, body = http(server.url)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert_security_headers(headers)
    assert "default-src 'self'" in headers["content-security-policy"]
    assert b"vocabseg" in body and body == page_html()
    status, _, body = http(server.url + "api/methods")
    assert status == 200 and json.loads(body)["max_upload_bytes"] == 400_000
    status, _, body = http(server.url + "api/examples")
    assert status == 200 and {e["name"] for e in json.loads(body)} >= {"chelsea", "voc"}
    status, headers, body = http(server.url + "api/examples/voc.png")
    assert status == 200 and headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(body)).size == (500, 375)
    status, headers, body = http(server.url + "nope")
    assert status == 404 and json.loads(body) == {"error": "no such page: /nope"}
    assert_security_headers(headers)
    status, _, body = http(server.url + "api/examples/nope.png")
    assert status == 404 and "no example" in json.loads(body)["error"]
    status, _, body = http(server.url + "api/health")
    assert (status, json.loads(body)) == (200, {"ok": True})
    status, headers, body = raw_http(server.port, b"HEAD / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert (status, body) == (200, b"") and int(headers["content-length"]) == len(page_html())
    status, _, body = http(server.url + "api/segment")
    assert status == 405 and "error" in json.loads(body)

    content_type, body = multipart([("classes", "cat,cat"), ("methods", "sclip")], [("image", "voc.png", voc_png)])
    status, _, answer = http(server.url + "api/segment", body, {"Content-Type": content_type})
    assert status == 400 and "Duplicate class name" in json.loads(answer)["error"]
    status, _, answer = http(server.url + "api/segment", b"hello", {"Content-Type": "text/plain"})
    assert status == 415 and "multipart/form-data or application/json" in json.loads(answer)["error"]


def test_multipart_and_json_requests_give_the_same_answer(server, voc_png):
    """A real multipart parser (python-multipart): repeated fields, a Windows path as file name, binary data."""
    content_type, body = multipart(
        [("classes", VOC_CLASSES), ("background", "true"), ("methods", "sclip"), ("methods", "clearclip"),
         ("preset", ""), ("pamr", "default")],
        [("image", "C:\\photos\\voc.png", voc_png)])
    status, _, answer = http(server.url + "api/segment", body, {"Content-Type": content_type})
    assert status == 200
    answer = json.loads(answer)
    assert [r["method"] for r in answer["results"]] == ["sclip", "clearclip"] and all(
        r["ok"] for r in answer["results"])
    assert answer["filename"] == "voc.png" and answer["classes"] == VOC_LABELS
    request = {"image": "data:image/png;base64," + base64.b64encode(voc_png).decode(), "classes": VOC_CLASSES,
               "methods": ["sclip", "clearclip"]}
    status, _, again = http(server.url + "api/segment", json.dumps(request).encode(),
                            {"Content-Type": "application/json"})
    assert status == 200
    assert [r["labels"] for r in json.loads(again)["results"]] == [r["labels"] for r in answer["results"]]
    # malformed forms are 400s with a message
    content_type, body = multipart([("classes", "cat")], [])
    status, _, answer = http(server.url + "api/segment", body, {"Content-Type": content_type})
    assert status == 400 and "No image" in json.loads(answer)["error"]
    content_type, body = multipart([("classes", "cat"), ("image", "not a file")], [])
    status, _, answer = http(server.url + "api/segment", body, {"Content-Type": content_type})
    assert status == 400 and json.loads(answer)["error"] == "'image' must be a file."
    status, _, answer = http(server.url + "api/segment", b"--nothing\r\n",
                             {"Content-Type": "multipart/form-data; boundary=elsewhere"})
    assert status == 400 and "multipart" in json.loads(answer)["error"].lower()


def test_http_json_type_errors_and_non_images_are_clear_400s(server):
    body = json.dumps({"methods": 5, "classes": "cat", "image": base64.b64encode(b"x").decode()}).encode()
    status, _, answer = http(server.url + "api/segment", body, {"Content-Type": "application/json"})
    assert status == 400
    assert json.loads(answer)["error"].startswith("'methods' must be a list of method names")
    body = json.dumps({"methods": "sclip", "classes": "cat", "image": base64.b64encode(b"hello").decode()}).encode()
    status, _, answer = http(server.url + "api/segment", body, {"Content-Type": "application/json"})
    assert status == 415 and "Cannot read the image" in (error := json.loads(answer)["error"])
    assert "object at" not in error and "<" not in error


@pytest.mark.parametrize(("length", "status", "words"), [
    ("-1", 400, b"Invalid HTTP request"),  # refused by uvicorn's HTTP parser
    ("1e3", 400, b"Invalid HTTP request"),
    ("400000000", 413, b"The upload is 400.0 MB; the limit is 0.4 MB"),  # refused before reading a byte
])
def test_http_content_length_refused_before_reading(server, length, status, words):
    got, headers, body = raw_http(server.port, post_head(length))  # headers only: no body follows
    assert (got, headers["connection"]) == (status, "close")
    assert words in body


def test_http_oversized_images_and_foreign_hosts(server):
    big_image = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    content_type, body = multipart([("classes", "cat"), ("methods", "sclip")],
                                   [("image", "noise.png", png_bytes(big_image))])
    status, headers, answer = http(server.url + "api/segment", body, {"Content-Type": content_type})
    assert status == 413 and "--max-upload-mb" in json.loads(answer)["error"]
    assert_security_headers(headers)
    status, headers, answer = http(server.url + "api/methods", headers={"Host": "evil.example:80"})
    assert status == 403 and json.loads(answer) == {"error": "unexpected Host header"}
    assert_security_headers(headers)
    for host in ("[::1", "localhost.evil.example", "127.0.0.2.nip.io", ""):
        request = f"GET /api/methods HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        assert raw_http(server.port, request)[0] == 403, host
    status, _, answer = http(server.url.replace("127.0.0.1", "localhost") + "api/methods")
    assert status == 200


@pytest.mark.parametrize("path", [
    "/api/examples/..%2F..%2F..%2Fetc%2Fpasswd.png", "/api/examples/%2e%2e/%2e%2e/etc/passwd.png",
    "/../../../../etc/passwd", "/index.html/../../../../etc/passwd", "/static/index.html", "/api/examples/voc.png/..",
])
def test_http_path_traversal_is_refused(server, path):
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    status, headers, body = raw_http(server.port, request)
    assert status == 404 and b"root:" not in body and "error" in json.loads(body)
    assert_security_headers(headers)


def test_http_slow_client_is_cut_off(clip):
    """A client announces 1000 bytes and sends 10: after the read timeout it gets a 408 and the connection closes."""
    server, thread = start_server(DemoApp(clip), read_timeout=0.5)
    try:
        status, headers, body = raw_http(server.port, post_head(1000) + b'{"classes"', timeout=120)
    finally:
        server.stop()
        thread.join(30)
    assert (status, headers["connection"]) == (408, "close")  # raw_http returned: the server closed it
    assert json.loads(body) == {"error": "The upload did not arrive within 0.5 s."}


def test_http_headers_that_never_finish_are_cut_off(clip):
    """Slow headers (slowloris): the connection closes ``read_timeout`` after it opened, and after an answer when
    the next request's headers do not complete; a prompt request on a fresh connection is still served."""
    server, thread = start_server(DemoApp(clip), read_timeout=1.0)  # a prompt request completes well within it
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
            assert sock.recv(65536) == b""  # closed without an answer (a hang fails by the 60 s socket timeout)
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 1")  # the next request stalls inside its headers
            while chunk := sock.recv(65536):  # the rest of the first answer, then the close
                answer += chunk
        assert answer.count(b"HTTP/1.1") == 1
    finally:
        server.stop()
        thread.join(30)


MULTIPART_HEAD = (b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
                  b"Content-Type: image/png\r\n\r\n")


@pytest.mark.parametrize(("content_type", "first"), [
    ("application/json", b'{"image": "'), ("multipart/form-data; boundary=b0undary", MULTIPART_HEAD)])
def test_a_body_over_the_limit_is_refused_while_reading(clip, content_type, first):
    """A chunked upload without Content-Length: refused (413) as soon as the bytes read pass the limit, the rest of
    the 100 chunks left unread (the ASGI app called directly, counting the chunks it asks for)."""
    demo = DemoApp(clip, max_upload_bytes=300_000)
    chunk = 65_536
    asked = 0

    async def receive():
        nonlocal asked
        asked += 1
        return {"type": "http.request", "body": first if asked == 1 else b"A" * chunk, "more_body": asked < 100}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/segment", "raw_path": b"/api/segment", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", content_type.encode()),
                         (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    asyncio.run(create_asgi_app(demo)(scope, receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"].startswith("The upload is larger than the limit of 0.3 MB")
    assert asked == 1 + (demo.max_body_bytes - len(first)) // chunk + 1  # the first chunk past the limit is the last


# --- the command ------------------------------------------------------------------------------------------------

def test_demo_command_line(monkeypatch, capsys, caplog, tiny_weights, tmp_path):
    from vocabseg import cli

    args = cli.build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.weights, args.max_upload_mb, args.read_timeout) == (
        "127.0.0.1", 7860, None, 20.0, 60.0)

    # missing weights: a clear message at start, no server
    with caplog.at_level(logging.ERROR):
        assert cli.main(["demo", "--weights", str(tmp_path / "missing.pt"), "--port", "0"]) == 2
    assert "Weights file not found" in caplog.text

    # port 0 picks a free port on 127.0.0.1, the URL is printed, Ctrl-C stops cleanly
    served = {}

    def fake_serve(self):
        served["url"], served["address"] = self.url, self.socket.getsockname()[0]
        raise KeyboardInterrupt

    monkeypatch.setattr(DemoServer, "serve", fake_serve)
    assert cli.main(["demo", "--weights", str(tiny_weights), "--port", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert served["url"] in out and re.search(r"http://127\.0\.0\.1:\d+/", out) and "stopped" in out
    assert not served["url"].endswith(":0/") and served["address"] == "127.0.0.1"

    # binding beyond this machine warns
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli.main(["demo", "--weights", str(tiny_weights), "--port", "0", "--host", "0.0.0.0"]) == 0
    assert "reachable from other machines" in caplog.text and served["address"] == "0.0.0.0"

    for flag in ("--read-timeout", "--max-upload-mb"):
        caplog.clear()
        assert cli.main(["demo", "--weights", str(tiny_weights), "--port", "0", flag, "0"]) == 2
        assert f"{flag} must be positive" in caplog.text


def test_a_busy_port_is_reported_at_once(monkeypatch, caplog, tmp_path):
    """One line, exit code 2, before the weights load (so a missing weights file is not what it complains about)."""
    from vocabseg import cli

    loaded = []
    monkeypatch.setattr(DemoApp, "from_weights", classmethod(lambda cls, *args, **kwargs: loaded.append(args)))
    with socket.create_server(("127.0.0.1", 0)) as busy, caplog.at_level(logging.INFO):
        port = busy.getsockname()[1]
        assert cli.main(["demo", "--weights", str(tmp_path / "missing.pt"), "--port", str(port)]) == 2
    assert loaded == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == [
        f"cannot listen on 127.0.0.1:{port}: Address already in use (is another demo running? --port 0 picks a "
        "free port)"]


def test_server_libraries_are_imported_only_when_the_demo_starts(tmp_path):
    from demo_process import demo_env

    code = ("import sys, vocabseg.cli, vocabseg.cli.demo, vocabseg.demo.web; vocabseg.cli.build_parser(); "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'multipart', 'python_multipart') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=demo_env(tmp_path)).stdout
    assert out.strip() == "[]"


def test_sigterm_stops_the_demo_gracefully(tiny_weights, tmp_path, chelsea):
    """SIGTERM while a request is in flight: new connections are refused, the request still gets its answer, then
    the command prints that it stopped and exits 0."""
    from demo_process import DemoProcess, demo_env

    demo = DemoProcess(["demo", "--weights", str(tiny_weights), "--port", "0", "--device", "cpu"], demo_env(tmp_path))
    try:
        port = int(demo.wait_for_url().rsplit(":", 1)[1].strip("/"))
        body = json.dumps({"image": base64.b64encode(png_bytes(chelsea[:64, :96])).decode(), "classes": "cat",
                           "methods": "sclip"}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            sock.sendall(post_head(len(body), extra="Expect: 100-continue\r\n"))
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")  # the endpoint is reading the body
            demo.process.send_signal(signal.SIGTERM)
            for _ in range(600):  # until the listening socket is closed
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                except ConnectionRefusedError:
                    break
                threading.Event().wait(0.1)
            else:
                raise AssertionError("the demo still accepts connections after SIGTERM")
            sock.sendall(body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["results"][0]["ok"]
        assert demo.process.wait(120) == 0, demo.output
    finally:
        demo.stop(signal.SIGKILL)
    assert "vocabseg demo: stopped" in demo.output and "Traceback" not in demo.output
