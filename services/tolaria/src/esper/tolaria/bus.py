"""The trainer's side of the bus: an event loop in a background thread that owns the Oona client.

Why a thread: training steps are long, GIL-holding Python + torch calls. If they ran on the event
loop, a Tamiyo reply that arrives mid-step would wait for the step to end and count as a timeout even
though it came on time. Here the loop reads replies as they land; the training thread never awaits,
it submits coroutines and looks at their futures at step boundaries (`concurrent.futures.Future`).
`sys.setswitchinterval` is lowered so the loop thread gets the GIL within a fraction of a decision
budget while a step computes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from esper.core.logging import get_logger
from esper.core.telemetry import packet_priority
from esper.leyline import pb
from esper.oona import OonaClient, OonaMetrics, OonaSettings, PublishError

log = get_logger("esper.tolaria.bus")

T = TypeVar("T")
SWITCH_INTERVAL_S = 0.0005  # GIL hand-off period (CPython default 5 ms: a whole decision budget)


class BusThread:
    """Runs `client` on a private uvloop loop in a daemon thread; thread-safe submit/call."""

    def __init__(self, settings: OonaSettings, *, sender: str = "tolaria",
                 registry: CollectorRegistry | None = None) -> None:
        # The trainer's registry, so its side of the decision request/reply (oona_request_seconds,
        # timeouts, publish errors) is on the trainer's /metrics.
        self.client = OonaClient.from_settings(settings, sender=sender,
                                               metrics=OonaMetrics(registry) if registry is not None else None)
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tolaria-bus", daemon=True)
        self._background: set[concurrent.futures.Future[Any]] = set()
        self.telemetry_dropped = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the loop and connect; TimeoutError (the connect attempt cancelled) if Redis stays away."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()
        connecting = self.submit(self.client.connect())
        try:
            connecting.result(timeout_s)
        except TimeoutError:
            connecting.cancel()  # connect() retries for ever: not a task left pending on the stopped loop
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        return self.submit(coro).result(timeout_s)

    def publish_soon(self, channel: str, message: Message, *,
                     priority: pb.MessagePriority.ValueType = pb.MESSAGE_PRIORITY_NORMAL) -> None:
        """Fire and forget (telemetry): a refusal is counted and logged, never raised into training."""
        fut = self.submit(self.client.publish(channel, message, priority=priority))
        self._background.add(fut)
        fut.add_done_callback(self._published)

    def publish_telemetry(self, packet: pb.TelemetryPacket) -> None:
        self.publish_soon("telemetry", packet, priority=packet_priority(packet))  # type: ignore[arg-type]

    def _published(self, fut: concurrent.futures.Future[Any]) -> None:
        self._background.discard(fut)
        exc = fut.exception() if not fut.cancelled() else None
        if exc is not None:
            self.telemetry_dropped += 1
            level = "warning" if isinstance(exc, PublishError) else "error"
            getattr(log, level)("publish from the trainer failed", error=repr(exc))

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        for fut in list(self._background):
            with contextlib.suppress(Exception):  # already counted in _published
                fut.result(timeout_s)
        try:
            self.call(self.client.close(), timeout_s)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)
