"""Oona's exception tree: errors callers handle, plus control-flow signals handlers raise."""

from __future__ import annotations

from esper.core.errors import DeadlineExceededError, EsperError


class OonaError(EsperError):
    """Base of every bus error."""


class SetupError(OonaError, ValueError):
    """Invalid configuration or option combination, raised at construction."""


class PublishError(OonaError):
    """The message was not written (Redis error, breaker open, oversize, rate limit)."""


class EmergencyRateLimitedError(PublishError):
    """The emergency token bucket is empty: the message was *not* sent (counted, never silent)."""


class RequestTimeoutError(DeadlineExceededError, OonaError):
    """No valid reply arrived before the request's deadline."""


class Reject(OonaError):
    """Raised by a handler: this message can never succeed; dead-letter it now (no redelivery)."""
