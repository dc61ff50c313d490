"""Emergencies: escalation only upward, rate cap, and delivery through a real Redis outage.

Outage tests run their own `redis-server` (EmbeddedRedis) so they can stop and restart it; waits are
liveness bounds (`wait_for`), never timing assertions. The rate cap runs on an injected clock.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from redis import Redis as SyncRedis

from esper.core.redis_server import EmbeddedRedis
from esper.leyline import CHANNELS, pb, unpack_as
from esper.leyline.codec import decode_envelope
from esper.oona import OonaSettings
from esper.tolaria.emergency import (
    EVENT_DROPPED,
    EVENT_HALT,
    MAX_REASON_CHARS,
    EmergencyController,
    EmergencyPublisher,
    EmergencyState,
    SpillStore,
    build_signal,
    epoch_failure_level,
    level_name,
)
from esper.tolaria.instruments import TolariaMetrics
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer

NOTICE, ELEVATED = pb.EMERGENCY_LEVEL_NOTICE, pb.EMERGENCY_LEVEL_ELEVATED
CONSERVATIVE, HALT = pb.EMERGENCY_LEVEL_CONSERVATIVE, pb.EMERGENCY_LEVEL_HALT


def wait_for(pred: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Poll until `pred()`; a liveness bound, not a performance assertion."""
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def emergency_signals(url: str) -> list[tuple[pb.BusEnvelope, pb.EmergencySignal]]:
    with SyncRedis.from_url(url) as r:
        entries = r.xrange(CHANNELS["emergency"].emergency_stream)
    out = []
    for _id, fields in entries:
        env = decode_envelope(fields[b"payload"])
        out.append((env, unpack_as(env, pb.EmergencySignal)))
    return out


def reasons(url: str) -> list[str]:
    return [s.reason for _, s in emergency_signals(url)]


def sig(reason: str, level: int = NOTICE) -> pb.EmergencySignal:
    return build_signal(level, reason, run_id="run-t")


# -- the rule (pure) ---------------------------------------------------------------------------------


def test_levels_only_go_up_and_lower_requests_are_counted() -> None:
    state = EmergencyState()
    assert state.request(ELEVATED, "epoch_budget") and state.level == ELEVATED
    assert not state.request(NOTICE, "late notice")  # lower: ignored
    assert not state.request(ELEVATED, "again")  # equal: ignored
    assert state.request(CONSERVATIVE, "breaker_open") and not state.halted
    assert state.request(HALT, "rollback_deadline") and state.halted
    assert not state.request(CONSERVATIVE, "after halt")
    assert (state.level, state.reason, state.escalations, state.ignored) == (HALT, "rollback_deadline", 3, 3)
    with pytest.raises(ValueError, match="not an emergency level"):
        state.request(pb.EMERGENCY_LEVEL_UNSPECIFIED, "x")
    with pytest.raises(ValueError):
        state.request(7, "x")


def test_controller_builds_signals_events_and_metrics_without_a_publisher() -> None:
    metrics = TolariaMetrics(CollectorRegistry())
    ctl = EmergencyController(run_id="run-c", metrics=metrics)
    esc = ctl.escalate(CONSERVATIVE, "breaker_open", attributes={"epoch": 3})
    assert esc is not None and esc.previous == pb.EMERGENCY_LEVEL_UNSPECIFIED and not esc.halt
    s = esc.signal
    assert (s.level, s.reason, s.origin, s.run_id, dict(s.attributes)) == (
        CONSERVATIVE, "breaker_open", "tolaria", "run-c", {"epoch": "3"})
    assert s.triggered_at.ToNanoseconds() > 0 and s.monotonic_time_ms > 0
    assert ctl.escalate(ELEVATED, "epoch_budget") is None and ctl.ignored == 1
    halt = ctl.escalate(HALT, "rollback_deadline")
    assert halt is not None and halt.halt and ctl.halted and ctl.level == HALT
    events = ctl.events()
    assert [e.attributes["event"] for e in events] == ["tolaria.emergency.escalated", EVENT_HALT]
    assert events[1].level == pb.TELEMETRY_LEVEL_CRITICAL
    assert metrics.emergency_level._value.get() == HALT and metrics.emergency_halt._value.get() == 1
    assert metrics.emergency_ignored._value.get() == 1
    assert epoch_failure_level("breaker_open") == CONSERVATIVE and epoch_failure_level("hook_budget") == ELEVATED
    assert level_name(HALT) == "HALT"
    long = build_signal(NOTICE, "r" * 10_000, run_id="x", attributes={f"k{i}": "v" * 999 for i in range(99)})
    assert len(long.reason) == MAX_REASON_CHARS and len(long.attributes) == 16


