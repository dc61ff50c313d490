"""SLO arithmetic: error budgets and burn rates over sliding windows (Google SRE workbook, ch. 5).

An SLO counts good and bad events. Over a window, the *burn rate* is the error rate divided by the
error rate the objective allows, ``(bad / total) / (1 - objective)``: 1.0 spends the budget exactly
over the SLO window, 14.4 spends a 30-day budget in ~2 days. The *error budget remaining* over the
SLO window is ``1 - burn``: 1 untouched, 0 spent, negative overspent. Alerting uses two windows (a
long one for significance, a short one so the alert clears soon after the problem stops): it fires
while both burn above the threshold, i.e. while ``min(long, short)`` does.

Time is passed in (seconds, any monotonic origin), so the arithmetic is testable on known numbers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["Slo", "SloSpec", "SloStatus", "WindowCounts", "burn_rate", "error_budget_remaining"]


def _check_objective(objective: float) -> None:
    if not 0.0 < objective < 1.0:
        raise ValueError(f"SLO objective must be in (0, 1), got {objective}")


def burn_rate(bad: float, total: float, objective: float) -> float:
    """Error rate over the allowed error rate; 0 when nothing was counted."""
    _check_objective(objective)
    if total <= 0:
        return 0.0
    return (bad / total) / (1.0 - objective)


def error_budget_remaining(bad: float, total: float, objective: float) -> float:
    """Fraction of the window's error budget left (negative once overspent)."""
    return 1.0 - burn_rate(bad, total, objective)


class WindowCounts:
    """Good/bad counts over the last ``window_s`` seconds, kept in ``buckets`` time buckets: fixed
    memory however long the window, at the price of a window edge one bucket coarse."""

    def __init__(self, window_s: float, buckets: int = 60) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError("window_s must be > 0 and buckets >= 1")
        self.window_s = window_s
        self.buckets = buckets
        self.bucket_s = window_s / buckets
        self._slots: deque[list[float]] = deque()  # [bucket index, good, bad], oldest first

    def add(self, now_s: float, *, good: float = 0.0, bad: float = 0.0) -> None:
        index = int(now_s // self.bucket_s)
        self._expire(index)
        if self._slots and self._slots[-1][0] >= index:  # same bucket (or a clock step back): merge
            self._slots[-1][1] += good
            self._slots[-1][2] += bad
        else:
            self._slots.append([index, good, bad])

    def totals(self, now_s: float) -> tuple[float, float]:
        """``(good, bad)`` within the window ending at ``now_s``."""
        self._expire(int(now_s // self.bucket_s))
        return sum(s[1] for s in self._slots), sum(s[2] for s in self._slots)

    def _expire(self, index: int) -> None:
        while self._slots and self._slots[0][0] <= index - self.buckets:
            self._slots.popleft()


@dataclass(frozen=True, slots=True)
class SloSpec:
    name: str
    objective: float
    window_s: float  # error-budget window
    long_window_s: float  # burn-rate window (the gauge, and the alert's significance window)
    short_window_s: float  # the alert's confirmation window
    description: str = ""
    min_events: int = 0  # below this many events in the long window the alert signal stays 0 (too few to judge)

    def __post_init__(self) -> None:
        _check_objective(self.objective)
        if not 0 < self.short_window_s <= self.long_window_s <= self.window_s:
            raise ValueError(f"SLO {self.name}: need 0 < short_window_s <= long_window_s <= window_s")


@dataclass(frozen=True, slots=True)
class SloStatus:
    name: str
    objective: float
    good: float  # over the SLO window
    bad: float
    burn_rate: float  # over the long window
    burn_rate_short: float
    budget_remaining: float  # over the SLO window
    events_long: float = 0.0  # good + bad in the long window
    min_events: int = 0

    @property
    def alert_burn(self) -> float:
        """The multiwindow alert signal: above a threshold only while both windows are (and the long
        window holds at least ``min_events`` events)."""
        if self.events_long < self.min_events:
            return 0.0
        return min(self.burn_rate, self.burn_rate_short)


class Slo:
    """One SLO's counts over its three windows."""

    def __init__(self, spec: SloSpec) -> None:
        self.spec = spec
        self._windows = (WindowCounts(spec.window_s), WindowCounts(spec.long_window_s),
                         WindowCounts(spec.short_window_s))

    def record(self, now_s: float, *, good: float = 0.0, bad: float = 0.0) -> None:
        if good < 0 or bad < 0:
            raise ValueError("counts must be >= 0")
        if good or bad:
            for w in self._windows:
                w.add(now_s, good=good, bad=bad)

    def status(self, now_s: float) -> SloStatus:
        objective = self.spec.objective
        (good, bad), (lg, lb), (sg, sb) = (w.totals(now_s) for w in self._windows)
        return SloStatus(self.spec.name, objective, good, bad, burn_rate(lb, lg + lb, objective),
                         burn_rate(sb, sg + sb, objective), error_budget_remaining(bad, good + bad, objective),
                         events_long=lg + lb, min_events=self.spec.min_events)
