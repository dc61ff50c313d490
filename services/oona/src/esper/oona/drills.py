"""Bus drills: `python -m esper.oona drill [NAME|all]` (what `make e2e` runs).

Each drill starts its own `redis-server` on a free loopback port (never the system one), signs
with a fresh random secret, drives real consumers (real processes where the drill is about
processes), and returns `(ok, evidence)`: the numbers that prove the behaviour, read back from
Redis and from the consumers' own counters. Pass criteria are invariants (counts, reasons,
order), never wall-clock thresholds; timeouts exist only so a broken drill fails instead of hanging.
See docs/drills.md for what each drill shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.core import drills as core_drills
from esper.core.clock import now_ms
from esper.core.drills import LOG_LEVEL_ENV, Drill, DrillResult, verdict
from esper.core.redis_server import EmbeddedRedis
from esper.leyline import (
    CHANNELS,
    DEADLETTER_STREAM,
    DEFAULT_MAX_MESSAGE_BYTES,
    EnvelopeError,
    SigningKeys,
    channel,
    decode_envelope,
    encode_envelope,
    pack,
    pb,
    reason_code,
    sign_envelope,
    unpack_as,
    verify_envelope,
)
from esper.oona.client import OonaClient
from esper.oona.consumer import Consumer
from esper.oona.delivery import Delivery
from esper.oona.errors import RequestTimeoutError
from esper.oona.settings import OonaSettings

DRILL_TIMEOUT_S = 120.0  # liveness only: a drill that has not finished by then has hung
WAIT_S = 30.0  # liveness bound of one "wait until" inside a drill
GROUP = "drill"

# -- shared helpers -------------------------------------------------------------------------------


def _settings(
    url: str,
    *,
    visibility_timeout_ms: int = 500,
    claim_interval_ms: int = 100,
    max_deliveries: int = 3,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> OonaSettings:
    """Short timeouts so drills are fast; a fresh random secret per drill."""
    return OonaSettings(
        redis_url=url,
        leyline_secret=secrets.token_hex(16),
        block_ms=50,
        visibility_timeout_ms=visibility_timeout_ms,
        claim_interval_ms=claim_interval_ms,
        max_deliveries=max_deliveries,
        max_message_bytes=max_message_bytes,
        # The consume breaker opens after 3 failed reads (~0.15 s of outage with the loop's backoff);
        # at the default 30 s reset a Redis restart would then stall consumption for 30 s.
        breaker_reset_s=1.0,
        metrics_port=-1,
    )


@contextlib.asynccontextmanager
async def _bus(
    *, appendonly: bool = False, **knobs: int
) -> AsyncIterator[tuple[EmbeddedRedis, OonaSettings, OonaClient]]:
    """A private redis-server, drill settings and a connected client; everything stopped on exit."""
    server = EmbeddedRedis(appendonly=appendonly)
    server.start()
    try:
        settings = _settings(server.url, **knobs)
        client = OonaClient.from_settings(settings, sender="drill")
        await client.connect()
        try:
            yield server, settings, client
        finally:
            await client.close()
    finally:
        server.stop()


class ConsumerDied(RuntimeError):
    """A consumer task a drill runs in-process ended on its own (it must serve until stopped)."""


_watched: list[asyncio.Task[None]] = []


@contextlib.asynccontextmanager
async def _running(consumer: Consumer) -> AsyncIterator[asyncio.Task[None]]:
    """Run `consumer.run` as a task; stop it (drain, flush acks) on exit. While it runs, every
    `_until` wait fails fast with the task's exception if the consumer dies."""
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop), name=f"drill-{consumer.name}")
    _watched.append(task)
    try:
        yield task
    finally:
        _watched.remove(task)
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10.0)


def _check_consumers() -> None:
    for task in _watched:
        if task.done():
            exc = None if task.cancelled() else task.exception()
            raise ConsumerDied(f"consumer task {task.get_name()} ended while serving: {exc!r}")


