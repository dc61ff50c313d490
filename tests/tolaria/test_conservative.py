"""Conservative mode: the decision breaker, driven step by step with an injected clock (unit), and a
real trainer on a real Redis with no Tamiyo at all (integration): it stops asking after exactly
`failures` timeouts, probes only after the reset time, and trains every epoch."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from esper.core.breaker import CLOSED, HALF_OPEN, OPEN
from esper.leyline import CHANNELS, pb
from esper.oona import OonaSettings
from esper.tolaria.bus import BusThread
from esper.tolaria.conservative import ConservativeMode
from esper.tolaria.decisions import Decision
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer
from tests.conftest import ClientFactory
from tests.tolaria._helpers import tolaria_events


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _mode(failures: int = 3, reset_s: float = 10.0) -> tuple[ConservativeMode, FakeClock]:
    clock = FakeClock()
    return ConservativeMode(failure_threshold=failures, reset_timeout_s=reset_s, clock=clock), clock


def _open(mode: ConservativeMode, failures: int = 3) -> None:
    for _ in range(failures):
        assert mode.should_ask()
        mode.record("timeout")
    assert mode.active and mode.entries == 1


# -- unit: the state machine --------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [1, 3, 5])
def test_enters_after_exactly_n_consecutive_failures(failures: int) -> None:
    mode, _ = _mode(failures)
    for _ in range(failures - 1):
        assert mode.should_ask()
        assert mode.record("timeout") is None
    assert not mode.active and mode.state == CLOSED and mode.entries == 0  # N-1 failures: still asking
    assert mode.should_ask()
    change = mode.record("timeout")
    assert change is not None and change.kind == "entered" and change.state == OPEN
    assert mode.active and mode.entries == 1
    assert [c.kind for c in mode.drain_changes()] == ["entered"]
    assert mode.drain_changes() == []


def test_non_consecutive_failures_do_not_enter() -> None:
    mode, _ = _mode(3)
    # an answer of any kind (a command, or Tamiyo's explicit DecisionFailure) resets the count
    for kinds in (["timeout", "timeout", "command"], ["error", "timeout", "failure"], ["timeout", "timeout"]):
        for kind in kinds:
            assert mode.should_ask()
            mode.record(kind)
    assert not mode.active and mode.entries == 0 and mode.consecutive_failures == 2
    assert mode.steps == mode.skipped == 0
    mode.record("error")  # a transport error counts like a timeout
    assert mode.active and mode.entries == 1


def test_skips_every_decision_while_open() -> None:
    mode, clock = _mode(3, reset_s=10.0)
    _open(mode)
    for i in range(50):
        clock.now += 0.1  # 5 s in all: half the reset time
        assert not mode.should_ask(), f"asked at skip {i}"
    assert mode.skipped == mode.steps == 50 and mode.probes == 0 and mode.state == OPEN


def test_half_opens_after_the_reset_time_and_a_successful_probe_clears() -> None:
    mode, clock = _mode(3, reset_s=10.0)
    _open(mode)
    mode.drain_changes()
    clock.now += 9.999
    assert not mode.should_ask() and mode.state == OPEN
    clock.now += 0.001
    assert mode.should_ask()  # the probe
    assert mode.state == HALF_OPEN and mode.active
    assert [c.kind for c in mode.drain_changes()] == ["probing"]
    change = mode.record("command")
    assert change is not None and change.kind == "cleared" and change.state == CLOSED
    assert not mode.active and mode.probes == 1 and mode.probe_failures == 0
    assert mode.steps == 2 and mode.skipped == 1  # one skipped step, one probing step
    # cleared means CLOSED with a clean count: it takes N new failures to enter again
    for _ in range(2):
        assert mode.should_ask()
        mode.record("timeout")
    assert not mode.active
    mode.record("timeout")
    assert mode.active and mode.entries == 2


def test_a_failed_probe_reopens_and_restarts_the_timer() -> None:
    mode, clock = _mode(3, reset_s=10.0)
    _open(mode)
    clock.now += 10.0
    assert mode.should_ask()
    change = mode.record("timeout")
    assert change is not None and change.kind == "reopened" and mode.state == OPEN
    assert mode.entries == 1  # still the same episode
    clock.now += 9.0
    assert not mode.should_ask()  # the timer restarted at the failed probe, not at the first opening
    clock.now += 1.0
    assert mode.should_ask()
    mode.record("failure")  # Tamiyo answered (explicitly, without a command): it is back
    assert not mode.active
    assert mode.probes == 2 and mode.probe_failures == 1 and mode.entries == 1
    assert [c.kind for c in mode.drain_changes()] == ["entered", "probing", "reopened", "probing", "cleared"]


def test_reset_zero_probes_every_step() -> None:
    mode, _ = _mode(2, reset_s=0.0)
    _open(mode, 2)
    for _ in range(5):
        assert mode.should_ask()
        mode.record("timeout")
    assert mode.probes == mode.probe_failures == 5 and mode.skipped == 0 and mode.entries == 1


def test_settings_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    s = TolariaSettings()
    assert (s.decision_breaker_failures, s.decision_breaker_reset_s) == (3, 5.0)
    monkeypatch.setenv("TOLARIA_DECISION_BREAKER_FAILURES", "7")
    monkeypatch.setenv("TOLARIA_DECISION_BREAKER_RESET_S", "0.25")
    s = TolariaSettings()
    assert (s.decision_breaker_failures, s.decision_breaker_reset_s) == (7, 0.25)
    monkeypatch.setenv("TOLARIA_DECISION_BREAKER_FAILURES", "0")
    with pytest.raises(ValueError, match=r"(?i)decision_breaker_failures"):
        TolariaSettings()


def test_trainer_applies_no_command_in_conservative_mode(tmp_path: Path) -> None:
    """Outcomes fed straight into a trainer (no bus): three timeouts open the breaker (gauges follow);
    a command that still lands from an earlier request is not applied; the probe's command is."""
    registry = CollectorRegistry()
    clock = FakeClock()
    ts = TolariaSettings(var_dir=tmp_path / "tolaria", epochs=1, hidden_width=16, emergency_enabled=False,
                         metrics_port=-1, decision_breaker_failures=3, decision_breaker_reset_s=10.0)
    trainer = Trainer(ts, bus=None, registry=registry, clock=clock)
    gauge = registry.get_sample_value
    assert gauge("tolaria_conservative_mode") == 0.0
    assert gauge("tolaria_decision_breaker_state") == float(pb.CIRCUIT_STATE_CLOSED)

    def optimizer_command(n: int) -> pb.AdaptationCommand:
        cmd = pb.AdaptationCommand(version=1, command_id=f"cmd-{n}", command_type=pb.COMMAND_OPTIMIZER,
                                   issued_by="test")
        cmd.optimizer_adjustment.hyperparameters["lr_delta"] = 0.5
        return cmd

    for step in range(1, 4):
        trainer.step = step
        trainer._take_decision(Decision(step, f"p-{step}", "timeout", 5.0, detail="no reply"))
    assert trainer.conservative.active and gauge("tolaria_conservative_mode") == 1.0
    assert gauge("tolaria_decision_breaker_state") == float(pb.CIRCUIT_STATE_OPEN)
    assert gauge("tolaria_conservative_entries_total") == 1.0
    lr = trainer.optimizer.param_groups[0]["lr"]
    trainer._take_decision(Decision(3, "p-late", "command", 9.0, command=optimizer_command(1)))
    assert trainer.stats.commands_dropped_conservative == 1 and trainer.stats.commands == {}
    assert trainer.optimizer.param_groups[0]["lr"] == lr
    clock.now += 10.0
    assert trainer.conservative.should_ask()  # the probe
    trainer._take_decision(Decision(3, "p-probe", "command", 2.0, command=optimizer_command(2)))
    # cleared: the probe's reply is a normal decision (here Kasmina refuses the unsigned command)
    assert not trainer.conservative.active and gauge("tolaria_conservative_mode") == 0.0
    assert gauge("tolaria_decision_breaker_state") == float(pb.CIRCUIT_STATE_CLOSED)
    assert trainer.stats.commands_dropped_conservative == 1
    assert sum(trainer.stats.rejected.values()) + sum(trainer.stats.commands.values()) == 1
    summary = trainer.summary(clean_shutdown=True)
    assert summary["timeouts"] == 3 and summary["conservative_entries"] == 1
    assert summary["conservative_probes"] == 1 and summary["conservative_mode"] is False
    names = [e.attributes["event"] for e in trainer._pending_events]  # no bus: events wait for the epoch
    assert names.count("conservative_mode_entered") == 1 and names.count("conservative_mode_cleared") == 1
    trainer.close()