def test_spill_store_keeps_order_and_drops_the_oldest_past_its_cap(tmp_path: Path) -> None:
    from esper.tolaria.emergency import _Item

    store = SpillStore(tmp_path / "spill.db")
    assert store.append([_Item(i, f"m{i}", sig(f"r{i}")) for i in (1, 2, 3)], cap=4) == 0
    assert store.append([_Item(i, f"m{i}", sig(f"r{i}")) for i in (4, 5, 6)], cap=4) == 2
    assert store.seqs() == [3, 4, 5, 6]
    assert store.append([_Item(i, f"m{i}", sig(f"r{i}")) for i in range(7, 13)], cap=4) == 6
    assert store.seqs() == [9, 10, 11, 12]
    store.close()
    again = SpillStore(tmp_path / "spill.db")
    head = again.head()
    assert head is not None and (head.seq, head.message_id, head.signal.reason, head.on_disk) == (9, "m9", "r9", True)
    assert again.max_seq() == 12 and again.count() == 4


def _offline_settings() -> OonaSettings:
    return OonaSettings(redis_url="redis://127.0.0.1:1/0", leyline_secret=secrets.token_hex(16), metrics_port=-1)


def test_wedged_publisher_keeps_memory_bounded_and_close_persists_the_rest(tmp_path: Path) -> None:
    spill = tmp_path / "spill.db"
    metrics = TolariaMetrics(CollectorRegistry())
    pub = EmergencyPublisher(_offline_settings(), spill_path=spill, memory_cap=2, metrics=metrics)  # never started
    for i in range(1, 68):
        assert pub.submit(sig(f"r{i}")) == i  # returns at once; nothing drains
    stats = pub.stats()
    assert stats.dropped == {"queue_full": 1} and stats.pending == 66 and not stats.alive
    assert metrics.emergency_dropped.labels("queue_full")._value.get() == 1
    pub.close()
    with pytest.raises(RuntimeError, match="closed"):
        pub.submit(sig("late"))
    reopened = EmergencyPublisher(_offline_settings(), spill_path=spill)
    assert reopened.stats().pending_disk == 66 and reopened.submit(sig("next")) == 68
    head = SpillStore(spill).head()
    assert head is not None and head.signal.reason == "r2"  # r1 was the one dropped
    reopened.close()


def test_from_settings_uses_the_tolaria_knobs(tmp_path: Path) -> None:
    settings = TolariaSettings(redis_url="redis://127.0.0.1:1/0", leyline_secret="s" * 32, var_dir=tmp_path,
                               emergency_queue_cap=1, emergency_spill_cap=1, metrics_port=-1)
    pub = EmergencyPublisher.from_settings(settings)
    for i in range(3):
        pub.submit(sig(f"r{i}"))
    pub.close()  # 3 in memory, spill cap 1: two dropped, counted
    assert pub.stats().dropped == {"spill_full": 2}
    assert SpillStore(settings.emergency_spill_path).seqs() == [3]


def test_unsigned_settings_are_refused_on_the_callers_thread(tmp_path: Path) -> None:
    from esper.core.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="SECRET"):
        EmergencyPublisher(OonaSettings(redis_url="redis://127.0.0.1:1/0", metrics_port=-1),
                           spill_path=tmp_path / "s.db")


# -- delivery against a real Redis -------------------------------------------------------------------


@pytest.fixture
def publishers() -> Iterator[list[EmergencyPublisher]]:
    made: list[EmergencyPublisher] = []
    yield made
    for p in made:
        p.close(timeout_s=5.0)


def test_an_undecodable_spilled_row_is_dropped_and_counted_not_fatal(
        settings: OonaSettings, redis_url: str, tmp_path: Path, publishers: list[EmergencyPublisher]) -> None:
    """A damaged row at the head used to raise out of the publisher thread at every start: no later
    signal, HALT included, went out again."""
    from esper.tolaria.emergency import _Item

    spill = tmp_path / "spill.db"
    store = SpillStore(spill)
    store.append([_Item(1, "m1", sig("r1")), _Item(2, "m2", sig("r2")), _Item(3, "m3", sig("r3"))], cap=10)
    store._db.execute("UPDATE spill SET payload = ? WHERE seq = 2", (b"\xff\xff\xff\xff not protobuf",))
    store.close()
    metrics = TolariaMetrics(CollectorRegistry())
    pub = EmergencyPublisher(settings, spill_path=spill, metrics=metrics)
    publishers.append(pub)
    pub.start()
    pub.submit(sig("halt", HALT))
    assert pub.flush(15.0)
    assert reasons(redis_url) == ["r1", "r3", "halt"]
    stats = pub.stats()
    assert (stats.alive, stats.published, stats.dropped, stats.pending) == (True, 3, {"corrupt": 1}, 0)
    assert metrics.emergency_dropped.labels("corrupt")._value.get() == 1
    assert SpillStore(spill).count() == 0


