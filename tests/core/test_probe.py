"""The probe client against a real HealthServer: status and body, metric sums, unreachable ports."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter

from esper.core.health_server import HealthServer
from esper.core.probe import http_get, metric_total, scrape_total
from esper.core.redis_server import free_port


def test_metric_total_sums_label_sets_and_ignores_lookalikes() -> None:
    text = ("# HELP x_total things\n# TYPE x_total counter\nx_total{kind=\"a\"} 2.0\nx_total{kind=\"b\"} 3.0\n"
            "x_total_extra 100.0\nx_created 7.0\n")
    assert metric_total(text, "x_total") == 5.0
    assert metric_total(text, "y_total") == 0.0


async def test_http_get_and_scrape_a_live_server() -> None:
    registry = CollectorRegistry()
    Counter("probe_hits", "hits", ["kind"], registry=registry).labels("a").inc(4)
    server = HealthServer(registry, lambda: (False, {"why": "test"}))
    await server.start()
    try:
        health = await http_get(server.port, "/healthz")
        assert health is not None and health[0] == 503 and b'"why": "test"' in health[1]
        assert await scrape_total(server.port, "probe_hits_total") == 4.0
    finally:
        await server.stop()


async def test_unreachable_is_none_and_nan() -> None:
    port = free_port()
    assert await http_get(port, "/healthz", timeout_s=1.0) is None
    assert math.isnan(await scrape_total(port, "anything"))
