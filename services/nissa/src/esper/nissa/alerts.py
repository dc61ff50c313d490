"""The alert engine: threshold rules on named samples with the prototype's consecutive-sample rule.

A rule watches one sample name. Each sample either breaches the rule's condition or not; after
``consecutive`` breaching samples in a row the alert fires, and the first sample that does not
breach clears it (and resets the streak). NaN never breaches. Samples carry their own time, so the
engine holds no clock and tests drive it with known numbers.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final, Literal

__all__ = ["ActiveAlert", "AlertEngine", "AlertRule", "AlertTransition", "Comparison", "Severity"]

Comparison = Literal["<", "<=", ">", ">="]
Severity = Literal["warning", "critical"]

_OPS: Final[Mapping[str, Callable[[float, float], bool]]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


@dataclass(frozen=True, slots=True)
class AlertRule:
    name: str
    metric: str
    op: Comparison
    threshold: float
    consecutive: int = 1
    routes: tuple[str, ...] = ("slack",)
    severity: Severity = "warning"
    description: str = ""

    def __post_init__(self) -> None:
        if self.consecutive < 1:
            raise ValueError(f"rule {self.name}: consecutive must be >= 1")
        if self.op not in _OPS:
            raise ValueError(f"rule {self.name}: unknown comparison {self.op!r}")

    def breached(self, value: float) -> bool:
        return not math.isnan(value) and _OPS[self.op](value, self.threshold)

    @property
    def condition(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


@dataclass(frozen=True, slots=True)
class ActiveAlert:
    rule: AlertRule
    since_ms: int  # the first of the breaching samples in a row (Prometheus' activeAt)
    fired_at_ms: int
    value: float  # the latest breaching sample
    samples: int  # breaching samples in a row so far

    def as_dict(self) -> dict[str, object]:
        r = self.rule
        return {"alert": r.name, "severity": r.severity, "routes": list(r.routes), "since_ms": self.since_ms,
                "fired_at_ms": self.fired_at_ms,
                "value": self.value if math.isfinite(self.value) else None, "metric": r.metric,
                "condition": r.condition, "consecutive": r.consecutive, "samples": self.samples,
                "description": r.description}


@dataclass(frozen=True, slots=True)
class AlertTransition:
    alert: ActiveAlert
    fired: bool  # False: cleared
    at_ms: int
    value: float  # the sample that caused the transition


@dataclass(slots=True)
class _State:
    streak: int = 0
    active: ActiveAlert | None = None
    first_breach_ms: int = 0


@dataclass(slots=True)
class AlertEngine:
    rules: tuple[AlertRule, ...]
    _by_metric: dict[str, list[AlertRule]] = field(init=False, default_factory=dict)
    _state: dict[str, _State] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("alert rule names must be unique")
        for r in self.rules:
            self._by_metric.setdefault(r.metric, []).append(r)
            self._state[r.name] = _State()

    def watches(self, metric: str) -> bool:
        return metric in self._by_metric

    def observe(self, metric: str, value: float, now_ms: int) -> list[AlertTransition]:
        """Feed one sample; returns the alerts it fired or cleared."""
        out = []
        for rule in self._by_metric.get(metric, ()):
            t = self._step(rule, self._state[rule.name], value, now_ms)
            if t is not None:
                out.append(t)
        return out

    def observe_many(self, samples: Iterable[tuple[str, float]], now_ms: int) -> list[AlertTransition]:
        return [t for name, value in samples for t in self.observe(name, value, now_ms)]

    def active(self) -> list[ActiveAlert]:
        """Firing alerts, oldest first."""
        return sorted((s.active for s in self._state.values() if s.active is not None), key=lambda a: a.since_ms)

    def is_firing(self, name: str) -> bool:
        return self._state[name].active is not None

    @staticmethod
    def _step(rule: AlertRule, st: _State, value: float, now_ms: int) -> AlertTransition | None:
        if not rule.breached(value):
            st.streak = 0
            if st.active is None:
                return None
            cleared, st.active = st.active, None
            return AlertTransition(cleared, fired=False, at_ms=now_ms, value=value)
        st.streak += 1
        if st.streak == 1:
            st.first_breach_ms = now_ms
        if st.active is not None:
            st.active = replace(st.active, value=value, samples=st.streak)
            return None
        if st.streak < rule.consecutive:
            return None
        st.active = ActiveAlert(rule, since_ms=st.first_breach_ms, fired_at_ms=now_ms, value=value, samples=st.streak)
        return AlertTransition(st.active, fired=True, at_ms=now_ms, value=value)
