"""CircuitBreaker state machine, driven by an injected clock."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from esper.core.breaker import CircuitBreaker
from esper.core.errors import BreakerOpenError, ConfigurationError, EsperError
from esper.leyline._generated import leyline_pb2 as pb

CLOSED, OPEN, HALF_OPEN = pb.CIRCUIT_STATE_CLOSED, pb.CIRCUIT_STATE_OPEN, pb.CIRCUIT_STATE_HALF_OPEN


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    clock: FakeClock,
    transitions: list[tuple[str, int, int]] | None = None,
    *,
    failure_threshold: int = 3,
    success_threshold: int = 1,
    reset_timeout_s: float = 10.0,
) -> CircuitBreaker:
    def record(name: str, old: int, new: int) -> None:
        if transitions is not None:
            transitions.append((name, old, new))

    return CircuitBreaker(
        "inference",
        failure_threshold=failure_threshold,
        success_threshold=success_threshold,
        reset_timeout_s=reset_timeout_s,
        clock=clock,
        on_transition=record,
    )


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(3):
        breaker.record_failure()


def test_starts_closed_and_allows() -> None:
    breaker = make(FakeClock())
    assert breaker.state == CLOSED
    assert breaker.state_name == "CLOSED"
    assert breaker.allow()
    breaker.check()
    assert breaker.failures == 0
    assert breaker.retry_after_s() == 0.0


def test_opens_at_threshold_consecutive_failures() -> None:
    transitions: list[tuple[str, int, int]] = []
    breaker = make(FakeClock(), transitions)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == CLOSED
    assert breaker.failures == 2
    breaker.record_failure()
    assert breaker.state == OPEN
    assert breaker.state_name == "OPEN"
    assert not breaker.allow()
    assert transitions == [("inference", CLOSED, OPEN)]


def test_success_in_closed_resets_failure_count() -> None:
    breaker = make(FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert breaker.failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == CLOSED


def test_check_raises_with_retry_after() -> None:
    clock = FakeClock()
    breaker = make(clock)
    trip(breaker)
    clock.now += 4.0
    with pytest.raises(BreakerOpenError) as info:
        breaker.check()
    assert info.value.name == "inference"
    assert info.value.retry_after_s == pytest.approx(6.0)
    assert isinstance(info.value, EsperError)


def test_open_becomes_half_open_after_timeout_when_read() -> None:
    clock = FakeClock()
    transitions: list[tuple[str, int, int]] = []
    breaker = make(clock, transitions)
    trip(breaker)
    clock.now += 9.999
    assert breaker.state == OPEN
    clock.now += 0.001
    assert breaker.state == HALF_OPEN
    assert breaker.state_name == "HALF_OPEN"
    assert breaker.allow()
    assert transitions == [("inference", CLOSED, OPEN), ("inference", OPEN, HALF_OPEN)]


def test_half_open_success_closes() -> None:
    clock = FakeClock()
    transitions: list[tuple[str, int, int]] = []
    breaker = make(clock, transitions)
    trip(breaker)
    clock.now += 10
    breaker.record_success()
    assert breaker.state == CLOSED
    assert breaker.failures == 0
    assert transitions[-1] == ("inference", HALF_OPEN, CLOSED)


def test_half_open_needs_success_threshold() -> None:
    clock = FakeClock()
    breaker = make(clock, success_threshold=3)
    trip(breaker)
    clock.now += 10
    breaker.record_success()
    breaker.record_success()
    assert breaker.state == HALF_OPEN
    breaker.record_success()
    assert breaker.state == CLOSED


def test_half_open_failure_reopens_and_restarts_timer() -> None:
    clock = FakeClock()
    breaker = make(clock, success_threshold=2)
    trip(breaker)
    clock.now += 15
    breaker.record_success()  # one probe succeeded, not enough
    breaker.record_failure()
    assert breaker.state == OPEN
    assert breaker.retry_after_s() == pytest.approx(10.0)
    clock.now += 10
    assert breaker.state == HALF_OPEN
    breaker.record_success()  # the earlier success does not carry over
    assert breaker.state == HALF_OPEN


def test_late_results_while_open_do_not_move_the_timer() -> None:
    clock = FakeClock()
    breaker = make(clock)
    trip(breaker)
    clock.now += 5
    breaker.record_failure()
    breaker.record_success()
    assert breaker.state == OPEN
    assert breaker.retry_after_s() == pytest.approx(5.0)


def test_reset_closes_from_any_state() -> None:
    clock = FakeClock()
    transitions: list[tuple[str, int, int]] = []
    breaker = make(clock, transitions)
    trip(breaker)
    breaker.reset()
    assert breaker.state == CLOSED
    assert breaker.failures == 0
    breaker.reset()  # no transition event when nothing changes
    assert transitions == [("inference", CLOSED, OPEN), ("inference", OPEN, CLOSED)]


def test_zero_reset_timeout_probes_immediately() -> None:
    breaker = make(FakeClock(), reset_timeout_s=0.0, failure_threshold=1)
    breaker.record_failure()
    assert breaker.state == HALF_OPEN


def _into(state: str, clock: FakeClock) -> CircuitBreaker:
    breaker = make(clock)
    if state == "closed_fresh":
        return breaker
    if state == "closed_near_threshold":
        breaker.record_failure()
        breaker.record_failure()
        return breaker
    trip(breaker)
    if state == "half_open":
        clock.now += 10
        assert breaker.state == HALF_OPEN
    return breaker


# (start state, event) -> state afterwards; OPEN is observed without the clock moving.
TABLE = [
    ("closed_fresh", "success", CLOSED),
    ("closed_fresh", "failure", CLOSED),
    ("closed_fresh", "reset", CLOSED),
    ("closed_near_threshold", "success", CLOSED),
    ("closed_near_threshold", "failure", OPEN),
    ("closed_near_threshold", "reset", CLOSED),
    ("open", "success", OPEN),
    ("open", "failure", OPEN),
    ("open", "reset", CLOSED),
    ("half_open", "success", CLOSED),
    ("half_open", "failure", OPEN),
    ("half_open", "reset", CLOSED),
]


@pytest.mark.parametrize(("start", "event", "expected"), TABLE)
def test_transition_table(start: str, event: str, expected: int) -> None:
    breaker = _into(start, FakeClock())
    {"success": breaker.record_success, "failure": breaker.record_failure, "reset": breaker.reset}[event]()
    assert breaker.state == expected


@pytest.mark.parametrize("kwargs", [{"failure_threshold": 0}, {"success_threshold": 0}, {"reset_timeout_s": -1.0}])
def test_rejects_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as info:
        CircuitBreaker("inference", **kwargs)
    assert isinstance(info.value, ValueError)


def test_breaker_open_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(BreakerOpenError("publish", 1.5)))
    assert (error.name, error.retry_after_s) == ("publish", 1.5)
    assert "publish" in str(error)
