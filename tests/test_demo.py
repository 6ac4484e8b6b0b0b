"""The demo's request handler (no socket), its HTTP routes on a real localhost socket, and the CLI entry."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from vocabseg.demo.server import DemoApp, DemoError, DemoServer, page_html

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
    for data in (b"this is not an image", voc_png[: len(voc_png) // 2]):
        with pytest.raises(DemoError, match="Cannot read the image") as info:
            app.segment(data, "cat")
        assert info.value.status == 415
    with pytest.raises(DemoError, match="No image"):
        app.segment(b"", "cat")


def test_any_image_mode_is_accepted(app, chelsea):
    gray = Image.fromarray(chelsea[:64, :80]).convert("L")
    rgba = Image.fromarray(chelsea[:64, :80]).convert("RGBA")
    for image in (gray, rgba):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out = app.segment(buffer.getvalue(), "cat", methods=["sclip"])
        assert (out["width"], out["height"]) == (80, 64) and out["results"][0]["ok"]


def test_multipart_and_json_requests(app, voc_png):
    content_type, body = multipart(
        [("classes", VOC_CLASSES), ("background", "true"), ("methods", "sclip"), ("methods", "clearclip"),
         ("preset", ""), ("pamr", "default")],
        [("image", "C:\\photos\\voc.png", voc_png)])
    out = app.handle_segment(content_type, body)
    assert [r["method"] for r in out["results"]] == ["sclip", "clearclip"]
    assert out["filename"] == "voc.png" and out["results"][0]["sidecar"]["image"] == "voc.png"
    request = {"image": "data:image/png;base64," + base64.b64encode(voc_png).decode(), "classes": VOC_CLASSES,
               "methods": "sclip,clearclip", "background": True, "pamr": None}
    again = app.handle_segment("application/json", json.dumps(request).encode())
    assert [r["labels"] for r in again["results"]] == [r["labels"] for r in out["results"]]
    with pytest.raises(DemoError, match="multipart/form-data or application/json") as info:
        app.handle_segment("text/plain", b"hello")
    assert info.value.status == 415
    with pytest.raises(DemoError, match="not valid base64"):
        app.handle_segment("application/json", json.dumps({"image": "%%%", "classes": "cat"}).encode())
    with pytest.raises(DemoError, match="not valid JSON"):
        app.handle_segment("application/json", b"{")
    content_type, body = multipart([("classes", "cat")], [])
    with pytest.raises(DemoError, match="No image"):
        app.handle_segment(content_type, body)


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

@pytest.fixture
def server(clip):
    app = DemoApp(clip, max_upload_bytes=400_000)
    server = DemoServer(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_http_routes(server, voc_png):
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"
    status, headers, body = http(server.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b"vocabseg" in body
    status, _, body = http(server.url + "api/methods")
    assert status == 200 and json.loads(body)["max_upload_bytes"] == 400_000
    status, _, body = http(server.url + "api/examples")
    assert status == 200 and {e["name"] for e in json.loads(body)} >= {"chelsea", "voc"}
    status, headers, body = http(server.url + "api/examples/voc.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    status, _, body = http(server.url + "nope")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = http(server.url + "api/examples/nope.png")
    assert status == 404 and "no example" in json.loads(body)["error"]

    content_type, body = multipart([("classes", "person,chair"), ("methods", "sclip")],
                                   [("image", "voc.png", voc_png)])
    status, _, answer = http(server.url + "api/segment", body, {"Content-Type": content_type})
    assert status == 200
    answer = json.loads(answer)
    assert answer["results"][0]["ok"] and answer["classes"] == ["background", "person", "chair"]

    content_type, body = multipart([("classes", "cat,cat"), ("methods", "sclip")], [("image", "voc.png", voc_png)])
    status, _, answer = http(server.url + "api/segment", body, {"Content-Type": content_type})
    assert status == 400 and "Duplicate class name" in json.loads(answer)["error"]


def test_http_refuses_oversized_bodies_and_foreign_hosts(server):
    huge = b"x" * 2_000_000  # over max_upload_bytes * 4/3 + 1 MB
    status, _, answer = http(server.url + "api/segment", huge, {"Content-Type": "application/octet-stream"})
    assert status == 413 and "the limit is 0.4 MB" in json.loads(answer)["error"]
    big_image = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    content_type, body = multipart([("classes", "cat"), ("methods", "sclip")],
                                   [("image", "noise.png", png_bytes(big_image))])
    status, _, answer = http(server.url + "api/segment", body, {"Content-Type": content_type})
    assert status == 413 and "--max-upload-mb" in json.loads(answer)["error"]
    status, _, answer = http(server.url + "api/methods", headers={"Host": "evil.example:80"})
    assert status == 403
    status, _, answer = http(server.url.replace("127.0.0.1", "localhost") + "api/methods")
    assert status == 200


# --- the command ------------------------------------------------------------------------------------------------

def test_demo_command_line(monkeypatch, capsys, caplog, tiny_weights, tmp_path):
    from vocabseg import cli
    from vocabseg.demo import server as demo_server

    args = cli.build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.weights, args.max_upload_mb) == ("127.0.0.1", 7860, None, 20.0)

    # missing weights: a clear message at start, no server
    with caplog.at_level(logging.ERROR):
        assert cli.main(["demo", "--weights", str(tmp_path / "missing.pt"), "--port", "0"]) == 2
    assert "Weights file not found" in caplog.text

    # port 0 picks a free port, the URL is printed, Ctrl-C stops cleanly
    served = {}

    def fake_serve(self, poll_interval=0.5):
        served["url"] = self.url
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_server.DemoServer, "serve_forever", fake_serve)
    assert cli.main(["demo", "--weights", str(tiny_weights), "--port", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert served["url"] in out and re.search(r"http://127\.0\.0\.1:\d+/", out) and "stopped" in out
    assert not served["url"].endswith(":0/")

    # binding beyond this machine warns
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli.main(["demo", "--weights", str(tiny_weights), "--port", "0", "--host", "0.0.0.0"]) == 0
    assert "reachable from other machines" in caplog.text
