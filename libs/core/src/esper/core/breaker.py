"""The classic circuit breaker, with states from Leyline's ``CircuitBreakerState``.

Pure and synchronous: no IO, no asyncio, an injectable clock. Callers wrap their own calls
(``check()`` before, ``record_success()``/``record_failure()`` after), so one breaker serves
inference, metadata, publish, consume or kernel fetch alike (ARCHITECTURE §6).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from esper.core.errors import BreakerOpenError, ConfigurationError
from esper.leyline._generated import leyline_pb2 as pb

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker", "TransitionCallback"]

CLOSED: int = pb.CIRCUIT_STATE_CLOSED
OPEN: int = pb.CIRCUIT_STATE_OPEN
HALF_OPEN: int = pb.CIRCUIT_STATE_HALF_OPEN

TransitionCallback = Callable[[str, int, int], None]
"""``on_transition(name, old_state, new_state)``; called synchronously, so it must not raise."""


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures, probes after ``reset_timeout_s``.

    CLOSED counts consecutive failures and opens at the threshold. OPEN refuses calls until
    ``reset_timeout_s`` has passed, then becomes HALF_OPEN (observed lazily, when the state is read).
    HALF_OPEN lets calls through: ``success_threshold`` successes close it, one failure reopens it
    and restarts the timer. Results reported while OPEN come from calls admitted earlier; they are
    counted but neither extend nor end the outage.
    """

    __slots__ = (
        "_clock",
        "_failure_threshold",
        "_failures",
        "_name",
        "_on_transition",
        "_opened_at",
        "_reset_timeout_s",
        "_state",
        "_success_threshold",
        "_successes",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        success_threshold: int = 1,
        reset_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ConfigurationError(f"breaker {name!r}: failure_threshold must be >= 1, got {failure_threshold}")
        if success_threshold < 1:
            raise ConfigurationError(f"breaker {name!r}: success_threshold must be >= 1, got {success_threshold}")
        if reset_timeout_s < 0:
            raise ConfigurationError(f"breaker {name!r}: reset_timeout_s must be >= 0, got {reset_timeout_s}")
        self._name = name
        self._failure_threshold = failure_threshold
        self._success_threshold = success_threshold
        self._reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._on_transition = on_transition
        self._state = CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0

    @property
    def name(self) -> str:
        return self._name

    @property
    def state(self) -> int:
        """Current ``pb.CircuitBreakerState`` value; moves OPEN → HALF_OPEN once the timeout is over."""
        if self._state == OPEN and self._clock() - self._opened_at >= self._reset_timeout_s:
            self._successes = 0
            self._transition(HALF_OPEN)
        return self._state

    @property
    def state_name(self) -> str:
        """The state as a short name: ``"CLOSED"``, ``"OPEN"`` or ``"HALF_OPEN"``."""
        return pb.CircuitBreakerState.Name(pb.CircuitBreakerState.ValueType(self.state)).removeprefix("CIRCUIT_STATE_")

    @property
    def failures(self) -> int:
        """Consecutive failures recorded since the last success, close or reset."""
        return self._failures

    def retry_after_s(self) -> float:
        """Seconds until an OPEN breaker will admit a probe; 0 when it admits calls now."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._reset_timeout_s - self._clock())

    def allow(self) -> bool:
        """Whether a call may go ahead now."""
        return self.state != OPEN

    def check(self) -> None:
        """Raise :class:`BreakerOpenError` when the breaker refuses calls."""
        if not self.allow():
            raise BreakerOpenError(self._name, self.retry_after_s())

    def record_success(self) -> None:
        state = self.state
        if state == CLOSED:
            self._failures = 0
        elif state == HALF_OPEN:
            self._successes += 1
            if self._successes >= self._success_threshold:
                self._close()

    def record_failure(self) -> None:
        state = self.state
        self._failures += 1
        if state == HALF_OPEN or (state == CLOSED and self._failures >= self._failure_threshold):
            self._open()

    def reset(self) -> None:
        """Force CLOSED with clean counters (operator action or tests)."""
        self._close()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._successes = 0
        self._transition(OPEN)

    def _close(self) -> None:
        self._failures = 0
        self._successes = 0
        self._transition(CLOSED)

    def _transition(self, new_state: int) -> None:
        old_state = self._state
        self._state = new_state
        if old_state != new_state and self._on_transition is not None:
            self._on_transition(self._name, old_state, new_state)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self._name!r}, state={self.state_name}, failures={self._failures})"