async def _until(cond: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        _check_consumers()
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _until_async(cond: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        _check_consumers()
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _expect(problems: list[str], cond: bool, what: str) -> None:
    if not cond:
        problems.append(what)


def _packets(prefix: str, n: int, start: int = 0) -> list[pb.SystemStatePacket]:
    return [pb.SystemStatePacket(packet_id=f"{prefix}{i}", global_step=i) for i in range(start, start + n)]


async def _pending(client: OonaClient, ch: str, group: str = GROUP) -> int:
    """Delivered-but-unacked entries of `group` over both lanes of `ch`."""
    total = 0
    for stream in channel(ch).streams:
        info: Any = await client.redis.xpending(stream, group)
        total += int(info["pending"])
    return total


@dataclass(slots=True)
class Recorder:
    """A handler that records every completion (so a double effect would show as a count of 2)."""

    fail_on: str = ""  # packet_id that always raises (poison)
    sleep_on: str = ""  # packet_id prefix whose handling sleeps `sleep_s` first (slow handler)
    sleep_s: float = 0.0
    reply: bool = False
    order: list[tuple[str, str]] = field(default_factory=list)  # (packet_id, lane) in handling order
    completions: Counter[str] = field(default_factory=Counter)  # packet_id → completed handler runs
    attempts: Counter[str] = field(default_factory=Counter)  # packet_id → handler calls
    message_ids: dict[str, str] = field(default_factory=dict)  # packet_id → message_id
    first_failure_at: int = -1  # len(order) when the poison first failed

    async def __call__(self, d: Delivery) -> pb.DecisionFailure | None:
        packet = d.message_as(pb.SystemStatePacket)
        pid = packet.packet_id
        self.attempts[pid] += 1
        self.message_ids[pid] = d.message_id
        if pid == self.fail_on:
            if self.first_failure_at < 0:
                self.first_failure_at = len(self.order)
            raise ValueError(f"poison pill {pid} (delivery {d.deliveries})")
        if self.sleep_on and pid.startswith(self.sleep_on):
            await asyncio.sleep(self.sleep_s)
        self.order.append((pid, d.lane))
        self.completions[pid] += 1
        if not self.reply:
            return None
        return pb.DecisionFailure(packet_id=pid, reason=pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE, detail="drill")

    def once_each(self, expected: int) -> bool:
        return len(self.completions) == expected and all(c == 1 for c in self.completions.values())


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    reason: str  # the entry's plain `reason` field
    source: str
    record: pb.DeadLetterRecord | None  # None when the signed record does not verify


async def _dead_letters(client: OonaClient) -> list[DeadLetter]:
    """Every entry of oona.deadletter, with its signed record verified and decoded."""
    out: list[DeadLetter] = []
    rows: Any = await client.redis.xrange(DEADLETTER_STREAM)
    for raw_id, fields in rows:
        record: pb.DeadLetterRecord | None
        try:
            env = decode_envelope(fields[b"payload"], max_bytes=client.settings.max_message_bytes)
            verify_envelope(env, client.keys)
            record = unpack_as(env, pb.DeadLetterRecord)
        except (KeyError, EnvelopeError):
            record = None
        out.append(DeadLetter(raw_id.decode(), fields.get(b"reason", b"").decode(),
                              fields.get(b"source", b"").decode(), record))
    return out


async def _bus_events(client: OonaClient) -> list[tuple[str, str, str]]:
    """(stream, event name, reason) of every event in the telemetry channel's two lanes."""
    out: list[tuple[str, str, str]] = []
    for stream in CHANNELS["telemetry"].streams:
        rows: Any = await client.redis.xrange(stream)
        for _raw_id, fields in rows:
            env = decode_envelope(fields[b"payload"], max_bytes=client.settings.max_message_bytes)
            verify_envelope(env, client.keys)
            packet = unpack_as(env, pb.TelemetryPacket)
            out.extend((stream, ev.attributes.get("event", ""), ev.attributes.get("reason", ""))
                       for ev in packet.events)
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else "" if value is None else str(value)


def _counts(c: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"


# -- worker processes -----------------------------------------------------------------------------


class Workers:
    """Consumer processes (`python -m esper.oona.drill_worker`) owned by one drill; killed on exit."""

    def __init__(self, settings: OonaSettings, tmp: Path) -> None:
        secret = settings.leyline_secret
        assert secret is not None
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "ESPER_REDIS_URL": settings.require_redis_url(),
            "ESPER_LEYLINE_SECRET": secret.get_secret_value(),
            "ESPER_VISIBILITY_TIMEOUT_MS": str(settings.visibility_timeout_ms),
            "ESPER_CLAIM_INTERVAL_MS": str(settings.claim_interval_ms),
            "ESPER_MAX_DELIVERIES": str(settings.max_deliveries),
            "ESPER_BLOCK_MS": str(settings.block_ms),
            "ESPER_BREAKER_RESET_S": str(settings.breaker_reset_s),
            "ESPER_METRICS_PORT": "-1",
            "ESPER_LOG_LEVEL": os.environ.get(LOG_LEVEL_ENV, "ERROR"),
        }

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.out").open("wb") as out, (self.tmp / f"{name}.err").open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "esper.oona.drill_worker", name, *args],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.env)
        self.procs[name] = proc
        return proc

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.out").read_text(errors="replace")

    def tail(self, name: str, limit: int = 600) -> str:
        err = (self.tmp / f"{name}.err").read_text(errors="replace")
        return f"{name} rc={self.procs[name].poll()} stderr: {err[-limit:]!r}"

    def tails(self) -> str:
        return " | ".join(self.tail(n) for n in self.procs)

    async def terminate(self, name: str, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (graceful drain) and wait; None if it did not exit in time."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@contextlib.contextmanager
def _workers(settings: OonaSettings) -> Iterator[Workers]:
    with tempfile.TemporaryDirectory(prefix="esper-drill-") as tmp:
        workers = Workers(settings, Path(tmp))
        try:
            yield workers
        finally:
            workers.close()


# -- 1. crash-reclaim -----------------------------------------------------------------------------


async def drill_crash_reclaim() -> DrillResult:
    """Two consumer processes; A is SIGKILLed inside its handler; B reclaims with XAUTOCLAIM."""
    n, marker, prefix, vis_ms = 200, "stall-me", "drill:crash", 2000
    go_key = f"{prefix}:go"
    async with _bus(visibility_timeout_ms=vis_ms, claim_interval_ms=100) as (_server, settings, client):
        r = client.redis
        stream = channel("state").stream("normal")
        with _workers(settings) as w:
            a = w.spawn("A", prefix, "--stall-on", marker)
            w.spawn("B", prefix, "--wait-key", go_key)

            async def ready() -> bool:
                if not (w.alive("A") and w.alive("B")):
                    raise RuntimeError(f"worker died on start: {w.tails()}")
                return int(await r.exists(f"{prefix}:ready:A", f"{prefix}:ready:B")) == 2

            if not await _until_async(ready):
                return False, f"workers not ready: {w.tails()}"
            # Only A reads yet: it takes the marker (plus whatever came in the same batch) and stalls.
            marked = await client.publish("state", pb.SystemStatePacket(packet_id=marker))
            await client.publish_many("state", _packets("m", n - 1, start=1))

            async def a_stalled() -> bool:
                return bool(await r.hexists(f"{prefix}:started", marked.message_id))

            if not await _until_async(a_stalled):
                return False, f"A never started the marked message: {w.tails()}"
            await r.set(go_key, "1")  # now B serves

            async def a_pending() -> int:
                info: Any = await r.xpending(stream, GROUP)
                held = {c["name"].decode(): int(c["pending"]) for c in info["consumers"]}
                return held.get("drill-A", 0)

            async def b_caught_up() -> bool:
                return int(await r.hlen(f"{prefix}:effect")) + await a_pending() == n

            if not await _until_async(b_caught_up):
                return False, f"B did not handle the backlog: {w.tails()}"
            held_by_a = await a_pending()
            row: Any = await r.xpending_range(stream, GROUP, min=marked.entry_id, max=marked.entry_id, count=1)
            idle_at_kill = int(row[0]["time_since_delivered"]) if row else -1
            os.kill(a.pid, signal.SIGKILL)
            a_rc = await asyncio.to_thread(a.wait)
            t_kill = time.monotonic()

            async def all_done() -> bool:
                return int(await r.hlen(f"{prefix}:effect")) == n and await _pending(client, "state") == 0

            finished = await _until_async(all_done)
            after_kill_ms = (time.monotonic() - t_kill) * 1000
            b_rc = await w.terminate("B")
            b_lines = w.output("B").strip().splitlines()
            b_stats: dict[str, Any] = json.loads(b_lines[-1]) if b_rc == 0 and b_lines else {}
            started = _text(await r.hget(f"{prefix}:started", marked.message_id))
            effect = _text(await r.hget(f"{prefix}:effect", marked.message_id))
            completions = Counter({_text(k): int(v) for k, v in (await r.hgetall(f"{prefix}:completions")).items()})
            pending = await _pending(client, "state")
            tails = w.tails()
    problems: list[str] = []
    _expect(problems, finished, f"not all handled {WAIT_S:.0f} s after the kill")
    _expect(problems, a_rc == -signal.SIGKILL, f"A exit code {a_rc}, expected -9")
    _expect(problems, started == "A:1", f"marker started by {started!r}, expected 'A:1'")
    _expect(problems, effect.startswith("B:") and int(effect.split(":")[1]) >= 2,
            f"marker effect {effect!r}, expected B on a redelivery")
    _expect(problems, len(completions) == n and set(completions.values()) == {1},
            f"completions: {len(completions)} ids, counts {sorted(set(completions.values()))}")
    _expect(problems, pending == 0, f"{pending} entries still pending")
    _expect(problems, b_rc == 0 and b_stats.get("reclaimed", 0) >= held_by_a,
            f"B rc={b_rc} stats={b_stats} (expected reclaimed >= {held_by_a}); {tails}")
    return verdict(problems, (
        f"{n} msgs, 2 worker processes; A stalled in the handler on the marker (started={started}) holding "
        f"{held_by_a} pending entries, SIGKILLed (rc={a_rc}) at marker idle {idle_at_kill} ms; "
        f"B reclaimed {b_stats.get('reclaimed')} via XAUTOCLAIM (visibility {vis_ms} ms), all done "
        f"{after_kill_ms:.0f} ms after the kill; marker effect by {effect} (worker:delivery); "
        f"{len(completions)}/{n} effects, completions per message min={min(completions.values(), default=0)} "
        f"max={max(completions.values(), default=0)}; B handled={b_stats.get('handled')} "
        f"duplicates={b_stats.get('duplicates')}; pending={pending}"
    ))


# -- 2. poison ------------------------------------------------------------------------------------


async def drill_poison() -> DrillResult:
    """A handler that always fails on one message: dead-lettered after max_deliveries, others served."""
    first, second, max_deliveries = 30, 30, 3
    async with _bus(visibility_timeout_ms=300, claim_interval_ms=100, max_deliveries=max_deliveries) as (
        _server, _cfg, client,
    ):
        rec = Recorder(fail_on="poison")
        consumer = Consumer(client, "state", group=GROUP, handler=rec)
        async with _running(consumer):
            batch = _packets("a", first)
            batch[first // 3] = pb.SystemStatePacket(packet_id="poison")
            await client.publish_many("state", batch)
            if not await _until(lambda: rec.attempts["poison"] >= 1):
                return False, "poison message never reached the handler"
            # Published after the first failure: the consumer must keep serving while the poison cycles.
            await client.publish_many("state", _packets("b", second))

            async def settled() -> bool:
                return (rec.once_each(first + second - 1) and int(await client.redis.xlen(DEADLETTER_STREAM)) >= 1
                        and await _pending(client, "state") == 0)

            settled_ok = await _until_async(settled)
            dls = await _dead_letters(client)
            pending = await _pending(client, "state")
        stats = consumer.stats
    problems: list[str] = []
    _expect(problems, settled_ok, "did not settle (handled/dead-lettered/pending)")
    _expect(problems, len(dls) == 1, f"{len(dls)} dead letters, expected 1")
    rec_ = dls[0].record if dls else None
    _expect(problems, rec_ is not None, "dead-letter record missing or its signature does not verify")
    reason = dls[0].reason if dls else ""
    detail = rec_.detail if rec_ is not None else ""
    deliveries = rec_.deliveries if rec_ is not None else 0
    _expect(problems, reason == "max_deliveries", f"reason {reason!r}")
    _expect(problems, rec_ is not None and rec_.reason == pb.DEAD_LETTER_REASON_MAX_DELIVERIES, "record reason")
    _expect(problems, "poison pill" in detail, f"handler error missing from detail {detail!r}")
    _expect(problems, rec_ is not None and rec_.message_id == rec.message_ids.get("poison"), "record message_id")
    _expect(problems, deliveries == max_deliveries and rec.attempts["poison"] == max_deliveries,
            f"deliveries {deliveries}, handler attempts {rec.attempts['poison']}, expected {max_deliveries}")
    handled_after = len(rec.order) - rec.first_failure_at
    _expect(problems, handled_after >= second, f"only {handled_after} handled after the first failure")
    return verdict(problems, (
        f"{first + second} msgs, 1 poison: handler called {rec.attempts['poison']}x, dead-lettered with "
        f"reason={reason} deliveries={deliveries} detail={detail[:90]!r}; other "
        f"{len(rec.completions)}/{first + second - 1} handled once each ({handled_after} after the first "
        f"failure); stats handled={stats.handled} handler_errors={stats.handler_errors} "
        f"reclaimed={stats.reclaimed} dead_lettered={stats.dead_lettered}; pending={pending}"
    ))


# -- 3. bad-input ---------------------------------------------------------------------------------


def _hostile_entries(settings: OonaSettings, keys: SigningKeys) -> list[tuple[str, str, dict[bytes, bytes]]]:
    """(case, expected dead-letter reason, entry fields) for every kind of input the bus must refuse."""
    now = now_ms()

    def env(packet_id: str, **kw: Any) -> pb.BusEnvelope:
        issued = kw.pop("issued_at_ms", now)
        return pack(pb.SystemStatePacket(packet_id=packet_id), sender="drill-attacker", issued_at_ms=issued, **kw)

    def signed(e: pb.BusEnvelope, k: SigningKeys = keys) -> bytes:
        return encode_envelope(sign_envelope(e, k))

    tampered = signed(env("tamper-victim")).replace(b"tamper-victim", b"tamper-VICTIM")
    rogue = SigningKeys(key_id="rogue", secret=secrets.token_bytes(32))
    no_id = env("no-id")
    no_id.message_id = ""
    unknown_type = env("unknown-type")
    unknown_type.message_type = pb.BusMessageType.ValueType(999)  # an open-enum value no one registered
    big = pack(pb.SystemStatePacket(packet_id="x" * (settings.max_message_bytes + 1)), sender="drill-attacker",
               issued_at_ms=now)
    replayed = signed(env("replay-me"))
    p = b"payload"
    return [
        ("bad signature (tampered payload)", "bad_signature", {p: tampered}),
        ("unknown key_id", "unknown_key", {p: signed(env("rogue"), rogue)}),
        ("unsigned", "missing_signature", {p: encode_envelope(env("unsigned"))}),
        ("expired deadline", "expired", {p: signed(env("expired", deadline_ms=now - 1_000))}),
        ("stale issued_at", "stale", {p: signed(env("stale", issued_at_ms=now - settings.freshness_window_ms
                                                    - 5_000))}),
        ("issued in the future", "from_future", {p: signed(env("future", issued_at_ms=now + 600_000))}),
        ("replay: original", "", {p: replayed}),
        ("replay: copy", "replayed", {p: replayed}),
        ("truncated", "undecodable", {p: signed(env("truncated"))[:-5]}),
        ("oversize", "oversize", {p: signed(big)}),
        ("random bytes", "undecodable", {p: os.urandom(256)}),
        ("no payload field", "undecodable", {b"junk": b"not an envelope"}),
        ("no message_id", "missing_id", {p: signed(no_id)}),
        ("unknown message_type", "unknown_type", {p: signed(unknown_type)}),
    ]


async def drill_bad_input() -> DrillResult:
    """Hostile entries go straight to oona.deadletter with the right reason; the consumer survives."""
    async with _bus(max_message_bytes=64 * 1024) as (_server, settings, client):
        rec = Recorder()
        consumer = Consumer(client, "state", group=GROUP, handler=rec)
        stream = channel("state").stream("normal")
        cases = _hostile_entries(settings, client.keys)
        expected_dead = sum(1 for _, reason, _ in cases if reason)
        async with _running(consumer) as task:
            ids = [(case, reason, await client.publish_raw(stream, fields)) for case, reason, fields in cases]

            async def all_dead() -> bool:
                return int(await client.redis.xlen(DEADLETTER_STREAM)) >= expected_dead

            dead_ok = await _until_async(all_dead)
            await client.publish("state", pb.SystemStatePacket(packet_id="valid-after"))
            valid_ok = await _until(lambda: rec.completions["valid-after"] == 1)
            alive = not task.done()
            # Keyed by the entry each record says it came from (records that fail to verify keep their own id).
            dls = {d.record.source_entry_id if d.record else d.entry_id: d for d in await _dead_letters(client)}
            events = await _bus_events(client)
            pending = await _pending(client, "state")
    problems: list[str] = []
    _expect(problems, dead_ok and len(dls) == expected_dead, f"{len(dls)} dead letters, expected {expected_dead}")
    for case, reason, entry_id in ids:
        got = dls.get(entry_id)
        if not reason:
            _expect(problems, got is None and rec.completions["replay-me"] == 1, f"{case}: not handled once")
            continue
        got_reason = got.reason if got else None
        record_reason = reason_code(got.record.reason) if got and got.record else None
        _expect(problems, got_reason == reason == record_reason,
                f"{case}: reason field {got_reason!r}, signed record {record_reason!r}, expected {reason!r}")
        _expect(problems, got is not None and got.source == stream, f"{case}: source {got.source if got else None!r}")
    reasons = Counter(d.reason for d in dls.values())
    dl_events = [(s, e, why) for s, e, why in events if e.startswith("oona.dead_letter")]
    event_reasons = Counter(why for _, _, why in dl_events)
    lanes = Counter("emergency" if s.endswith(".emergency") else "normal" for s, _, _ in dl_events)
    _expect(problems, event_reasons == reasons, f"telemetry reasons {_counts(event_reasons)}")
    _expect(problems, alive and valid_ok, "consumer dead or the valid message after the attack was not handled")
    _expect(problems, pending == 0, f"{pending} pending")
    return verdict(problems, (
        f"{len(cases)} injected entries -> {len(dls)} dead letters, reasons: {_counts(reasons)}; "
        f"telemetry events {len(dl_events)} (emergency lane {lanes['emergency']}, normal lane {lanes['normal']}); "
        f"replay original handled {rec.completions['replay-me']}x; consumer alive={alive}, valid message after "
        f"handled {rec.completions['valid-after']}x; stats dead_lettered={consumer.stats.dead_lettered}; "
        f"pending={pending}"
    ))


# -- 4. emergency-first ---------------------------------------------------------------------------


async def drill_emergency_first() -> DrillResult:
    """10,000 normal entries, then one HIGH: a consumer started afterwards handles the HIGH one first."""
    n = 10_000
    async with _bus() as (_server, _cfg, client):
        for start in range(0, n, 1_000):
            await client.publish_many("state", _packets("n", 1_000, start=start))
        urgent = await client.publish("state", pb.SystemStatePacket(packet_id="emergency"),
                                      priority=pb.MESSAGE_PRIORITY_HIGH)
        ch = channel("state")
        backlog = int(await client.redis.xlen(ch.stream("normal")))
        rec = Recorder()
        consumer = Consumer(client, "state", group=GROUP, handler=rec)
        t0 = time.perf_counter()
        async with _running(consumer):
            done = await _until(lambda: len(rec.order) >= n + 1, 60.0)
            seconds = time.perf_counter() - t0
        pending = await _pending(client, "state")
    problems: list[str] = []
    first = rec.order[0] if rec.order else ("", "")
    normal = [pid for pid, _ in rec.order[1:]]
    _expect(problems, done, f"only {len(rec.order)} of {n + 1} handled")
    _expect(problems, urgent.lane == "emergency", f"HIGH message went to the {urgent.lane} lane")
    _expect(problems, backlog == n, f"normal lane held {backlog} entries, expected {n}")
    _expect(problems, first == ("emergency", "emergency"), f"first handled was {first}")
    _expect(problems, normal == [f"n{i}" for i in range(n)], "backlog not drained completely in order")
    _expect(problems, rec.once_each(n + 1), "some message handled more than once")
    _expect(problems, pending == 0, f"{pending} pending")
    pos = next((i for i, (pid, _) in enumerate(rec.order) if pid == "emergency"), -1)
    return verdict(problems, (
        f"backlog {backlog} normal entries + 1 HIGH on {urgent.stream}; emergency handled at position {pos}, "
        f"then {len(normal)} normal in publish order; {len(rec.order)} handled in {seconds:.2f} s; "
        f"stats handled={consumer.stats.handled} duplicates={consumer.stats.duplicates}; pending={pending}"
    ))


# -- 5. redis-restart -----------------------------------------------------------------------------


async def _group_state(client: OonaClient, stream: str) -> tuple[int, str, int]:
    """(stream length, group's last-delivered-id, group's pending) of GROUP on `stream`."""
    groups: Any = await client.redis.xinfo_groups(stream)
    g = next(g for g in groups if g["name"] == GROUP.encode())
    return int(await client.redis.xlen(stream)), g["last-delivered-id"].decode(), int(g["pending"])


async def drill_redis_restart() -> DrillResult:
    """Redis (AOF) restarted on the same port under a running consumer: nothing lost, nothing re-handled."""
    batch = 100
    async with _bus(appendonly=True) as (server, _cfg, client):
        # The in-flight batch is handled slowly (3 ms each), so the restart lands in the middle of it.
        rec = Recorder(sleep_on="inflight", sleep_s=0.003)
        consumer = Consumer(client, "state", group=GROUP, handler=rec)
        stream = channel("state").stream("normal")
        async with _running(consumer) as task:
            await client.publish_many("state", _packets("before", batch))

            async def acked() -> bool:
                return len(rec.completions) == batch and await _pending(client, "state") == 0

            acked_ok = await _until_async(acked)
            state_before = await _group_state(client, stream)
            # A second batch is in flight while the server goes down and comes back.
            await client.publish_many("state", _packets("inflight", batch))
            t0 = time.perf_counter()
            await asyncio.to_thread(server.restart)
            restart_s = time.perf_counter() - t0
            inflight_at_restart = sum(1 for pid, _ in rec.order if pid.startswith("inflight"))
            xlen_after_restart = int(await client.redis.xlen(stream))
            await client.publish_many("state", _packets("after", batch))

            async def all_done() -> bool:
                return len(rec.completions) == 3 * batch and await _pending(client, "state") == 0

            done_ok = await _until_async(all_done)
            state_after = await _group_state(client, stream)
            alive = not task.done()
        stats = consumer.stats
    problems: list[str] = []
    _expect(problems, acked_ok, "first batch not acked before the restart")
    _expect(problems, xlen_after_restart >= 2 * batch, f"stream has {xlen_after_restart} entries after restart, "
            f"expected >= {2 * batch} (AOF lost data)")
    _expect(problems, done_ok, f"{len(rec.completions)} of {3 * batch} handled")
    _expect(problems, rec.once_each(3 * batch),
            f"re-handled: {[k for k, v in rec.completions.items() if v > 1][:5]}")
    _expect(problems, rec.completions.total() == 3 * batch, "handler completions != messages")
    _expect(problems, stats.reconnects >= 1, "consumer never saw the outage (reconnects=0)")
    _expect(problems, alive, "consumer task died")
    return verdict(problems, (
        f"before restart: {batch} handled+acked (xlen, last-delivered, pending = {state_before}); "
        f"{batch} published just before restart ({inflight_at_restart} of them "
        f"handled when the restart returned); AOF redis restarted on port {server.port} in {restart_s:.2f} s, "
        f"xlen after restart {xlen_after_restart}; {batch} published after; "
        f"handled {len(rec.completions)} distinct / {rec.completions.total()} completions (each once); "
        f"reconnects={stats.reconnects} reclaimed={stats.reclaimed} duplicates_skipped={stats.duplicates}; "
        f"after: {state_after}"
    ))


# -- 6. request-reply -----------------------------------------------------------------------------


SLOW_HANDLER_S = 1.2  # the slow responder answers this late ...
SLOW_DEADLINE_MS = 500  # ... to a request with this budget (generous: the read itself takes ~1 ms)


def _metric(client: OonaClient, name: str, labels: dict[str, str] | None = None) -> float:
    return client.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def _expect_timeout(requester: OonaClient, packet_id: str, timeout_ms: float) -> str:
    try:
        reply = await requester.request("state", pb.SystemStatePacket(packet_id=packet_id), timeout_ms=timeout_ms)
    except RequestTimeoutError as e:
        return f"RequestTimeoutError({e})"
    return f"answered: {reply.message_as(pb.DecisionFailure).packet_id}"


async def drill_request_reply() -> DrillResult:
    """Answered within the deadline; an expired request is dead-lettered, never answered late."""
    async with _bus() as (_server, settings, responder_client):
        requester = OonaClient.from_settings(settings, sender="drill-trainer")
        await requester.connect()
        try:
            rec = Recorder(reply=True, sleep_on="rr-slow", sleep_s=SLOW_HANDLER_S)
            responder = Consumer(responder_client, "state", group=GROUP, handler=rec, name="responder-1")
            async with _running(responder):
                t0 = time.perf_counter()
                reply = await requester.request("state", pb.SystemStatePacket(packet_id="rr-ok"), timeout_ms=2_000)
                rtt_ms = (time.perf_counter() - t0) * 1000
            answered = reply.message_as(pb.DecisionFailure).packet_id
            # No responder: the request's deadline passes before anyone reads it.
            late_outcome = await _expect_timeout(requester, "rr-late", 300)
            responder2 = Consumer(responder_client, "state", group=GROUP, handler=rec, name="responder-2")
            async with _running(responder2):

                async def dead() -> bool:
                    return int(await responder_client.redis.xlen(DEADLETTER_STREAM)) >= 1

                dead_ok = await _until_async(dead)
                await asyncio.sleep(0.3)  # room for a (wrong) late reply to show up
                late_after_expired = _metric(requester, "oona_late_replies_total")
                # A slow responder: it answers after the deadline; the requester discards and counts it.
                slow_outcome = await _expect_timeout(requester, "rr-slow", SLOW_DEADLINE_MS)

                async def reply_landed() -> bool:
                    return int(await requester.redis.xlen(requester.reply_stream)) >= 2

                await _until_async(reply_landed, timeout_s=SLOW_HANDLER_S + 10)
                # The requester's next read (its next request) discards the late reply and counts it.
                await requester.request("state", pb.SystemStatePacket(packet_id="rr-after"), timeout_ms=2_000)
                slow_counted = _metric(requester, "oona_late_replies_total") >= 1
            late_after_slow = _metric(requester, "oona_late_replies_total")
            timeouts = _metric(requester, "oona_request_timeouts_total", {"channel": "state"})
            replies_sent = int(await requester.redis.xlen(requester.reply_stream))
            dls = await _dead_letters(requester)
        finally:
            await requester.close()
    problems: list[str] = []
    dl = dls[0] if dls else None
    dl_packet = ""
    if dl is not None and dl.record is not None:
        dl_packet = unpack_as(decode_envelope(dl.record.raw_payload), pb.SystemStatePacket).packet_id
    _expect(problems, answered == "rr-ok", f"first request answered with {answered!r}")
    _expect(problems, late_outcome.startswith("RequestTimeoutError"), f"expired request: {late_outcome}")
    _expect(problems, dead_ok and len(dls) == 1 and dl is not None and dl.reason == "expired",
            f"dead letters {[d.reason for d in dls]}, expected ['expired']")
    _expect(problems, dl_packet == "rr-late", f"dead letter carries {dl_packet!r}")
    _expect(problems, rec.attempts["rr-late"] == 0, "the expired request reached the handler")
    _expect(problems, late_after_expired == 0, f"late replies {late_after_expired} after the expired request")
    _expect(problems, slow_outcome.startswith("RequestTimeoutError"), f"slow request: {slow_outcome}")
    _expect(problems, slow_counted and late_after_slow == 1, f"late replies {late_after_slow} after the slow one")
    _expect(problems, timeouts == 2, f"request timeouts {timeouts}")
    return verdict(problems, (
        f"request answered in {rtt_ms:.1f} ms (deadline 2000 ms) with packet {answered}; request with a 300 ms "
        f"deadline and no responder -> {late_outcome.split('(')[0]}, responder started later dead-lettered it "
        f"(reason={dl.reason if dl else None}, packet {dl_packet}), handler calls for it "
        f"{rec.attempts['rr-late']}, late replies {late_after_expired:.0f}; slow responder "
        f"({SLOW_HANDLER_S * 1000:.0f} ms handler vs {SLOW_DEADLINE_MS} ms deadline) -> "
        f"{slow_outcome.split('(')[0]}, its reply discarded and counted: late replies "
        f"{late_after_slow:.0f}; request timeouts {timeouts:.0f}; reply stream entries {replies_sent}"
    ))


# -- registry and runner --------------------------------------------------------------------------

DRILLS: dict[str, Drill] = {
    "crash-reclaim": drill_crash_reclaim,
    "poison": drill_poison,
    "bad-input": drill_bad_input,
    "emergency-first": drill_emergency_first,
    "redis-restart": drill_redis_restart,
    "request-reply": drill_request_reply,
}


def run_drill(name: str) -> DrillResult:
    """Run one drill on a fresh event loop."""
    return core_drills.run_drill(DRILLS[name], timeout_s=DRILL_TIMEOUT_S)


def run_drills(name: str) -> int:
    """Run `name` (or every drill for 'all'); exit code 0 all passed, 1 any failed, 2 unknown name."""
    return core_drills.run_drills(DRILLS, name, service="oona", timeout_s=DRILL_TIMEOUT_S)


__all__ = ["DRILLS", "Drill", "DrillResult", "run_drill", "run_drills"]
