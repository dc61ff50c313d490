"""Emergencies: levels that only go up, and signals that are never lost silently nor block training.

`EmergencyState` is the pure rule: NOTICE → ELEVATED → CONSERVATIVE → HALT; a request at or below
the current level is ignored and counted. `EmergencyController` wraps it for the trainer: an
escalation builds an `EmergencySignal` (origin `tolaria`) and hands it to the publisher; `halted`
is the flag the training loop checks at every step boundary (HALT: checkpoint, flush, stop cleanly).

`EmergencyPublisher` owns delivery, on a **background thread** running its own asyncio loop with its
own `OonaClient` (its own connection pool). Why a thread and not a task on the trainer's loop: the
training step is synchronous torch code that can hold the trainer's loop for a whole step, and an
emergency (above all HALT) must go out while it runs; SQLite fsyncs also stay off the trainer.
`submit()` is the only thing the trainer calls on the hot path: it appends to a deque under a lock
held for microseconds and wakes the thread. It never waits on Redis or the disk.

Delivery, in submission order (`seq`):
- Rate cap: a token bucket of TOLARIA_EMERGENCY_BYPASS_MAX_PER_MIN. A signal with no token *waits*
  (in order, counted as rate limited); it is not dropped.
- Outage: a failed publish (Oona `PublishError`, breaker open, any Redis error) keeps the signal at
  the head and retries with exponential backoff. Each signal has a fixed `message_id`, so a retry of
  a publish that did land is deduplicated by consumers.
- Memory holds `memory_cap` signals; past it the oldest move to a SQLite spill file (WAL journal,
  `synchronous=FULL`, as Tamiyo's field-report outbox), and while publishing fails all of memory
  does (a kill -9 during an outage loses nothing spilled), so the disk holds the older part of the
  queue and memory the newer. Disk is drained first. `close()` moves what is left in memory to disk,
  and a new publisher on the same file picks it all up (restart of the emitter).
- Past `spill_cap` rows on disk, the oldest signals are dropped (newer ones carry higher levels);
  if the thread is wedged and memory reaches max(4 x `memory_cap`, `memory_cap` + 64), the oldest
  in memory are dropped. A spilled row that no longer decodes is deleted and dropped (`corrupt`),
  and a spill file SQLite cannot open is moved aside and counted once: damage never stops delivery.
  Every drop is counted by reason (metric, `stats()`), logged, and reported with a telemetry event
  (`tolaria.emergency.dropped`, HIGH) as soon as a publish succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, TypeAlias

from google.protobuf.message import DecodeError

from esper.core.logging import get_logger
from esper.core.telemetry import build_event, build_metric, build_telemetry_packet
from esper.leyline import new_message_id, pb
from esper.oona import OonaClient, OonaMetrics, OonaSettings
from esper.oona.errors import EmergencyRateLimitedError
from esper.oona.ratelimit import TokenBucket
from esper.tolaria.instruments import TolariaMetrics
from esper.tolaria.settings import TolariaSettings

__all__ = [
    "EVENT_DROPPED",
    "EVENT_ESCALATED",
    "EVENT_HALT",
    "LEVELS",
    "ORIGIN",
    "DropReason",
    "EmergencyController",
    "EmergencyLevel",
    "EmergencyPublisher",
    "EmergencyState",
    "EmergencyStats",
    "Escalation",
    "SpillStore",
    "build_signal",
    "epoch_failure_level",
    "escalation_event",
    "level_name",
]

EmergencyLevel: TypeAlias = pb.EmergencyLevel.ValueType
LEVELS: Final[tuple[EmergencyLevel, ...]] = (
    pb.EMERGENCY_LEVEL_NOTICE, pb.EMERGENCY_LEVEL_ELEVATED, pb.EMERGENCY_LEVEL_CONSERVATIVE, pb.EMERGENCY_LEVEL_HALT,
)
ORIGIN: Final = "tolaria"
EMERGENCY_CHANNEL: Final = "emergency"
TELEMETRY_CHANNEL: Final = "telemetry"
EVENT_ESCALATED: Final = "tolaria.emergency.escalated"
EVENT_HALT: Final = "tolaria.emergency.halt"
EVENT_DROPPED: Final = "tolaria.emergency.dropped"
MAX_REASON_CHARS: Final = 512
MAX_ATTRIBUTES: Final = 16
MAX_ATTRIBUTE_CHARS: Final = 256

DropReason = Literal["queue_full", "spill_full", "corrupt"]

log = get_logger("esper.tolaria.emergency")


def level_name(level: int) -> str:
    return pb.EmergencyLevel.Name(pb.EmergencyLevel.ValueType(level)).removeprefix("EMERGENCY_LEVEL_")


def _check_level(level: int) -> EmergencyLevel:
    if level not in LEVELS:
        raise ValueError(f"not an emergency level: {level!r}; expected one of NOTICE..HALT ({list(LEVELS)})")
    return pb.EmergencyLevel.ValueType(level)


def epoch_failure_level(reason: str) -> EmergencyLevel:
    """Prototype rule for an epoch failure: CONSERVATIVE (L3) for breaker_open, otherwise ELEVATED (L2)."""
    return pb.EMERGENCY_LEVEL_CONSERVATIVE if reason == "breaker_open" else pb.EMERGENCY_LEVEL_ELEVATED


def build_signal(level: int, reason: str, *, run_id: str, origin: str = ORIGIN,
                 attributes: Mapping[str, object] | None = None) -> pb.EmergencySignal:
    """An `EmergencySignal` stamped now; reason and attributes are bounded so it always fits an envelope."""
    attrs = {str(k)[:64]: str(v)[:MAX_ATTRIBUTE_CHARS] for k, v in list((attributes or {}).items())[:MAX_ATTRIBUTES]}
    sig = pb.EmergencySignal(version=1, level=_check_level(level), reason=reason[:MAX_REASON_CHARS], origin=origin,
                             monotonic_time_ms=time.monotonic_ns() // 1_000_000, run_id=run_id, attributes=attrs)
    sig.triggered_at.FromNanoseconds(time.time_ns())
    return sig


# -- the rule ----------------------------------------------------------------------------------------


class EmergencyState:
    """The current level; `request` raises it only upward. Pure."""

    __slots__ = ("escalations", "ignored", "level", "reason")

    def __init__(self) -> None:
        self.level: EmergencyLevel = pb.EMERGENCY_LEVEL_UNSPECIFIED
        self.reason = ""
        self.escalations = 0
        self.ignored = 0  # requests at or below the current level

    @property
    def halted(self) -> bool:
        return self.level >= pb.EMERGENCY_LEVEL_HALT

    def request(self, level: int, reason: str) -> bool:
        """True (and the level raised) only when `level` is above the current one; ValueError on a non-level."""
        lv = _check_level(level)
        if lv <= self.level:
            self.ignored += 1
            return False
        self.level, self.reason = lv, reason
        self.escalations += 1
        return True


@dataclass(frozen=True, slots=True)
class Escalation:
    previous: EmergencyLevel
    level: EmergencyLevel
    reason: str
    signal: pb.EmergencySignal

    @property
    def halt(self) -> bool:
        return self.level >= pb.EMERGENCY_LEVEL_HALT


def escalation_event(esc: Escalation) -> pb.TelemetryEvent:
    """The telemetry event for an escalation: `tolaria.emergency.halt` (CRITICAL) or `.escalated` (WARNING)."""
    return build_event(EVENT_HALT if esc.halt else EVENT_ESCALATED,
                       level=pb.TELEMETRY_LEVEL_CRITICAL if esc.halt else pb.TELEMETRY_LEVEL_WARNING,
                       description=f"emergency {level_name(esc.previous) if esc.previous else 'NONE'} -> "
                                   f"{level_name(esc.level)}: {esc.reason}",
                       level_from=int(esc.previous), level_to=int(esc.level), reason=esc.reason)


# -- the disk queue ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    seq: int
    message_id: str
    signal: pb.EmergencySignal
    on_disk: bool = False


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spill (
    seq INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    spilled_at_ms INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""


class SpillStore:
    """Signals waiting on disk, ordered by `seq`. SQLite WAL + synchronous=FULL: a committed row
    survives kill -9 and power loss. One connection; callers serialise access (the publisher's lock).

    Damage never stops delivery: a file SQLite cannot read is moved aside (`quarantined` names where)
    and a fresh one started; a row whose payload does not decode is deleted by `head` and counted in
    `corrupt_rows`. Either would otherwise kill the publisher at every start, HALT signals included."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.quarantined: Path | None = None
        self.corrupt_rows = 0
        try:
            self._db = self._open(path)
        except sqlite3.OperationalError:
            raise  # locked, read-only, I/O: the file may be fine (and in use); moving it aside would lose it
        except sqlite3.DatabaseError as e:  # not a database, malformed
            self.quarantined = path.with_name(f"{path.name}.corrupt-{time.time_ns() // 1_000_000}")
            for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if part.exists():
                    part.rename(part.with_name(self.quarantined.name + part.name.removeprefix(path.name)))
            log.error("emergency spill file unreadable; moved aside, starting a fresh one", path=str(path),
                      moved_to=str(self.quarantined), error=str(e))
            self._db = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM spill").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        self._db.close()

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM spill").fetchone()[0])

    def max_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM spill").fetchone()[0])

    def head(self) -> _Item | None:
        """The oldest row that decodes; undecodable rows before it are deleted (`corrupt_rows`)."""
        while (row := self._db.execute("SELECT seq, message_id, payload FROM spill ORDER BY seq LIMIT 1"
                                       ).fetchone()) is not None:
            try:
                return _Item(int(row[0]), str(row[1]), pb.EmergencySignal.FromString(row[2]), on_disk=True)
            except (DecodeError, TypeError, ValueError) as e:
                self.delete(int(row[0]))
                self.corrupt_rows += 1
                log.error("undecodable emergency signal in the spill file deleted", seq=int(row[0]), error=str(e))
        return None

    def seqs(self) -> list[int]:
        return [int(r[0]) for r in self._db.execute("SELECT seq FROM spill ORDER BY seq")]

    def append(self, items: list[_Item], *, cap: int) -> int:
        """Store `items` (seq order) in one transaction, dropping the oldest rows beyond `cap`; returns drops."""
        now = time.time_ns() // 1_000_000
        self._db.execute("BEGIN IMMEDIATE")
        try:
            count = self.count()
            overflow = max(0, count + len(items) - cap)
            from_disk = min(overflow, count)
            if from_disk:
                self._db.execute("DELETE FROM spill WHERE seq IN (SELECT seq FROM spill ORDER BY seq LIMIT ?)",
                                 (from_disk,))
            self._db.executemany(
                "INSERT OR REPLACE INTO spill (seq, message_id, spilled_at_ms, payload) VALUES (?, ?, ?, ?)",
                [(i.seq, i.message_id, now, i.signal.SerializeToString(deterministic=True))
                 for i in items[overflow - from_disk:]],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return overflow

    def delete(self, seq: int) -> None:
        self._db.execute("DELETE FROM spill WHERE seq = ?", (seq,))


# -- the publisher -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmergencyStats:
    submitted: int
    published: int
    pending_memory: int
    pending_disk: int
    spilled: int  # signals ever moved to disk
    rate_limited: int  # signals that had to wait for the rate cap
    publish_failures: int
    dropped: dict[str, int] = field(default_factory=dict)  # by DropReason
    drops_reported: int = 0  # drops announced by a telemetry event
    connected: bool = False  # the last publish attempt succeeded
    alive: bool = False  # the publisher thread runs
    last_error: str | None = None

    @property
    def pending(self) -> int:
        return self.pending_memory + self.pending_disk

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


ClientFactory = Callable[[], OonaClient]


class EmergencyPublisher:
    """Delivers EmergencySignals on `emergency` from a background thread (module docstring)."""

    def __init__(self, settings: OonaSettings, *, spill_path: Path, max_per_min: int = 60, memory_cap: int = 64,
                 spill_cap: int = 10_000, sender: str = ORIGIN, metrics: TolariaMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, retry_initial_s: float = 0.05,
                 retry_max_s: float = 1.0, client_factory: ClientFactory | None = None) -> None:
        if memory_cap < 1 or spill_cap < 1:
            raise ValueError("memory_cap and spill_cap must be >= 1")
        settings.require_redis_url()  # configuration errors surface here, on the caller's thread
        settings.signing_keys()
        self._client_factory: ClientFactory = client_factory or (
            lambda: OonaClient.from_settings(settings, sender=sender, metrics=OonaMetrics()))
        self._sender = sender
        self._memory_cap = memory_cap
        self._hard_cap = max(4 * memory_cap, memory_cap + 64)  # bursts fit while the thread spills
        self._spill_cap = spill_cap
        self._metrics = metrics
        self._bucket = TokenBucket(max_per_min, clock=clock)
        self._rate_per_s = max_per_min / 60.0
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s

        self._spill = SpillStore(spill_path)
        self._db_lock = threading.Lock()  # the SQLite connection (publisher thread, close())
        self._lock = threading.Lock()  # memory queue and counters: held for microseconds, trainer-safe
        self._changed = threading.Condition(self._lock)
        self._memory: deque[_Item] = deque()
        self._disk_count = self._spill.count()
        self._next_seq = self._spill.max_seq() + 1
        self._submitted = self._published = self._spilled = self._rate_limited = self._failures = 0
        self._dropped: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()
        self._connected = False
        self._last_error: str | None = None
        self._waiting_seq = -1  # head seq already counted as rate limited

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._stopping = False
        self._closed = False
        if self._spill.quarantined is not None:  # counted once: how many signals it held is unknowable
            self._last_error = f"spill file unreadable, moved to {self._spill.quarantined}"
            self._drop("corrupt", 1, self._last_error)
        if self._disk_count:
            log.warning("emergency signals waiting on disk from an earlier run", count=self._disk_count,
                        path=str(spill_path))
        self._gauge()

    @classmethod
    def from_settings(cls, settings: TolariaSettings, *, metrics: TolariaMetrics | None = None
                      ) -> EmergencyPublisher:
        """Rate cap, queue and spill caps and spill file from TOLARIA_* (not started yet)."""
        return cls(settings, spill_path=settings.emergency_spill_path,
                   max_per_min=settings.emergency_bypass_max_per_min, memory_cap=settings.emergency_queue_cap,
                   spill_cap=settings.emergency_spill_cap, sender=settings.service_name, metrics=metrics)

    # -- trainer side ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the delivery thread (waits at most a few seconds for its loop to exist)."""
        if self._thread is not None or self._closed:
            raise RuntimeError("publisher already started or closed")
        self._thread = threading.Thread(target=self._thread_main, name="tolaria-emergency", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=5.0)

    def submit(self, signal: pb.EmergencySignal) -> int:
        """Queue `signal`; returns its sequence number. Never blocks on Redis or the disk."""
        item = _Item(0, new_message_id(), signal)
        with self._lock:
            if self._closed:
                raise RuntimeError("emergency publisher is closed")
            item.seq = self._next_seq
            self._next_seq += 1
            self._submitted += 1
            self._memory.append(item)
            while len(self._memory) > self._hard_cap:  # the thread is wedged: memory stays bounded
                lost = self._memory.popleft()
                self._drop("queue_full", 1, f"seq {lost.seq} level {level_name(lost.signal.level)}")
        self._poke()
        return item.seq

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._memory) + self._disk_count

    def stats(self) -> EmergencyStats:
        with self._lock:
            return EmergencyStats(
                submitted=self._submitted, published=self._published, pending_memory=len(self._memory),
                pending_disk=self._disk_count, spilled=self._spilled, rate_limited=self._rate_limited,
                publish_failures=self._failures, dropped=dict(self._dropped),
                drops_reported=sum(self._reported.values()),
                connected=self._connected, alive=self._thread is not None and self._thread.is_alive(),
                last_error=self._last_error)

    def flush(self, timeout_s: float) -> bool:
        """Wait until nothing is pending (True) or `timeout_s` passes (False). For shutdown/HALT, not the step."""
        end = time.monotonic() + timeout_s
        with self._changed:
            while len(self._memory) + self._disk_count > 0:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.05))
        return True

    def wake(self) -> None:
        """Make the thread re-check its queue now (e.g. after the injected clock moved)."""
        self._poke()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, then move what is left in memory to the spill file (nothing pending is lost)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopping = True
        self._poke()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.error("emergency publisher thread did not stop in time; spilling what memory holds anyway",
                          timeout_s=timeout_s)
        with self._lock:
            left = list(self._memory)
            self._memory.clear()
        if left:
            self._store(left)
        self._gauge()
        if thread is None or not thread.is_alive():
            with self._db_lock:
                self._spill.close()

    # -- bookkeeping (call with self._lock held where noted) ---------------------------------------

    def _drop(self, reason: DropReason, n: int, detail: str) -> None:  # lock held
        if n <= 0:
            return
        self._dropped[reason] += n
        if self._metrics is not None:
            self._metrics.emergency_dropped.labels(reason).inc(n)
        log.error("emergency signals dropped", reason=reason, count=n, detail=detail)

    def _gauge(self) -> None:
        if self._metrics is not None:
            with self._lock:
                mem, disk = len(self._memory), self._disk_count
            self._metrics.emergency_pending.labels("memory").set(mem)
            self._metrics.emergency_pending.labels("disk").set(disk)

    def _poke(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(self._set_wake)

    def _set_wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _store(self, items: list[_Item]) -> bool:
        """Append `items` to the spill file; False (and items back at the memory head) if SQLite fails."""
        try:
            with self._db_lock:
                dropped = self._spill.append(items, cap=self._spill_cap)
        except sqlite3.Error as e:
            with self._lock:
                self._memory.extendleft(reversed(items))
                self._last_error = f"spill failed: {e}"
            log.error("emergency spill to disk failed; signals stay in memory", error=str(e))
            return False
        with self._lock:
            self._disk_count = min(self._spill_cap, self._disk_count + len(items))
            self._spilled += len(items)
            self._drop("spill_full", dropped, f"spill file holds {self._spill_cap} signals")
        if self._metrics is not None:
            self._metrics.emergency_spilled.inc(len(items))
        return True

    def _spill_overflow(self) -> None:
        """Memory past its cap goes to disk; while publishing fails (an outage) all of it does. The
        trainer escalates a few times a run at most, so the cap alone would keep every signal of an
        outage in memory, and a kill -9 before Redis came back would lose them without a count."""
        with self._lock:
            outage = not self._connected and self._failures > 0
            n = len(self._memory) - (0 if outage else self._memory_cap)
            moving = [self._memory.popleft() for _ in range(n)] if n > 0 else []
        if moving and self._store(moving):
            self._gauge()

    def _head(self) -> _Item | None:
        with self._lock:
            on_disk = self._disk_count > 0
        if on_disk:
            with self._db_lock:
                before = self._spill.corrupt_rows
                item = self._spill.head()
                corrupt = self._spill.corrupt_rows - before
            if corrupt:
                with self._lock:
                    self._disk_count -= corrupt
                    self._drop("corrupt", corrupt, f"{corrupt} undecodable rows in {self._spill.path}")
                self._gauge()
            if item is not None:
                return item
        with self._lock:
            return self._memory[0] if self._memory else None

    def _ack(self, item: _Item) -> None:
        if item.on_disk:
            with self._db_lock:
                self._spill.delete(item.seq)
        with self._changed:
            if item.on_disk:
                self._disk_count -= 1
            elif self._memory and self._memory[0].seq == item.seq:
                self._memory.popleft()
            self._published += 1
            self._connected = True
            self._changed.notify_all()
        if self._metrics is not None:
            self._metrics.emergency_published.inc()
        self._gauge()

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            self._failures += 1
            first = self._connected or self._last_error is None
            self._connected = False
            self._last_error = f"{type(error).__name__}: {error}"
        if self._metrics is not None:
            self._metrics.emergency_publish_failures.inc()
        if first:
            log.warning("emergency publish failed; queueing until Redis is back", error=str(error))

    def _unreported(self) -> dict[str, int]:
        with self._lock:
            return {r: n - self._reported[r] for r, n in self._dropped.items() if n > self._reported[r]}

    # -- the thread --------------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # never silent: the stats and the log say the publisher died
            with self._lock:
                self._last_error = f"publisher thread died: {type(e).__name__}: {e}"
            log.exception("emergency publisher thread died")
        finally:
            self._ready.set()

    async def _sleep(self, timeout_s: float | None) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    def _rate_wait_s(self) -> float:
        tokens = self._bucket.tokens
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate_per_s

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._ready.set()
        client = self._client_factory()
        backoff = self._retry_initial_s
        try:
            while not self._stopping:
                self._wake.clear()
                self._spill_overflow()
                item = self._head()
                if item is None:
                    if self._unreported() and not await self._report_drops(client):
                        await self._sleep(backoff)
                        backoff = min(backoff * 2, self._retry_max_s)
                    else:
                        await self._sleep(None)
                    continue
                wait_s = self._rate_wait_s()
                if wait_s > 0:
                    self._note_rate_limited(item.seq)
                    await self._sleep(min(wait_s, self._retry_max_s))
                    continue
                priority = (pb.MESSAGE_PRIORITY_CRITICAL if item.signal.level >= pb.EMERGENCY_LEVEL_HALT
                            else pb.MESSAGE_PRIORITY_HIGH)
                try:
                    await client.publish(EMERGENCY_CHANNEL, item.signal, priority=priority,
                                         message_id=item.message_id)
                except EmergencyRateLimitedError as e:  # the bus's own emergency bucket: wait, keep order
                    self._failed(e)
                    await self._sleep(self._retry_max_s)
                    continue
                except Exception as e:  # PublishError, breaker open, Redis errors: an outage, retry the head
                    self._failed(e)
                    self._spill_overflow()  # now, not after the backoff: what waits in memory goes to disk
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self._retry_max_s)
                    continue
                self._bucket.try_take()
                self._ack(item)
                backoff = self._retry_initial_s
                if self._unreported():
                    await self._report_drops(client)
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    def _note_rate_limited(self, seq: int) -> None:
        with self._lock:
            if self._waiting_seq == seq:
                return
            self._waiting_seq = seq
            self._rate_limited += 1
        if self._metrics is not None:
            self._metrics.emergency_rate_limited.inc()

    async def _report_drops(self, client: OonaClient) -> bool:
        """Announce drops not yet reported: one HIGH telemetry packet; True once it is written."""
        drops = self._unreported()
        if not drops:
            return True
        total = sum(drops.values())
        event = build_event(EVENT_DROPPED, level=pb.TELEMETRY_LEVEL_ERROR,
                            description=f"{total} emergency signals dropped while Redis was unreachable",
                            dropped=total, **{f"dropped_{r}": n for r, n in sorted(drops.items())})
        packet = build_telemetry_packet(self._sender, events=[event],
                                        metrics=[build_metric("tolaria.emergency.dropped", float(total))],
                                        indicators={"priority": "MESSAGE_PRIORITY_HIGH"})
        try:
            await client.publish(TELEMETRY_CHANNEL, packet, priority=pb.MESSAGE_PRIORITY_HIGH)
        except Exception as e:
            self._failed(e)
            return False
        with self._lock:
            self._reported.update(drops)
        return True


