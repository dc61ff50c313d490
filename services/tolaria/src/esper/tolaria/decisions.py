"""Asking Tamiyo for a decision without ever stalling the step (ARCHITECTURE §5).

Pipelined (default): the packet for step k goes out, step k+1 starts at once, and the reply is taken
at the first boundary after it arrived, unless it is older than `max_staleness_steps`. At most one
request is in flight: a boundary that finds the previous one still pending sends nothing (counted).
Sync: the trainer waits up to the budget. Either way a timeout is an explicit, counted outcome.
The trainer takes a finished request before it sends the next one, so the decision breaker
(`conservative.py`) knows every outcome before the next packet goes.
"""

from __future__ import annotations

import concurrent.futures
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from esper.core.logging import get_logger
from esper.core.telemetry import build_event, build_telemetry_packet
from esper.leyline import LeylineError, enum_name, pb
from esper.oona import OonaClient, OonaError
from esper.oona.errors import RequestTimeoutError
from esper.tolaria.bus import BusThread

log = get_logger("esper.tolaria.decisions")

Kind = Literal["command", "failure", "timeout", "error"]
TimeoutEvent = Literal["", "published", "rate_limited"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What came back for the packet of `step`."""

    step: int
    packet_id: str
    kind: Kind
    latency_ms: float
    command: pb.AdaptationCommand | None = None
    failure: pb.DecisionFailure | None = None
    detail: str = ""
    # A timeout's `tamiyo_timeout` event, where the sidecar handled it: "published", or "rate_limited"
    # (refused by the emergency lane's cap: counted, not sent). "": the trainer publishes it.
    timeout_event: TimeoutEvent = ""


class OneInFlight(ABC):
    """The request discipline both transports share: at most one request in flight; a boundary that
    finds it pending sends nothing (counted); a reply that finished before the boundary that would
    have polled it is kept for the next poll, so no outcome is lost. Subclasses move the bytes."""

    def __init__(self, *, budget_ms: float) -> None:
        self.budget_ms = budget_ms
        self._unpolled: Decision | None = None
        self.sent = 0
        self.skipped_inflight = 0

    @abstractmethod
    def _pending(self) -> bool:
        """A request was sent and its decision not taken yet."""

    @abstractmethod
    def _arrived(self, timeout_s: float = 0.0) -> bool:
        """The pending request's outcome can be taken (waits up to `timeout_s`)."""

    @abstractmethod
    def _take(self) -> Decision:
        """The pending request's outcome (call only when `_arrived`); it is no longer pending."""

    @abstractmethod
    def _send(self, packet: pb.SystemStatePacket, step: int) -> bool:
        """Start the request; False when nothing could be sent this boundary."""

    @property
    def busy(self) -> bool:
        return self._pending() and not self._arrived()

    def skip_pending(self) -> None:
        """The caller saw a request still in flight and sends nothing this boundary (counted)."""
        self.skipped_inflight += 1

    def submit(self, packet: pb.SystemStatePacket, step: int) -> bool:
        """Send unless a request is still in flight (then count the skip and return False)."""
        if self.busy:
            self.skipped_inflight += 1
            return False
        if self._pending():  # done but not polled yet: keep it for the next poll
            self._unpolled = self._take()
        if not self._send(packet, step):
            return False
        self.sent += 1
        return True

    def poll(self) -> Decision | None:
        """The finished decision, if any (non-blocking); the oldest unpolled one first."""
        if self._unpolled is not None:
            ready, self._unpolled = self._unpolled, None
            return ready
        if not self._pending() or not self._arrived():
            return None
        return self._take()

    def wait(self) -> Decision | None:
        """Sync mode: block up to the budget (plus a scheduling margin; the request enforces the budget)."""
        if self._unpolled is not None:
            ready, self._unpolled = self._unpolled, None
            return ready
        if not self._pending() or not self._arrived(self.budget_ms / 1000.0 + 1.0):
            return None
        return self._take()


class DecisionClient(OneInFlight):
    """Submits packets from the training thread; the bus thread does the waiting."""

    def __init__(self, bus: BusThread, *, budget_ms: float) -> None:
        super().__init__(budget_ms=budget_ms)
        self.bus = bus
        self._inflight: concurrent.futures.Future[Decision] | None = None
        self._sent: tuple[int, str] = (0, "")  # (step, packet_id) of the request in flight

    def _pending(self) -> bool:
        return self._inflight is not None

    def _arrived(self, timeout_s: float = 0.0) -> bool:
        fut = self._inflight
        if fut is None or timeout_s <= 0:
            return fut is None or fut.done()
        return bool(concurrent.futures.wait([fut], timeout=timeout_s).done)  # never raises the request's error

    def _take(self) -> Decision:
        assert self._inflight is not None
        fut, self._inflight = self._inflight, None
        try:
            return fut.result()
        except BaseException as e:  # `ask` returns every outcome; this is a cancelled or broken future
            step, packet_id = self._sent
            return Decision(step, packet_id, "error", 0.0, detail=f"decision request failed: {type(e).__name__}: {e}")

    def _send(self, packet: pb.SystemStatePacket, step: int) -> bool:
        self._sent = (step, packet.packet_id)
        self._inflight = self.bus.submit(self._ask(packet, step))
        return True

    async def _ask(self, packet: pb.SystemStatePacket, step: int) -> Decision:
        return await ask(self.bus.client, packet, step, self.budget_ms)


async def ask(client: OonaClient, packet: pb.SystemStatePacket, step: int, budget_ms: float) -> Decision:
    """One request on `state`; every outcome is a `Decision` (a timeout or a bus error included)."""
    t0 = time.perf_counter()
    try:
        reply = await client.request("state", packet, timeout_ms=budget_ms)
    except RequestTimeoutError as e:
        return Decision(step, packet.packet_id, "timeout", _ms(t0), detail=str(e))
    except OonaError as e:
        return Decision(step, packet.packet_id, "error", _ms(t0), detail=f"{type(e).__name__}: {e}")
    except Exception as e:  # a Redis error reply (OOM, MISCONF, READONLY) is not wrapped by Oona: still an outcome
        log.warning("decision request failed", error=f"{type(e).__name__}: {e}", packet_id=packet.packet_id)
        return Decision(step, packet.packet_id, "error", _ms(t0), detail=f"{type(e).__name__}: {e}")
    try:
        msg = reply.message()
    except LeylineError as e:  # a payload this schema cannot decode (a newer peer's): an error, not a crash
        return Decision(step, packet.packet_id, "error", _ms(t0), detail=f"{type(e).__name__}: {e}")
    if isinstance(msg, pb.AdaptationCommand):
        return Decision(step, packet.packet_id, "command", _ms(t0), command=msg)
    if isinstance(msg, pb.DecisionFailure):
        return Decision(step, packet.packet_id, "failure", _ms(t0), failure=msg,
                        detail=enum_name(pb.DecisionFailureReason, msg.reason))
    return Decision(step, packet.packet_id, "error", _ms(t0), detail=f"unexpected reply {type(msg).__name__}")


def timeout_telemetry(d: Decision) -> pb.TelemetryPacket:
    """The `tamiyo_timeout` event of a request that got no reply in time (HIGH in core's list: it rides
    the emergency lane). Built here so the trainer and the sidecar report it alike."""
    event = build_event("tamiyo_timeout", level=pb.TELEMETRY_LEVEL_WARNING, description=d.detail[:200],
                        step_index=d.step, packet_id=d.packet_id)
    return build_telemetry_packet("tolaria", events=[event])


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
