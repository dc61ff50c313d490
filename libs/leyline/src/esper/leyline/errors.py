"""Typed rejection of bus input. Each error carries the Leyline `DeadLetterReason` it maps to, so
the consumer can dead-letter with a reason code instead of a free-form string."""

from __future__ import annotations

from esper.leyline._generated import leyline_pb2 as pb


class LeylineError(Exception):
    """Base of every contract-level error."""


class EnvelopeError(LeylineError):
    """An envelope (or stream entry) that must not reach a handler."""

    default_reason: pb.DeadLetterReason.ValueType = pb.DEAD_LETTER_REASON_UNSPECIFIED

    def __init__(self, detail: str, *, reason: pb.DeadLetterReason.ValueType | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = self.default_reason if reason is None else reason

    @property
    def reason_name(self) -> str:
        """Short lower-case code, e.g. `bad_signature`, used in metrics labels and logs."""
        return reason_code(self.reason)


class OversizeError(EnvelopeError):
    default_reason = pb.DEAD_LETTER_REASON_OVERSIZE


class UndecodableError(EnvelopeError):
    default_reason = pb.DEAD_LETTER_REASON_UNDECODABLE


class UnknownTypeError(EnvelopeError):
    default_reason = pb.DEAD_LETTER_REASON_UNKNOWN_TYPE


class SignatureError(EnvelopeError):
    """Missing, unknown-key or mismatching HMAC (reason says which)."""

    default_reason = pb.DEAD_LETTER_REASON_BAD_SIGNATURE


class FreshnessError(EnvelopeError):
    """Stale, from the future or already past its deadline (reason says which)."""

    default_reason = pb.DEAD_LETTER_REASON_STALE


class ReplayError(EnvelopeError):
    default_reason = pb.DEAD_LETTER_REASON_REPLAYED


class MissingIdError(EnvelopeError):
    default_reason = pb.DEAD_LETTER_REASON_MISSING_ID


def reason_code(reason: pb.DeadLetterReason.ValueType) -> str:
    """`DEAD_LETTER_REASON_BAD_SIGNATURE` → `bad_signature` (bounded label values)."""
    return pb.DeadLetterReason.Name(reason).removeprefix("DEAD_LETTER_REASON_").lower()
