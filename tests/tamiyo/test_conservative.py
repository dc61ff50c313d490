"""Conservative mode: enter on critical findings, open breakers and timeout streaks; exit when clear."""

from __future__ import annotations

import pytest

from esper.core.breaker import CircuitBreaker
from esper.core.errors import ConfigurationError
from esper.core.telemetry import event_name, event_priority
from esper.leyline import pb
from esper.tamiyo.conservative import ConservativeMode, ConservativeTransition
from esper.tamiyo.risk import RiskInputs, evaluate

CLOSED, OPEN, HALF_OPEN = pb.CIRCUIT_STATE_CLOSED, pb.CIRCUIT_STATE_OPEN, pb.CIRCUIT_STATE_HALF_OPEN


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mode(clock: FakeClock) -> ConservativeMode:
    return ConservativeMode(timeout_threshold=3, quiet_period_s=1.0, clock=clock)


def test_starts_inactive_and_clear(mode: ConservativeMode) -> None:
    assert not mode.active and mode.reason is None and mode.is_clear()
    assert mode.maybe_exit() is None
    assert mode.drain_transitions() == ()


def test_critical_finding_enters_once_and_holds_for_the_quiet_period(mode: ConservativeMode, clock: FakeClock) -> None:
    verdict = evaluate(RiskInputs(command_type=pb.COMMAND_SEED, policy_risk_score=0.99))
    entered = mode.record_verdict(verdict)
    assert entered == ConservativeTransition("entered", "policy_risk_critical", 100.0)
    assert mode.active and mode.reason == "policy_risk_critical" and mode.entered_at == 100.0
    assert mode.record_verdict(verdict) is None  # already active: no second transition
    assert mode.maybe_exit() is None  # same decision: not yet (the prototype exited here)
    clock.advance(0.99)
    assert mode.maybe_exit() is None
    clock.advance(0.01)
    exited = mode.maybe_exit()
    assert exited == ConservativeTransition("exited", "stabilised", 101.0)
    assert not mode.active and mode.reason is None
    assert mode.drain_transitions() == (entered, exited)
    assert mode.drain_transitions() == ()


def test_non_critical_verdict_does_nothing(mode: ConservativeMode) -> None:
    verdict = evaluate(RiskInputs(command_type=pb.COMMAND_SEED, training_metrics={"hook_latency_ms": 99.0}))
    assert mode.record_verdict(verdict) is None and not mode.active


def test_loss_spike_enters_although_it_is_a_warning(mode: ConservativeMode) -> None:
    verdict = evaluate(RiskInputs(command_type=pb.COMMAND_SEED, loss_delta=0.5))
    transition = mode.record_verdict(verdict)
    assert transition is not None and transition.reason == "loss_spike"


def test_retrigger_while_active_extends_the_hold(mode: ConservativeMode, clock: FakeClock) -> None:
    mode.trigger("bp_quarantine")
    clock.advance(0.8)
    assert mode.trigger("loss_spike") is None
    assert mode.reason == "bp_quarantine"  # the episode keeps its first reason
    clock.advance(0.5)
    assert mode.maybe_exit() is None
    clock.advance(0.5)
    assert mode.maybe_exit() is not None


def test_timeout_streak_enters_at_threshold(mode: ConservativeMode, clock: FakeClock) -> None:
    assert mode.record_timeout() is None
    assert mode.record_timeout() is None
    mode.record_on_time()  # the streak is broken
    assert mode.consecutive_timeouts == 0
    assert mode.record_timeout() is None
    assert mode.record_timeout() is None
    entered = mode.record_timeout("timeout_urza")
    assert entered is not None and entered.reason == "timeout_urza" and mode.consecutive_timeouts == 3
    clock.advance(5.0)
    assert mode.maybe_exit() is None  # the streak is still open
    mode.record_on_time()
    assert mode.maybe_exit() is not None  # last timeout is 5 s old: clear