def test_an_unreadable_spill_file_is_moved_aside_and_delivery_goes_on(
        settings: OonaSettings, redis_url: str, tmp_path: Path, publishers: list[EmergencyPublisher]) -> None:
    spill = tmp_path / "spill.db"
    spill.write_bytes(b"not a database " * 512)
    pub = EmergencyPublisher(settings, spill_path=spill)
    publishers.append(pub)
    moved = [p.name for p in tmp_path.iterdir() if p.name.startswith("spill.db.corrupt-")]
    assert len(moved) == 1 and (tmp_path / moved[0]).read_bytes() == b"not a database " * 512  # kept, not deleted
    stats = pub.stats()
    assert stats.dropped == {"corrupt": 1} and stats.last_error is not None and moved[0] in stats.last_error
    pub.start()
    pub.submit(sig("after", NOTICE))
    assert pub.flush(15.0) and reasons(redis_url) == ["after"]


def test_a_busy_spill_file_is_an_error_not_moved_aside(tmp_path: Path) -> None:
    """Only damage quarantines the file: one locked by another connection (a previous process still
    writing) is fine, and moving it (and its -wal) aside would lose what it holds. Waits SQLite's 5 s."""
    import sqlite3

    from esper.tolaria.emergency import _Item

    spill = tmp_path / "spill.db"
    holder = SpillStore(spill)
    holder.append([_Item(1, "m1", sig("r1"))], cap=10)
    holder._db.execute("PRAGMA locking_mode=EXCLUSIVE")  # another process holding the file
    holder._db.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        SpillStore(spill)
    holder._db.execute("COMMIT")
    holder.close()
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert SpillStore(spill).seqs() == [1]


def test_controller_broadcasts_escalations_in_order_on_the_emergency_lane(
        settings: OonaSettings, redis_url: str, tmp_path: Path, publishers: list[EmergencyPublisher]) -> None:
    pub = EmergencyPublisher(settings, spill_path=tmp_path / "spill.db")
    publishers.append(pub)
    pub.start()
    ctl = EmergencyController(run_id="run-x", publisher=pub)
    ctl.escalate(NOTICE, "loss_spike")
    ctl.escalate(ELEVATED, "epoch_budget")
    assert ctl.escalate(NOTICE, "ignored") is None
    ctl.escalate(HALT, "rollback_deadline")
    assert ctl.halted
    assert pub.flush(15.0)
    got = emergency_signals(redis_url)
    assert [(s.level, s.reason) for _, s in got] == [(NOTICE, "loss_spike"), (ELEVATED, "epoch_budget"),
                                                     (HALT, "rollback_deadline")]
    assert [env.priority for env, _ in got] == [pb.MESSAGE_PRIORITY_HIGH, pb.MESSAGE_PRIORITY_HIGH,
                                                pb.MESSAGE_PRIORITY_CRITICAL]
    assert all(env.sender == "tolaria" and env.signature for env, _ in got)
    stats = pub.stats()
    assert (stats.published, stats.pending, stats.dropped, stats.connected) == (3, 0, {}, True)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_cap_holds_signals_back_in_order_and_releases_them_as_tokens_refill(
        settings: OonaSettings, redis_url: str, tmp_path: Path, publishers: list[EmergencyPublisher]) -> None:
    clock = ManualClock()
    metrics = TolariaMetrics(CollectorRegistry())
    pub = EmergencyPublisher(settings, spill_path=tmp_path / "spill.db", max_per_min=3, clock=clock,
                             retry_max_s=0.02, metrics=metrics)
    publishers.append(pub)
    pub.start()
    for i in range(1, 6):
        pub.submit(sig(f"r{i}"))
    wait_for(lambda: pub.stats().published == 3 and pub.stats().rate_limited == 1, "three through, one waiting")
    assert not pub.flush(0.2)  # the clock stands still: no token, the rest keeps waiting (not dropped)
    assert pub.stats().pending == 2 and pub.stats().dropped == {}
    clock.now += 20.0  # 3/min refills one token every 20 s
    pub.wake()
    wait_for(lambda: pub.stats().published == 4, "one more after 20 s")
    clock.now += 20.0
    pub.wake()
    assert pub.flush(15.0)
    assert reasons(redis_url) == ["r1", "r2", "r3", "r4", "r5"]
    assert metrics.emergency_rate_limited._value.get() == 2 and metrics.emergency_published._value.get() == 5


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    yield server
    server.stop()