# -- the trainer's handle ----------------------------------------------------------------------------


class EmergencyController:
    """Levels only go up; each escalation is one signal for the publisher. `halted` stops training."""

    def __init__(self, *, run_id: str, origin: str = ORIGIN, publisher: EmergencyPublisher | None = None,
                 metrics: TolariaMetrics | None = None) -> None:
        self.run_id = run_id
        self.origin = origin
        self.publisher = publisher
        self.metrics = metrics
        self._state = EmergencyState()
        self._history: list[Escalation] = []

    @property
    def level(self) -> EmergencyLevel:
        return self._state.level

    @property
    def reason(self) -> str:
        return self._state.reason

    @property
    def halted(self) -> bool:
        """HALT reached: the loop checkpoints, flushes the publisher and stops."""
        return self._state.halted

    @property
    def ignored(self) -> int:
        return self._state.ignored

    @property
    def history(self) -> tuple[Escalation, ...]:
        return tuple(self._history)

    def escalate(self, level: int, reason: str, *, attributes: Mapping[str, object] | None = None
                 ) -> Escalation | None:
        """Raise the level to `level` and broadcast it; None (counted) when `level` is not above the current."""
        previous = self._state.level
        if not self._state.request(level, reason):
            if self.metrics is not None:
                self.metrics.emergency_ignored.inc()
            log.info("emergency request ignored: levels only go up", requested=level_name(level),
                     current=level_name(previous) if previous else "NONE", reason=reason)
            return None
        signal = build_signal(level, reason, run_id=self.run_id, origin=self.origin, attributes=attributes)
        esc = Escalation(previous, self._state.level, reason, signal)
        self._history.append(esc)
        if self.metrics is not None:
            self.metrics.record_level(esc.level)
        log.warning("emergency escalated", level=level_name(esc.level), reason=reason, halt=esc.halt)
        if self.publisher is not None:
            self.publisher.submit(signal)
        return esc

    def events(self, escalations: Iterable[Escalation] | None = None) -> list[pb.TelemetryEvent]:
        """Telemetry events for `escalations` (all so far by default)."""
        return [escalation_event(e) for e in (self._history if escalations is None else escalations)]