def test_recent_timeout_blocks_exit(mode: ConservativeMode, clock: FakeClock) -> None:
    mode.trigger("bp_quarantine")
    clock.advance(0.9)
    mode.record_timeout()
    mode.record_on_time()
    clock.advance(0.5)  # trigger 1.4 s ago, timeout 0.5 s ago
    assert not mode.is_clear() and mode.maybe_exit() is None
    clock.advance(0.5)
    assert mode.maybe_exit() is not None


def test_open_breaker_enters_and_only_closed_breakers_let_it_exit(mode: ConservativeMode, clock: FakeClock) -> None:
    assert mode.observe_breakers({"inference": CLOSED, "metadata": CLOSED}) is None
    entered = mode.observe_breakers({"inference": OPEN, "metadata": CLOSED})
    assert entered is not None and entered.reason == "inference_breaker_open"
    clock.advance(10.0)
    assert mode.observe_breakers({"inference": HALF_OPEN, "metadata": CLOSED}) is None
    assert mode.maybe_exit() is None  # HALF_OPEN is not CLOSED
    mode.observe_breaker("inference", CLOSED)
    assert mode.breaker_states == {"inference": CLOSED, "metadata": CLOSED}
    assert mode.maybe_exit() is not None


def test_core_breaker_callback_feeds_the_outbox(mode: ConservativeMode, clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        "metadata", failure_threshold=3, reset_timeout_s=0.1, clock=clock, on_transition=mode.on_breaker_transition
    )
    for _ in range(3):
        breaker.record_failure()
    assert mode.active and mode.reason == "metadata_breaker_open"
    clock.advance(2.0)
    assert breaker.state == HALF_OPEN  # read lazily; the callback records it
    assert mode.maybe_exit() is None
    breaker.record_success()
    exited = mode.maybe_exit()
    assert exited is not None
    kinds = [(t.kind, t.reason) for t in mode.drain_transitions()]
    assert kinds == [("entered", "metadata_breaker_open"), ("exited", "stabilised")]


def test_zero_quiet_period_exits_as_soon_as_clear(clock: FakeClock) -> None:
    mode = ConservativeMode(quiet_period_s=0.0, clock=clock)
    mode.trigger("policy_risk_critical")
    assert mode.maybe_exit() is not None


def test_manual_exit_and_reentry(mode: ConservativeMode, clock: FakeClock) -> None:
    assert mode.exit("operator") is None  # inactive: nothing to do
    mode.trigger("bp_quarantine")
    exited = mode.exit("operator")
    assert exited is not None and exited.reason == "operator" and not mode.active
    clock.advance(1.0)
    again = mode.trigger("loss_spike")
    assert again is not None and again.kind == "entered" and mode.reason == "loss_spike"
    assert [t.kind for t in mode.drain_transitions()] == ["entered", "exited", "entered"]


def test_transition_events() -> None:
    entered = ConservativeTransition("entered", "timeout_inference", 1.0).to_event()
    exited = ConservativeTransition("exited", "stabilised", 2.0).to_event()
    assert (event_name(entered), entered.level, entered.attributes["reason"]) == (
        "conservative_mode_entered",
        pb.TELEMETRY_LEVEL_WARNING,
        "timeout_inference",
    )
    assert (event_name(exited), exited.level, exited.attributes["reason"]) == (
        "conservative_mode_exited",
        pb.TELEMETRY_LEVEL_INFO,
        "stabilised",
    )
    assert event_priority(entered.level, event_name(entered)) == pb.MESSAGE_PRIORITY_NORMAL
    assert event_priority(exited.level, event_name(exited)) == pb.MESSAGE_PRIORITY_NORMAL


@pytest.mark.parametrize(("kwargs"), [{"timeout_threshold": 0}, {"quiet_period_s": -0.1}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        ConservativeMode(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ConservativeMode(**kwargs)  # type: ignore[arg-type]


def test_repr(mode: ConservativeMode) -> None:
    mode.trigger("x")
    assert repr(mode) == "ConservativeMode(active=True, reason='x', consecutive_timeouts=0)"
