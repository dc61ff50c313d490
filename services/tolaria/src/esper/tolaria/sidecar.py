"""Decisions through a sidecar process (`TOLARIA_DECISION_TRANSPORT=process`).

Why a process: with the bus thread (`bus.py`) every request and reply is Python work (protobuf,
signing, redis-py, the event loop) that takes the GIL from the training thread; on a sub-millisecond
step that alone costs as much as the step (bench: ~0.8 ms per round trip). Here the request runs in
a child process with its own Oona client (pinned, on a multi-core machine, away from the trainer:
ARCHITECTURE §11 puts the fleet on the other core), and the trainer only pickles the packet into a
pipe and polls the pipe at step boundaries (`multiprocessing.connection`: no library does
"request/reply off-process, polled without blocking" more simply).

The child also publishes the `tamiyo_timeout` event of a request that got no reply in time (the
trainer publishes it only if the child could not), so a slow fleet costs the trainer's core nothing
beyond reading the outcome.

The interface is `DecisionClient`'s, so the trainer does not know which transport it has. A child
that dies is an explicit failure: the request in flight comes back as an `error` decision (counted,
it feeds the decision breaker) and the next submit starts a new child without waiting for it (the
boundaries until it has connected send nothing, counted): training never stalls on a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing.connection
import os
import select
import socket
import subprocess
import sys
from typing import Any

from esper.core.logging import get_logger
from esper.core.telemetry import packet_priority
from esper.leyline import pb
from esper.oona import EmergencyRateLimitedError, OonaClient, OonaMetrics, OonaSettings
from esper.tolaria.decisions import Decision, OneInFlight, ask, timeout_telemetry

log = get_logger("esper.tolaria.sidecar")

_START_TIMEOUT_S = 30.0
# How long the child tries to publish a timeout's event before handing that to the trainer: a Redis
# that stalls kept the child (and a sync trainer's wait) for the publish's socket timeout per timeout,
# so an outage went uncounted and conservative mode came ~25 s late. A publish cut off here may still
# land, and the trainer's then doubles the event: a duplicate HIGH event beats a stalled count.
_EVENT_PUBLISH_S = 0.1


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """The child: read its settings, connect, then answer one `(step, packet)` at a time until the
    pipe closes."""
    import uvloop

    settings, budget_ms, cores = conn.recv()
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)

    async def main() -> None:
        client = OonaClient.from_settings(settings, sender="tolaria")
        await client.connect()
        conn.send("ready")
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(_recv(conn)))
        try:
            while (item := await inbox.get()) is not None:
                step, raw = item
                decision = await ask(client, pb.SystemStatePacket.FromString(raw), step, budget_ms)
                if decision.kind == "timeout":
                    decision = await _report_timeout(client, decision)
                conn.send(_encode(decision))
        finally:
            loop.remove_reader(conn.fileno())
            await client.close()

    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError, EOFError):
        uvloop.run(main())


async def _report_timeout(client: OonaClient, d: Decision) -> Decision:
    """Publish the timeout's HIGH event from here, off the trainer's core and GIL: each one cost the
    trainer ~0.3 ms through its bus thread, and on a busy fleet a fifth to two fifths of the packets
    time out (bench, width 1024). Over the emergency lane's cap the event is refused, as any
    client's would be, and the trainer counts that; any other failure leaves it to the trainer."""
    packet = timeout_telemetry(d)
    try:
        async with asyncio.timeout(_EVENT_PUBLISH_S):
            await client.publish("telemetry", packet, priority=packet_priority(packet))  # type: ignore[arg-type]
    except EmergencyRateLimitedError as e:
        log.warning("tamiyo_timeout event refused by the emergency lane's cap", error=str(e))
        return dataclasses.replace(d, timeout_event="rate_limited")
    except Exception as e:  # PublishError, a Redis error reply, too slow: the event is the trainer's to publish
        log.warning("tamiyo_timeout event not published by the sidecar; the trainer will",
                    error=f"{type(e).__name__}: {e}")
        return d
    return dataclasses.replace(d, timeout_event="published")


# Generated protobuf classes do not pickle (their module is imported under another name): messages
# cross the pipe as bytes.
_Wire = tuple[int, str, str, float, bytes | None, bytes | None, str, str]


def _encode(d: Decision) -> _Wire:
    return (d.step, d.packet_id, d.kind, d.latency_ms, d.command.SerializeToString() if d.command else None,
            d.failure.SerializeToString() if d.failure else None, d.detail, d.timeout_event)


def _decode(w: _Wire) -> Decision:
    step, packet_id, kind, latency_ms, command, failure, detail, timeout_event = w
    return Decision(step, packet_id, kind, latency_ms,  # type: ignore[arg-type]  # kind came from a Decision
                    command=pb.AdaptationCommand.FromString(command) if command is not None else None,
                    failure=pb.DecisionFailure.FromString(failure) if failure is not None else None, detail=detail,
                    timeout_event=timeout_event)  # type: ignore[arg-type]  # so did this


