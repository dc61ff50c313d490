"""Client side of `HealthServer`: GET a process's `/healthz` or `/metrics` on loopback.

For the supervisor and the drills, which watch real processes through the same endpoints Prometheus
and compose healthchecks use. One request per connection, bounded by a timeout; never raises for an
unreachable process (`None`), so callers poll without try/except.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["http_get", "metric_total", "scrape_total"]


async def http_get(port: int, path: str, *, host: str = "127.0.0.1",
                   timeout_s: float = 5.0) -> tuple[int, bytes] | None:
    """(status, body) of `GET path`; None when nothing answers in time or the answer is not HTTP."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                raw = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        return None


def metric_total(text: str, name: str) -> float:
    """Sum of every sample of metric `name` (all label sets) in Prometheus text format."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def scrape_total(port: int, name: str) -> float:
    """`metric_total` of a process's /metrics; NaN when it does not answer."""
    answer = await http_get(port, "/metrics")
    if answer is None or answer[0] != 200:
        return float("nan")
    return metric_total(answer[1].decode(errors="replace"), name)