# -- integration: a real trainer, a real Redis, no Tamiyo ----------------------------------------------


def _trainer_settings(tmp: Path, settings: OonaSettings, **overrides: object) -> TolariaSettings:
    base: dict[str, object] = {
        "var_dir": tmp / "tolaria", "epochs": 2, "hidden_width": 16, "seed": 3, "learning_rate": 0.01,
        "emergency_enabled": False, "metrics_port": -1, "redis_url": settings.redis_url,
        "leyline_secret": settings.leyline_secret, "run_id": "run-conservative", "tamiyo_step_timeout_ms": 50.0,
    }
    base.update(overrides)
    return TolariaSettings(**base)


class StepClock:
    """The trainer's step counter as the breaker's clock: one 'second' per step, exact and repeatable."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def __call__(self) -> float:
        return float(self.trainer.step if self.trainer is not None else 0)


async def _run(ts: TolariaSettings, registry: CollectorRegistry, *, step_clock: bool = False) -> Trainer:
    bus = BusThread(ts)
    await asyncio.to_thread(bus.start)
    clock = StepClock()
    trainer: Trainer | None = None
    try:
        trainer = Trainer(ts, bus=bus, registry=registry, clock=clock if step_clock else time.monotonic)
        clock.trainer = trainer
        await asyncio.to_thread(trainer.run)
    finally:
        if trainer is not None:
            trainer.close()
        await asyncio.to_thread(bus.stop)
    return trainer


@pytest.mark.parametrize("mode", ["sync", "pipelined"])
async def test_no_tamiyo_enters_conservative_mode_after_exactly_failures_timeouts(
        make_client: ClientFactory, settings: OonaSettings, tmp_path: Path, mode: str) -> None:
    """Reset time far beyond the run: after the `failures`-th timeout nothing is asked any more (no
    packet on `state`, no wait), every later step is a counted skip, not a timeout, and every epoch
    is trained."""
    registry = CollectorRegistry()
    # pipelined: each step goes on at once, so the run must outlast three 20 ms requests
    epochs, budget_ms = (2, 50.0) if mode == "sync" else (10, 20.0)
    ts = _trainer_settings(tmp_path, settings, decision_mode=mode, decision_breaker_failures=3,
                           decision_breaker_reset_s=3600.0, epochs=epochs, tamiyo_step_timeout_ms=budget_ms)
    trainer = await _run(ts, registry)
    s = trainer.summary(clean_shutdown=True)
    steps_per_epoch = math.ceil(trainer.data.meta.train_size / ts.batch_size)
    assert s["epochs"] == epochs and s["steps"] == epochs * steps_per_epoch  # trained through
    assert s["timeouts"] == 3 and s["decisions"] == 3 and s["decision_commands"] == 0
    assert s["conservative_entries"] == 1 and s["conservative_mode"] is True
    # every step either sent its packet (3), found the previous request still pending (pipelined), or
    # was a conservative skip
    assert s["decisions_skipped_conservative"] == s["conservative_steps"]
    assert s["decisions_skipped_conservative"] + 3 + s["decisions_skipped_inflight"] == s["steps"]
    assert s["decisions_skipped_inflight"] == 0 or mode == "pipelined"
    assert s["conservative_probes"] == 0
    observer = await make_client("observer-state")
    # nothing is published once the breaker is open: at most the three requests' packets are on `state`
    # (fewer only if a publish itself outlasted its request's deadline on a loaded machine)
    assert 1 <= await observer.redis.xlen(CHANNELS["state"].normal_stream) <= 3
    events = await tolaria_events(make_client)
    entered = [(p, lane) for p, lane, e in events if e["event"] == "conservative_mode_entered"]
    assert entered == [(pb.MESSAGE_PRIORITY_HIGH, "emergency")]
    timeouts = [e for _p, lane, e in events if e["event"] == "tamiyo_timeout" and lane == "emergency"]
    assert len(timeouts) == 3  # the HIGH flood stops with the breaker
    assert not [e for _p, _l, e in events if e["event"] == "conservative_mode_cleared"]
    assert registry.get_sample_value("tolaria_conservative_mode") == 1.0
    assert registry.get_sample_value("tolaria_decision_breaker_state") == float(pb.CIRCUIT_STATE_OPEN)
    assert registry.get_sample_value("tolaria_conservative_entries_total") == 1.0
    assert registry.get_sample_value("tolaria_decisions_skipped_conservative_total") == s[
        "decisions_skipped_conservative"]


@pytest.mark.parametrize("transport", ["process", "thread"])
async def test_no_tamiyo_probes_after_each_reset_and_timeouts_stay_bounded(
        make_client: ClientFactory, settings: OonaSettings, tmp_path: Path, transport: str) -> None:
    """The breaker's clock is the step counter (one 'second' per step), so the half-open probes fall on
    known steps: each fails (no Tamiyo), re-opens the breaker, and is the only request of its cycle.
    Each timeout's event is published once, by the sidecar or, on the bus thread, by the trainer."""
    registry = CollectorRegistry()
    failures, reset = 2, 10
    ts = _trainer_settings(tmp_path, settings, decision_mode="sync", decision_breaker_failures=failures,
                           decision_breaker_reset_s=float(reset), decision_transport=transport)
    trainer = await _run(ts, registry, step_clock=True)
    s = trainer.summary(clean_shutdown=True)
    assert s["epochs"] == 2 and s["steps"] == trainer.step
    probes = (s["steps"] - failures) // reset  # opened at step `failures`, a probe every `reset` steps
    assert probes >= 3
    assert s["conservative_probes"] == s["conservative_probe_failures"] == probes
    assert s["timeouts"] == failures + probes  # bounded by the probes, not one per step
    assert s["decisions_skipped_conservative"] == s["steps"] - s["timeouts"]
    assert s["conservative_steps"] == s["steps"] - failures and s["conservative_entries"] == 1
    events = await tolaria_events(make_client)
    assert sum(e["event"] == "conservative_mode_entered" for _p, _l, e in events) == 1  # a re-open is no new entry
    assert sum(e["event"] == "tamiyo_timeout" for _p, _l, e in events) == s["timeouts"]
    assert registry.get_sample_value("tolaria_conservative_mode") == 1.0


async def test_the_last_decision_of_a_run_is_counted_like_the_others(
        make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    """Settled after the last step, it skipped the HIGH timeout event, the failure reasons and the
    breaker: with no Tamiyo, one timeout more than events and breaker failures in every run."""
    ts = _trainer_settings(tmp_path, settings, epochs=1, decision_transport="thread", tamiyo_step_timeout_ms=5.0,
                           decision_breaker_failures=10_000)
    trainer = await _run(ts, CollectorRegistry())
    s = trainer.summary(clean_shutdown=True)
    assert s["timeouts"] == s["decisions"] >= 1 and s["decision_commands"] == 0  # the last one among them
    assert trainer.conservative.consecutive_failures == s["timeouts"]
    events = await tolaria_events(make_client)
    assert sum(e["event"] == "tamiyo_timeout" for _p, _l, e in events) == s["timeouts"]