def _recv(conn: multiprocessing.connection.Connection) -> Any:
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None  # the trainer went away: stop


class SidecarDecisionClient(OneInFlight):
    """`DecisionClient`'s discipline over a child process: `submit` pickles into a pipe, `poll` looks at it."""

    def __init__(self, settings: OonaSettings, *, budget_ms: float, cores: set[int] | None = None,
                 metrics: OonaMetrics | None = None) -> None:
        """`metrics`: the trainer's Oona metrics, where the child's round trips and timeouts on `state`
        are recorded as the bus thread's would be (the child's own registry is not scraped)."""
        super().__init__(budget_ms=budget_ms)
        self.settings = settings
        self.cores = cores
        self.metrics = metrics
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        # Readiness of the pipe, looked at several times a step: a poll object registered once costs
        # ~0.4 us a look, `Connection.poll(0)` (a selector built per call) ~3.4 us, more once a wide
        # step has evicted the interpreter's data from the cache.
        self._ready_fd: select.poll | None = None
        self._ready_child = False  # the child said "ready" (connected to Redis)
        self._inflight: tuple[int, str] | None = None  # (step, packet_id) of the request in flight
        self.skipped_starting = 0  # boundaries that found a restarted child still connecting
        self.restarts = 0

    def start(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Start the child and wait until it is connected (the trainer's start-up, not a step)."""
        self._launch()
        assert self._conn is not None
        try:
            arrived = self._conn.poll(timeout_s)
        except (OSError, EOFError):
            arrived = False
        if not (arrived and self._child_ready()):
            self.close()
            raise RuntimeError(f"decision sidecar did not connect within {timeout_s:g} s")

    def _launch(self) -> None:
        """A fresh interpreter (`python -m esper.tolaria.sidecar FD`), not `multiprocessing`'s spawn,
        which re-imports the parent's `__main__` (a script without a main guard would run again) and
        not fork, which is unsafe once torch has started its threads. Does not wait for it."""
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "esper.tolaria.sidecar", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = multiprocessing.connection.Connection(ours.detach())
        self._ready_fd = select.poll()
        self._ready_fd.register(self._conn.fileno(), select.POLLIN)  # hang-ups and errors are always reported
        self._ready_child = False
        self._conn.send((self.settings, self.budget_ms, self.cores))

    def _child_ready(self) -> bool:
        """Non-blocking: has the child said "ready"?"""
        if not self._ready_child and self._conn is not None:
            try:
                self._ready_child = self._conn.poll(0) and self._conn.recv() == "ready"
            except (OSError, EOFError):
                self._ready_child = False
        return self._ready_child

    def close(self) -> None:
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        self._ready_fd = None
        self._ready_child = False
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        if proc is not None:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _pending(self) -> bool:
        return self._inflight is not None

    def _arrived(self, timeout_s: float = 0.0) -> bool:
        """Readable, hung up or closed: in each case taking the request settles it (a dead child's turns
        into an error decision)."""
        return self._ready_fd is None or bool(self._ready_fd.poll(timeout_s * 1000.0))

    def _send(self, packet: pb.SystemStatePacket, step: int) -> bool:
        """A dead child is replaced without waiting (training never stalls on it); boundaries send
        nothing (counted) until the new one has connected."""
        if self._conn is None or self._proc is None or self._proc.poll() is not None:
            self.close()
            self.restarts += 1
            log.warning("decision sidecar restarting", restarts=self.restarts)
            self._launch()
        if not self._child_ready():
            self.skipped_starting += 1
            return False
        try:
            if self._conn is not None:
                self._conn.send((step, packet.SerializeToString()))
        except OSError:
            self.close()  # taking this request turns it into an error decision
        self._inflight = (step, packet.packet_id)
        return True

    def _take(self) -> Decision:
        assert self._inflight is not None
        step, packet_id = self._inflight
        self._inflight = None
        try:
            if self._conn is None:
                raise EOFError("no sidecar")
            decision = _decode(self._conn.recv())
        except (OSError, EOFError) as e:
            self.close()  # the next submit starts a new child
            return Decision(step, packet_id, "error", 0.0, detail=f"decision sidecar died: {type(e).__name__}")
        if self.metrics is not None:
            if decision.kind == "timeout":
                self.metrics.request_timeouts.labels("state").inc()
                if decision.timeout_event == "rate_limited":
                    self.metrics.emergency_rate_limited.labels("telemetry").inc()
            elif decision.kind in ("command", "failure"):
                self.metrics.request_latency.labels("state").observe(decision.latency_ms / 1000.0)
        return decision

if __name__ == "__main__":
    _serve(multiprocessing.connection.Connection(int(sys.argv[1])))
