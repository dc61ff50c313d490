"""SLO burn arithmetic on known numbers, and training-step progress."""

from __future__ import annotations

import pytest

from esper.nissa.slo import Slo, SloSpec, WindowCounts, burn_rate, error_budget_remaining
from esper.nissa.steps import StepTracker


def test_burn_rate_known_numbers() -> None:
    # 5 bad in 1000 against a 99% objective: 0.5% errors over an allowed 1% → burn 0.5.
    assert burn_rate(5, 1000, 0.99) == pytest.approx(0.5)
    assert error_budget_remaining(5, 1000, 0.99) == pytest.approx(0.5)
    # 10% errors against 99.9%: burn 100; the budget is overspent 99 times over.
    assert burn_rate(100, 1000, 0.999) == pytest.approx(100.0)
    assert error_budget_remaining(100, 1000, 0.999) == pytest.approx(-99.0)
    assert burn_rate(0, 0, 0.99) == 0.0
    assert error_budget_remaining(0, 0, 0.99) == 1.0


@pytest.mark.parametrize("objective", [0.0, 1.0, 1.5])
def test_objective_must_be_a_fraction(objective: float) -> None:
    with pytest.raises(ValueError, match="objective"):
        burn_rate(1, 10, objective)


def test_window_counts_expire_whole_buckets() -> None:
    w = WindowCounts(window_s=60, buckets=6)  # 10 s buckets
    w.add(0, good=10)
    w.add(5, bad=1)
    w.add(35, good=5)
    assert w.totals(50) == (15, 1)
    assert w.totals(60) == (5, 0)  # bucket [0, 10) left the window
    assert w.totals(100) == (0, 0)
    w.add(101, good=1)
    w.add(99, bad=2)  # clock stepped back: merged into the newest bucket, never lost
    assert w.totals(101) == (1, 2)


def test_slo_long_and_short_windows() -> None:
    slo = Slo(SloSpec("d", 0.99, window_s=3600, long_window_s=600, short_window_s=60))
    slo.record(0, good=98, bad=2)  # a burst of errors ...
    slo.record(300, good=100)  # ... then a clean stretch
    s = slo.status(330)
    assert (s.good, s.bad) == (198, 2)
    assert s.burn_rate == pytest.approx((2 / 200) / 0.01)  # long window still sees the burst: 1.0
    assert s.burn_rate_short == 0.0  # the short window has recovered
    assert s.alert_burn == 0.0  # so the multiwindow alert signal is low
    assert s.budget_remaining == pytest.approx(0.0)
    later = slo.status(1000)  # the burst left the long window, not the budget window
    assert later.burn_rate == 0.0
    assert later.budget_remaining == pytest.approx(1 - (2 / 200) / 0.01)


def test_slo_rejects_badly_nested_windows_and_negative_counts() -> None:
    with pytest.raises(ValueError, match="window"):
        SloSpec("x", 0.99, window_s=60, long_window_s=600, short_window_s=30)
    slo = Slo(SloSpec("x", 0.99, window_s=600, long_window_s=600, short_window_s=60))
    with pytest.raises(ValueError):
        slo.record(0, good=-1)


def test_step_tracker() -> None:
    t = StepTracker(capacity=2)
    assert t.advance("a", 100) == 1  # first sighting: one step, history unknown
    assert t.advance("a", 105) == 5
    assert t.advance("a", 103) == 0  # out of order
    assert t.advance("a", 105) == 0  # repeat
    assert t.advance("b", 7) == 1
    assert t.advance("c", 1) == 1  # evicts the least recent run ("a")
    assert t.advance("a", 110) == 1  # "a" is new again
