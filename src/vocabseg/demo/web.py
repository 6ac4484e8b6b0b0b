"""HTTP for ``vocabseg demo``: :class:`~vocabseg.demo.server.DemoApp` served by Starlette on uvicorn.

Imported only when the demo starts, so Starlette and uvicorn stay out of ``vocabseg --help``. What the server
guarantees:

* A request body is refused (413) from its ``Content-Length`` before any of it is read, or as soon as the bytes
  read pass ``DemoApp.max_body_bytes`` (chunked uploads); a ``Content-Length`` that is not a number (``-1``) is
  refused (400) by uvicorn's HTTP parser. A body that has not fully arrived ``read_timeout`` seconds after the
  request reached the endpoint is refused (408). Error answers to an upload close the connection. A connection
  whose request line and headers are not complete ``read_timeout`` seconds after it opened (or after its previous
  answer) is closed.
* ``multipart/form-data`` is parsed by python-multipart (one file, a bounded number of fields).
* On a loopback address only requests whose ``Host`` names this machine are answered (no DNS rebinding).
* Every answer carries the Content-Security-Policy and the other :data:`SECURITY_HEADERS`.
* SIGINT (Ctrl-C) and SIGTERM stop the server gracefully: no new connections, requests in flight finish.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import signal
import socket
import time
from http import HTTPStatus
from importlib import resources
from urllib.parse import urlsplit

from vocabseg.demo.server import DemoApp, DemoError, to_json
from vocabseg.errors import UsageError

log = logging.getLogger("vocabseg.demo")

#: Seconds a request body may take to arrive in full.
DEFAULT_READ_TIMEOUT = 60.0
#: Text fields a multipart form may have (``methods`` repeats once per method).
MAX_FORM_FIELDS = 64
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
JSON_MEDIA_TYPE = "application/json; charset=utf-8"

SECURITY_HEADERS = {
    # The page may load nothing from anywhere but this server (and inline/data: content).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self' 'unsafe-inline'; connect-src 'self'; font-src 'none'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def page_html() -> bytes:
    return resources.files("vocabseg.demo").joinpath("static/index.html").read_bytes()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_is_local(host_header: str) -> bool:
    """Whether a ``Host`` header names this machine (``localhost``, ``*.localhost``, a loopback address)."""
    try:
        host = urlsplit(f"//{host_header}").hostname or ""
    except ValueError:  # "[::1", a port that is not a number ...
        return False
    return host in LOOPBACK_NAMES or host.endswith(".localhost")


# --- the ASGI application ---------------------------------------------------------------------------------------

def error_response(status: int, message: str, close: bool = False):
    """``{"error": message}`` with ``status``; ``close`` ends the connection (an upload may be left unread)."""
    from starlette.responses import Response

    return Response(to_json({"error": message}), int(status), headers={"Connection": "close"} if close else None,
                    media_type=JSON_MEDIA_TYPE)


def json_response(data):
    from starlette.responses import Response

    return Response(to_json(data), media_type=JSON_MEDIA_TYPE)


class SecurityMiddleware:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every answer; with ``loopback``, 403 for a foreign ``Host``."""

    def __init__(self, app, loopback: bool):
        self.app = app
        self.loopback = loopback
        self.headers = [(key.lower().encode("latin-1"), value.encode("latin-1"))
                        for key, value in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        from starlette.datastructures import Headers

        if self.loopback and not host_is_local(Headers(scope=scope).get("host", "")):
            response = error_response(HTTPStatus.FORBIDDEN, "unexpected Host header", close=True)
            return await response(scope, receive, send_with_headers)
        return await self.app(scope, receive, send_with_headers)


def bounded_request(request, demo: DemoApp, timeout: float):
    """``request`` whose body is refused past ``demo.max_body_bytes`` (413: by its Content-Length before reading,
    else as soon as the bytes read pass it) or when it has not arrived ``timeout`` seconds from now (408)."""
    from starlette.requests import Request

    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise DemoError("Content-Length must be a number of bytes.")
        if int(declared) > demo.max_body_bytes:
            raise demo.upload_too_large(int(declared))
    deadline = time.monotonic() + timeout
    received = 0

    async def receive():
        nonlocal received
        try:
            message = await asyncio.wait_for(request.receive(), deadline - time.monotonic())
        except TimeoutError as exc:
            raise DemoError(f"The upload did not arrive within {timeout:g} s.", HTTPStatus.REQUEST_TIMEOUT) from exc
        received += len(message.get("body", b""))
        if received > demo.max_body_bytes:
            raise demo.upload_too_large()
        return message

    return Request(request.scope, receive)


async def form_fields(form) -> dict:
    """A parsed multipart form -> the dict :meth:`DemoApp.handle_form` takes (``image`` bytes, ``methods`` a list)."""
    fields: dict = {"methods": []}
    for key, value in form.multi_items():
        is_file = not isinstance(value, str)
        if key == "image":
            if not is_file:
                raise DemoError("'image' must be a file.")
            fields["image"], fields["filename"] = await value.read(), value.filename
        elif is_file:
            raise DemoError(f"'{key}' must be a text field, not a file.")
        elif key == "methods":
            fields["methods"].append(value)
        else:
            fields[key] = value
    return fields


def create_asgi_app(demo: DemoApp, *, loopback: bool = True, read_timeout: float = DEFAULT_READ_TIMEOUT):
    """The demo's routes (the page, the JSON API) as an ASGI application."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response
    from starlette.routing import Route

    def page(request):
        return Response(page_html(), media_type="text/html; charset=utf-8")

    def example(request):
        return Response(demo.example_png(request.path_params["name"]), media_type="image/png")

    async def segment(request):
        request = bounded_request(request, demo, read_timeout)
        mime = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        try:
            if mime == "application/json":
                body = await request.body()
                return json_response(await run_in_threadpool(demo.handle_json, body))
            if mime == "multipart/form-data":
                async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS) as form:
                    fields = await form_fields(form)
                return json_response(await run_in_threadpool(demo.handle_form, fields))
        except ClientDisconnect as exc:
            raise DemoError("The connection closed before the upload arrived.") from exc
        raise DemoError("Send the request as multipart/form-data or application/json.",
                        HTTPStatus.UNSUPPORTED_MEDIA_TYPE)

    def on_demo_error(request, exc: DemoError):
        return error_response(exc.status, str(exc), close=request.method == "POST")

    def on_http_error(request, exc: HTTPException):
        message = f"no such page: {request.url.path}" if exc.status_code == HTTPStatus.NOT_FOUND else exc.detail
        return error_response(exc.status_code, message, close=request.method == "POST")

    def on_internal_error(request, exc: Exception):  # a bug: uvicorn logs the traceback
        return error_response(HTTPStatus.INTERNAL_SERVER_ERROR,
                              f"internal error ({type(exc).__name__}); the demo's log has the details", close=True)

    routes = [
        Route("/", page),
        Route("/index.html", page),
        Route("/api/methods", lambda request: json_response(demo.info())),
        Route("/api/examples", lambda request: json_response(demo.examples())),
        Route("/api/examples/{name}.png", example),
        Route("/api/health", lambda request: json_response({"ok": True})),
        Route("/api/segment", segment, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        DemoError: on_demo_error, HTTPException: on_http_error, Exception: on_internal_error})
    return SecurityMiddleware(app, loopback)


# --- the server -------------------------------------------------------------------------------------------------

def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) (port 0: a free one); an unusable address is a :class:`UsageError`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if os.name == "posix":  # a restart may reuse the port at once (elsewhere the option lets others take it)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()
    except OSError as exc:
        sock.close()
        hint = "is another demo running? --port 0 picks a free port" if exc.errno == errno.EADDRINUSE else (
            "check --host and --port")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise UsageError(f"cannot listen on {address}: {exc.strerror or exc} ({hint})") from exc
    return sock


def header_deadline_protocol(timeout: float):
    """uvicorn's h11 protocol, closing a connection whose next request's headers are not complete ``timeout``
    seconds after it opened or after its previous answer (uvicorn itself waits for headers for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_deadline = self._new_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_deadline.cancel()
            self._header_deadline = self._new_header_deadline()

        def connection_lost(self, exc) -> None:
            self._header_deadline.cancel()
            super().connection_lost(exc)

        def _new_header_deadline(self):
            return self.loop.call_later(timeout, self._close_if_no_request_since, self.cycle)

        def _close_if_no_request_since(self, cycle) -> None:
            if self.cycle is cycle and not self.transport.is_closing():  # complete headers start a new cycle
                self.transport.close()

    return HeaderDeadline


class DemoServer:
    """uvicorn serving a :class:`DemoApp` on a socket from :func:`bind_socket`."""

    def __init__(self, app: DemoApp, sock: socket.socket, read_timeout: float = DEFAULT_READ_TIMEOUT):
        import uvicorn

        self.app = app
        self.socket = sock
        self.host = sock.getsockname()[0]
        self.loopback = is_loopback(self.host)
        asgi = create_asgi_app(app, loopback=self.loopback, read_timeout=read_timeout)
        config = uvicorn.Config(asgi, http=header_deadline_protocol(read_timeout), ws="none", lifespan="off",
                                log_config=None, log_level="warning", access_log=False)
        self.uvicorn = uvicorn.Server(config)

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def serve(self) -> None:
        """Serve until :meth:`stop` or (in the main thread) SIGINT or SIGTERM; requests in flight finish first."""
        self.uvicorn.run(sockets=[self.socket])

    def stop(self) -> None:
        self.uvicorn.should_exit = True


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_until_stopped(server: DemoServer) -> None:
    """Serve until Ctrl-C or SIGTERM. uvicorn shuts down gracefully on either, then raises the signal again for the
    previous handler: Python's turns SIGINT into KeyboardInterrupt, and the one installed here does so for SIGTERM."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(host: str = "127.0.0.1", port: int = 7860, weights: str | None = None, arch: str | None = None,
             device: str | None = None, max_upload_mb: float = 20.0, max_pixels: int | None = None,
             text_cache: bool = True, models: dict | None = None, method_options: dict | None = None,
             read_timeout: float = DEFAULT_READ_TIMEOUT) -> int:
    """Bind the port, load the model, serve the page until Ctrl-C or SIGTERM.

    A busy port or missing weights raise :class:`UsageError` / ``WeightsError`` before any serving, the port first.
    """
    if max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    if read_timeout <= 0:
        raise UsageError("--read-timeout must be positive")
    with bind_socket(host, port) as sock:
        log.info("loading %s weights ...", weights or "the default CLIP")
        app = DemoApp.from_weights(weights, arch, device, max_upload_bytes=int(max_upload_mb * 1e6),
                                   max_pixels=max_pixels, text_cache=text_cache, models=models,
                                   method_options=method_options)
        server = DemoServer(app, sock, read_timeout)
        if not server.loopback:
            log.warning("listening on %s: the demo is reachable from other machines and has no authentication", host)
        print(f"vocabseg demo: {server.url}  (model {app.clip.name} on {app.device}; Ctrl-C to stop)", flush=True)
        serve_until_stopped(server)
    print("vocabseg demo: stopped", flush=True)
    return 0
