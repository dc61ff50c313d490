"""HealthServer over real sockets: urllib for the happy paths, raw streams for the odd ones."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from esper.core.errors import EsperError
from esper.core.health_server import HealthServer


class Probe:
    def __init__(self) -> None:
        self.healthy = True
        self.fail = False

    def __call__(self) -> tuple[bool, Mapping[str, object]]:
        if self.fail:
            raise RuntimeError("probe broke")
        return self.healthy, {"service": "oona", "lag": 3}


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(probe: Probe) -> AsyncIterator[HealthServer]:
    registry = CollectorRegistry()
    Counter("esper_test_messages", "Messages seen by the test.", registry=registry).inc(3)
    health = HealthServer(registry, probe, read_timeout_s=0.2)
    await health.start()
    try:
        yield health
    finally:
        await health.stop()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


async def get(server: HealthServer, path: str) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}{path}")


async def raw(server: HealthServer, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_metrics(server: HealthServer) -> None:
    assert server.port > 0
    status, content_type, body = await get(server, "/metrics")
    assert status == 200
    assert content_type == CONTENT_TYPE_LATEST
    assert b"esper_test_messages_total 3.0" in body


async def test_healthz_ok_and_unhealthy(server: HealthServer, probe: Probe) -> None:
    status, content_type, body = await get(server, "/healthz?verbose=1")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"healthy": True, "service": "oona", "lag": 3}
    probe.healthy = False
    status, _, body = await get(server, "/healthz")
    assert status == 503
    assert json.loads(body)["healthy"] is False


async def test_healthz_probe_exception_is_503(server: HealthServer, probe: Probe) -> None:
    probe.fail = True
    status, _, body = await get(server, "/healthz")
    assert status == 503
    assert "probe broke" in json.loads(body)["error"]


async def test_unknown_path_is_404(server: HealthServer) -> None:
    status, _, _ = await get(server, "/admin")
    assert status == 404


@pytest.mark.parametrize(
    ("request_bytes", "status_line"),
    [
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 405 "),
        (b"garbage\r\n\r\n", b"HTTP/1.1 400 "),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n", b"HTTP/1.1 431 "),
    ],
    ids=["post", "malformed", "oversize"],
)
async def test_rejects_odd_requests(server: HealthServer, request_bytes: bytes, status_line: bytes) -> None:
    response = await raw(server, request_bytes)
    assert response.startswith(status_line)
    assert b"Connection: close" in response


async def test_one_request_per_connection(server: HealthServer) -> None:
    response = await raw(server, b"GET /healthz HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n")
    assert response.count(b"HTTP/1.1 ") == 1


async def test_silent_client_is_dropped_after_read_timeout(server: HealthServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_stop_closes_idle_connections_and_is_idempotent(probe: Probe) -> None:
    health = HealthServer(CollectorRegistry(), probe, read_timeout_s=60)
    await health.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
    await asyncio.sleep(0.01)  # let the server accept the connection
    async with asyncio.timeout(5):
        await health.stop()
        assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    await health.stop()
    with pytest.raises(EsperError):
        _ = health.port


async def test_extra_routes(probe: Probe) -> None:
    calls: list[int] = []

    def alerts() -> tuple[int, str, bytes]:
        calls.append(1)
        return 200, "application/json", b'[{"alert": "x"}]'

    def broken() -> tuple[int, str, bytes]:
        raise RuntimeError("route broke")

    health = HealthServer(CollectorRegistry(), probe, routes={"/alerts": alerts, "/broken": broken})
    await health.start()
    try:
        status, content_type, body = await get(health, "/alerts?x=1")
        assert (status, content_type, json.loads(body)) == (200, "application/json", [{"alert": "x"}])
        assert calls == [1]
        status, _, _ = await get(health, "/broken")
        assert status == 500
        status, _, body = await get(health, "/healthz")
        assert status == 200 and json.loads(body)["healthy"] is True
    finally:
        await health.stop()


def test_extra_routes_cannot_replace_builtins(probe: Probe) -> None:
    with pytest.raises(ValueError, match="metrics"):
        HealthServer(CollectorRegistry(), probe, routes={"/metrics": lambda: (200, "text/plain", b"")})