def _outage_settings(server: EmbeddedRedis) -> OonaSettings:
    return OonaSettings(redis_url=server.url, leyline_secret=secrets.token_hex(16), metrics_port=-1,
                        breaker_reset_s=0.1, socket_timeout_s=1.0, connect_timeout_s=0.5)


def test_outage_queues_spills_survives_an_emitter_restart_and_flushes_in_order(
        own_redis: EmbeddedRedis, tmp_path: Path, publishers: list[EmergencyPublisher]) -> None:
    settings = _outage_settings(own_redis)
    spill = tmp_path / "spill.db"
    own_redis.start()
    first = EmergencyPublisher(settings, spill_path=spill, memory_cap=2, retry_max_s=0.05)
    publishers.append(first)
    first.start()
    first.submit(sig("r0"))
    assert first.flush(15.0) and reasons(own_redis.url) == ["r0"]

    own_redis.stop()  # Redis goes away (no persistence: it comes back empty)
    for i in range(1, 6):
        first.submit(sig(f"r{i}", ELEVATED))
    wait_for(lambda: first.stats().pending_disk == 5 and first.stats().publish_failures > 0,
             "publishes failing: all five on disk, not only the three past the memory cap of two")
    stats = first.stats()
    assert (stats.pending_memory, stats.spilled, stats.dropped, stats.connected) == (0, 5, {}, False)
    assert SpillStore(spill).count() == 5  # what a kill -9 now would leave: every signal

    first.close()  # the emitter restarts while Redis is still down
    assert SpillStore(spill).count() == 5
    second = EmergencyPublisher(settings, spill_path=spill, memory_cap=2, retry_max_s=0.05)
    publishers.append(second)
    assert second.stats().pending_disk == 5
    second.submit(sig("r6", HALT))
    second.start()
    wait_for(lambda: second.stats().publish_failures > 0, "the new emitter finds Redis down")

    own_redis.start()  # back on the same port
    assert second.flush(15.0)
    assert reasons(own_redis.url) == ["r1", "r2", "r3", "r4", "r5", "r6"]
    stats = second.stats()
    assert (stats.published, stats.pending, stats.dropped, stats.connected) == (6, 0, {}, True)
    assert SpillStore(spill).count() == 0


def _trainer_with(pub: EmergencyPublisher, tmp_path: Path) -> Trainer:
    """A static trainer whose emergency controller delivers through `pub` (the run summary reads it)."""
    trainer = Trainer(TolariaSettings(var_dir=tmp_path / "tolaria", epochs=1, hidden_width=8, metrics_port=-1),
                      bus=None)
    trainer.emergency = EmergencyController(run_id="run-summary", publisher=pub)
    return trainer


def test_drops_past_the_spill_cap_are_counted_and_reported_once_redis_is_back(
        own_redis: EmbeddedRedis, tmp_path: Path, publishers: list[EmergencyPublisher]) -> None:
    metrics = TolariaMetrics(CollectorRegistry())
    pub = EmergencyPublisher(_outage_settings(own_redis), spill_path=tmp_path / "spill.db", memory_cap=1,
                             spill_cap=2, retry_max_s=0.05, metrics=metrics)
    publishers.append(pub)
    pub.start()  # Redis is not running yet
    for i in range(1, 6):
        pub.submit(sig(f"r{i}", CONSERVATIVE))
    # During the outage everything goes to disk, so the spill cap bounds what is kept.
    wait_for(lambda: pub.stats().dropped == {"spill_full": 3} and pub.stats().pending == 2,
             "three oldest dropped past the spill cap")
    assert metrics.emergency_dropped.labels("spill_full")._value.get() == 3

    summary = _trainer_with(pub, tmp_path).summary(clean_shutdown=True)  # the run's record says so too
    assert (summary["emergency_signals_pending"], summary["emergency_signals_dropped"]) == (2, {"spill_full": 3})
    assert summary["emergency_signals_published"] == 0

    own_redis.start()
    assert pub.flush(15.0)
    assert reasons(own_redis.url) == ["r4", "r5"]  # the newest survive: they carry the highest levels
    wait_for(lambda: pub.stats().drops_reported == 3, "the drop reported by telemetry")
    with SyncRedis.from_url(own_redis.url) as r:
        entries = r.xrange(CHANNELS["telemetry"].emergency_stream)
    packets = [unpack_as(decode_envelope(f[b"payload"]), pb.TelemetryPacket) for _, f in entries]
    [event] = [e for p in packets for e in p.events if e.attributes["event"] == EVENT_DROPPED]
    assert event.attributes["dropped"] == "3" and event.attributes["dropped_spill_full"] == "3"
    assert event.level == pb.TELEMETRY_LEVEL_ERROR
