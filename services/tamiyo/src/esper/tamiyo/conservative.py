"""Conservative mode: a small, pure state machine (injected clock, no IO).

Entered (ARCHITECTURE §6) on a critical risk finding (a verdict asking for it), on a breaker opening,
or on ``timeout_threshold`` consecutive timeouts. While active the risk engine pauses every decision
(``pause_triggered``). It exits by itself once clear: no timeout for ``quiet_period_s`` and none
pending, every observed breaker CLOSED, and no trigger for ``quiet_period_s``.

The quiet period is a deliberate change from the prototype, which checked for recovery at the end of
the same decision that entered the mode and so could enter and leave in one step.

Every transition is a :class:`ConservativeTransition`: returned by the call that caused it and
queued in an outbox (:meth:`ConservativeMode.drain_transitions`) for telemetry, which also catches
transitions made from a breaker's ``on_transition`` callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from esper.core.errors import ConfigurationError
from esper.core.telemetry import build_event
from esper.leyline import pb
from esper.tamiyo.risk import RiskVerdict

__all__ = [
    "DEFAULT_QUIET_PERIOD_S",
    "DEFAULT_TIMEOUT_THRESHOLD",
    "EVENT_CONSERVATIVE_ENTERED",
    "EVENT_CONSERVATIVE_EXITED",
    "EXIT_REASON_STABILISED",
    "ConservativeMode",
    "ConservativeTransition",
    "TransitionKind",
]

EVENT_CONSERVATIVE_ENTERED: Final = "conservative_mode_entered"
EVENT_CONSERVATIVE_EXITED: Final = "conservative_mode_exited"
EXIT_REASON_STABILISED: Final = "stabilised"

DEFAULT_TIMEOUT_THRESHOLD: Final[int] = 3
DEFAULT_QUIET_PERIOD_S: Final[float] = 1.0

TransitionKind = Literal["entered", "exited"]


@dataclass(frozen=True, slots=True)
class ConservativeTransition:
    """One change of mode, with why and when (clock seconds)."""

    kind: TransitionKind
    reason: str
    at_s: float

    @property
    def event_name(self) -> str:
        return EVENT_CONSERVATIVE_ENTERED if self.kind == "entered" else EVENT_CONSERVATIVE_EXITED

    @property
    def level(self) -> int:
        """``TelemetryLevel``: WARNING on entry, INFO on exit (as the prototype)."""
        return pb.TELEMETRY_LEVEL_WARNING if self.kind == "entered" else pb.TELEMETRY_LEVEL_INFO

    def to_event(self) -> pb.TelemetryEvent:
        return build_event(
            self.event_name, level=self.level, description=f"{self.event_name}: {self.reason}", reason=self.reason
        )


class ConservativeMode:
    """Enter/exit logic for conservative mode; see the module docstring for the rules."""

    __slots__ = (
        "_active",
        "_breakers",
        "_clock",
        "_consecutive_timeouts",
        "_entered_at",
        "_last_timeout_at",
        "_last_trigger_at",
        "_outbox",
        "_quiet_period_s",
        "_reason",
        "_timeout_threshold",
    )

    def __init__(
        self,
        *,
        timeout_threshold: int = DEFAULT_TIMEOUT_THRESHOLD,
        quiet_period_s: float = DEFAULT_QUIET_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_threshold < 1:
            raise ConfigurationError(f"conservative mode: timeout_threshold must be >= 1, got {timeout_threshold}")
        if quiet_period_s < 0:
            raise ConfigurationError(f"conservative mode: quiet_period_s must be >= 0, got {quiet_period_s}")
        self._timeout_threshold = timeout_threshold
        self._quiet_period_s = quiet_period_s
        self._clock = clock
        self._active = False
        self._reason: str | None = None
        self._entered_at: float | None = None
        self._consecutive_timeouts = 0
        self._last_timeout_at: float | None = None
        self._last_trigger_at: float | None = None
        self._breakers: dict[str, int] = {}
        self._outbox: list[ConservativeTransition] = []

    # --- state ----------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._active

    @property
    def reason(self) -> str | None:
        """Why the current episode began; ``None`` when inactive."""
        return self._reason

    @property
    def entered_at(self) -> float | None:
        return self._entered_at

    @property
    def consecutive_timeouts(self) -> int:
        return self._consecutive_timeouts

    @property
    def breaker_states(self) -> Mapping[str, int]:
        """Last observed ``CircuitBreakerState`` per breaker name."""
        return dict(self._breakers)

    def is_clear(self) -> bool:
        """No timeout pending or recent, every observed breaker CLOSED, no recent trigger."""
        now = self._clock()
        return (
            self._consecutive_timeouts == 0
            and all(state == pb.CIRCUIT_STATE_CLOSED for state in self._breakers.values())
            and not self._recent(self._last_timeout_at, now)
            and not self._recent(self._last_trigger_at, now)
        )

    def _recent(self, at: float | None, now: float) -> bool:
        return at is not None and now - at < self._quiet_period_s

    # --- inputs ---------------------------------------------------------------------------------

    def record_verdict(self, verdict: RiskVerdict) -> ConservativeTransition | None:
        """Enter when the risk engine asks for it (a critical finding); else nothing."""
        if verdict.enter_conservative and verdict.conservative_reason is not None:
            return self.trigger(verdict.conservative_reason)
        return None

    def record_timeout(self, kind: str = "timeout_inference") -> ConservativeTransition | None:
        """Count a timed-out decision; the ``timeout_threshold``-th in a row enters the mode."""
        self._consecutive_timeouts += 1
        self._last_timeout_at = self._clock()
        if self._consecutive_timeouts >= self._timeout_threshold:
            return self.trigger(kind)
        return None

    def record_on_time(self) -> None:
        """A decision finished within its budget: the timeout streak is over."""
        self._consecutive_timeouts = 0

    def observe_breaker(self, name: str, state: int) -> ConservativeTransition | None:
        """Record a breaker's current state; an OPEN breaker enters the mode."""
        self._breakers[name] = state
        if state == pb.CIRCUIT_STATE_OPEN:
            return self.trigger(f"{name}_breaker_open")
        return None

    def observe_breakers(self, states: Mapping[str, int]) -> ConservativeTransition | None:
        """:meth:`observe_breaker` for each; returns the entry transition if one happened."""
        entered: ConservativeTransition | None = None
        for name, state in states.items():
            transition = self.observe_breaker(name, state)
            entered = entered or transition
        return entered

    def on_breaker_transition(self, name: str, old_state: int, new_state: int) -> None:
        """``esper.core.breaker.TransitionCallback``: feeds breaker changes in (the outbox keeps them)."""
        del old_state
        self.observe_breaker(name, new_state)

    def trigger(self, reason: str) -> ConservativeTransition | None:
        """A reason to be conservative: enter if inactive; either way restart the quiet period."""
        now = self._clock()
        self._last_trigger_at = now
        if self._active:
            return None
        self._active = True
        self._reason = reason
        self._entered_at = now
        return self._record("entered", reason, now)

    def maybe_exit(self) -> ConservativeTransition | None:
        """Leave the mode when :meth:`is_clear`; call once per decision, after recording its inputs."""
        if self._active and self.is_clear():
            return self.exit(EXIT_REASON_STABILISED)
        return None

    def exit(self, reason: str) -> ConservativeTransition | None:
        """Leave now regardless of signals (operator action, tests); nothing if inactive."""
        if not self._active:
            return None
        self._active = False
        self._reason = None
        self._entered_at = None
        return self._record("exited", reason, self._clock())

    # --- outbox ---------------------------------------------------------------------------------

    def drain_transitions(self) -> tuple[ConservativeTransition, ...]:
        """Transitions since the last drain, oldest first."""
        drained = tuple(self._outbox)
        self._outbox.clear()
        return drained

    def _record(self, kind: TransitionKind, reason: str, at_s: float) -> ConservativeTransition:
        transition = ConservativeTransition(kind=kind, reason=reason, at_s=at_s)
        self._outbox.append(transition)
        return transition

    def __repr__(self) -> str:
        return (
            f"ConservativeMode(active={self._active}, reason={self._reason!r}, "
            f"consecutive_timeouts={self._consecutive_timeouts})"
        )
