"""Conservative mode: the trainer stops asking Tamiyo while decisions keep failing (REFERENCE §8).

Pure and synchronous (no IO, an injectable clock); the trainer does the telemetry and metrics at the
edges. One `esper.core.breaker.CircuitBreaker` watches the decision channel:

- CLOSED: every step asks Tamiyo. `failure_threshold` consecutive failed decisions open it.
- OPEN = conservative mode: the step does not ask (no packet, no wait), applies no command and
  trains at full speed; each such step is counted as skipped, never as a timeout.
- After `reset_timeout_s` the breaker half-opens: the next step asks again, and that request is the
  probe. Its success closes the breaker (conservative mode cleared); its failure re-opens it and
  restarts the timer.

What counts as a failure is the channel failing, not Tamiyo's judgement: a `timeout` (no reply in
the budget) or an `error` (the request could not be made, Redis down, an open bus breaker). A reply
of any kind (a command, or an explicit `DecisionFailure` that Tamiyo sent within the budget) is a
success: Tamiyo is there and answers on time, so asking costs the step nothing.

Each call returns the `ModeChange` it caused, if any, and every change is also queued
(`drain_changes`) so that a change observed lazily (OPEN → HALF_OPEN, when the state is read) is
reported too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from esper.core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker

__all__ = [
    "BREAKER_NAME",
    "FAILURE_KINDS",
    "ChangeKind",
    "ConservativeMode",
    "ModeChange",
]

BREAKER_NAME: Final = "tolaria.decisions"
FAILURE_KINDS: Final[frozenset[str]] = frozenset({"timeout", "error"})
"""Decision outcomes (`Decision.kind`) that count against the breaker; the rest are successes."""

ChangeKind = Literal["entered", "probing", "reopened", "cleared"]


@dataclass(frozen=True, slots=True)
class ModeChange:
    """One transition: `entered` (CLOSED → OPEN), `probing` (OPEN → HALF_OPEN), `reopened` (a failed
    probe, HALF_OPEN → OPEN) or `cleared` (a successful probe, HALF_OPEN → CLOSED)."""

    kind: ChangeKind
    state: int  # the breaker's new state (pb.CircuitBreakerState)
    at_s: float  # clock seconds


_KINDS: Final[dict[tuple[int, int], ChangeKind]] = {
    (CLOSED, OPEN): "entered", (OPEN, HALF_OPEN): "probing", (HALF_OPEN, OPEN): "reopened",
    (HALF_OPEN, CLOSED): "cleared", (OPEN, CLOSED): "cleared",  # OPEN → CLOSED only by reset()
}


class ConservativeMode:
    """The decision breaker and the counters of conservative mode; drive it once per step."""

    __slots__ = ("_changes", "_clock", "breaker", "entries", "probe_failures", "probes", "skipped", "steps")

    def __init__(self, *, failure_threshold: int = 3, reset_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._changes: list[ModeChange] = []
        self.breaker = CircuitBreaker(BREAKER_NAME, failure_threshold=failure_threshold, success_threshold=1,
                                      reset_timeout_s=reset_timeout_s, clock=clock, on_transition=self._transition)
        self.entries = 0  # CLOSED → OPEN transitions
        self.steps = 0  # steps whose decision point found the mode active (skipped + probing steps)
        self.skipped = 0  # steps that did not ask Tamiyo (breaker OPEN)
        self.probes = 0  # decisions resolved while HALF_OPEN
        self.probe_failures = 0

    # -- state -------------------------------------------------------------------------------------

    @property
    def state(self) -> int:
        """The breaker's `pb.CircuitBreakerState` (OPEN → HALF_OPEN is observed here, lazily)."""
        return self.breaker.state

    @property
    def active(self) -> bool:
        """In conservative mode: from the opening until a probe succeeds (OPEN or HALF_OPEN)."""
        return self.state != CLOSED

    @property
    def consecutive_failures(self) -> int:
        return self.breaker.failures

    # -- driving it --------------------------------------------------------------------------------

    def should_ask(self) -> bool:
        """Called once per step at its decision point: True to ask Tamiyo (CLOSED, or HALF_OPEN: the
        probe), False to skip this step's decision (OPEN: counted in `skipped`)."""
        state = self.state
        if state == CLOSED:
            return True
        self.steps += 1
        if state == OPEN:
            self.skipped += 1
            return False
        return True

    def record(self, kind: str) -> ModeChange | None:
        """Fold in one decision outcome (`Decision.kind`); returns the change it caused, if any."""
        before = len(self._changes)
        state = self.state
        failed = kind in FAILURE_KINDS
        if state == HALF_OPEN:
            self.probes += 1
            self.probe_failures += failed
        if failed:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
        return self._changes[-1] if len(self._changes) > before else None

    def drain_changes(self) -> list[ModeChange]:
        """Every change since the last drain, oldest first (also the lazily observed ones)."""
        changes, self._changes = self._changes, []
        return changes

    def _transition(self, _name: str, old: int, new: int) -> None:
        kind = _KINDS.get((old, new))
        if kind is None:
            return
        if kind == "entered":
            self.entries += 1
        self._changes.append(ModeChange(kind, new, self._clock()))
