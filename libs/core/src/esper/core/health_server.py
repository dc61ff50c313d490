"""A tiny HTTP/1.1 server for ``/metrics``, ``/healthz`` and a service's few extra GET routes.

Written on ``asyncio.start_server`` rather than an ASGI framework: every slim process (oona, tamiyo
workers, nissa) needs only two GET routes for Prometheus and health probes, and pulling an ASGI
stack plus a server into each of them would cost start-up time, memory and dependencies for nothing.
It speaks just enough HTTP: GET only, one request per connection, bounded head size and read time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from esper.core.errors import EsperError
from esper.core.logging import get_logger

__all__ = ["HealthCheck", "HealthServer", "Response", "Route"]

HealthCheck = Callable[[], tuple[bool, Mapping[str, object]]]
"""Returns ``(healthy, details)``; details are served as JSON on ``/healthz``."""

MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 5.0
_JSON = "application/json"

_log = get_logger(__name__)

Response = tuple[int, str, bytes]
"""``(status, content type, body)``."""

Route = Callable[[], Response]
"""An extra GET route (e.g. Nissa's ``/alerts``): called per request, must not block."""


class HealthServer:
    """Serves ``/metrics`` from a ``CollectorRegistry``, ``/healthz`` from a health callback, and any
    extra ``routes`` (exact paths, query ignored; they cannot replace the two built-in ones)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthCheck,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        read_timeout_s: float = READ_TIMEOUT_S,
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        self._registry = registry
        self._routes = dict(routes or {})
        if self._routes.keys() & {"/metrics", "/healthz"}:
            raise ValueError("extra routes cannot replace /metrics or /healthz")
        self._health = health
        self._host = host
        self._requested_port = port
        self._read_timeout_s = read_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (useful when constructed with ``port=0``)."""
        if self._server is None or not self._server.sockets:
            raise EsperError("HealthServer is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._handle, self._host, self._requested_port, limit=MAX_HEAD_BYTES)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            response = await self._read_and_route(reader)
            if response is not None:
                writer.write(_encode(*response))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _read_and_route(self, reader: asyncio.StreamReader) -> Response | None:
        try:
            async with asyncio.timeout(self._read_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        except (TimeoutError, asyncio.IncompleteReadError):
            return None  # slow or vanished client: nothing useful to answer
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _text(HTTPStatus.BAD_REQUEST)
        method, target, _version = parts
        if method != "GET":
            return _text(HTTPStatus.METHOD_NOT_ALLOWED)
        try:
            return self._route(target.split("?", 1)[0])
        except Exception:
            _log.exception("health server route failed", target=target)
            return _text(HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self, path: str) -> Response:
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return self._healthz()
        route = self._routes.get(path)
        if route is not None:
            return route()
        return _text(HTTPStatus.NOT_FOUND)

    def _healthz(self) -> Response:
        try:
            healthy, details = self._health()
        except Exception as exc:  # a failing probe is an unhealthy process, not a broken server
            healthy, details = False, {"error": repr(exc)}
        status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
        body = json.dumps({"healthy": healthy, **details}, default=str).encode()
        return status, _JSON, body


def _text(status: HTTPStatus) -> Response:
    return status, "text/plain; charset=utf-8", f"{status.value} {status.phrase}\n".encode()


def _encode(status: int, content_type: str, body: bytes) -> bytes:
    phrase = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
