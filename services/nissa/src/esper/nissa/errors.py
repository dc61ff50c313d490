"""Nissa's typed errors."""

from __future__ import annotations

from esper.core.errors import EsperError


class NissaError(EsperError):
    """Base of Nissa's errors."""


class MalformedTelemetryError(NissaError):
    """A packet that decodes but cannot be attributed or mapped; it is dead-lettered, never half-applied.

    ``reason`` is a short code used as the ``esper_nissa_ingest_errors_total`` label.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
