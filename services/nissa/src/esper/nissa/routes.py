"""``/alerts``: the firing alerts as JSON, for operators and drills (Prometheus scrapes /metrics)."""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus

from esper.core.health_server import Response
from esper.nissa.alerts import AlertEngine


def alerts_body(engine: AlertEngine) -> bytes:
    """A JSON list, oldest first: alert, severity, routes, since_ms, fired_at_ms, value, condition, …"""
    return json.dumps([a.as_dict() for a in engine.active()], allow_nan=False).encode()


def alerts_route(engine: AlertEngine) -> Callable[[], Response]:
    def route() -> Response:
        return HTTPStatus.OK, "application/json", alerts_body(engine)

    return route
