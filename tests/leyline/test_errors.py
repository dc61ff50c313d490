"""Error taxonomy: every EnvelopeError carries its dead-letter reason and a bounded label."""

from __future__ import annotations

import pytest

from esper.leyline import (
    EnvelopeError,
    FreshnessError,
    LeylineError,
    MissingIdError,
    OversizeError,
    ReplayError,
    SignatureError,
    UndecodableError,
    UnknownTypeError,
    pb,
    reason_code,
)

DEFAULTS: list[tuple[type[EnvelopeError], pb.DeadLetterReason.ValueType]] = [
    (OversizeError, pb.DEAD_LETTER_REASON_OVERSIZE),
    (UndecodableError, pb.DEAD_LETTER_REASON_UNDECODABLE),
    (UnknownTypeError, pb.DEAD_LETTER_REASON_UNKNOWN_TYPE),
    (SignatureError, pb.DEAD_LETTER_REASON_BAD_SIGNATURE),
    (FreshnessError, pb.DEAD_LETTER_REASON_STALE),
    (ReplayError, pb.DEAD_LETTER_REASON_REPLAYED),
    (MissingIdError, pb.DEAD_LETTER_REASON_MISSING_ID),
]


@pytest.mark.parametrize(("cls", "reason"), DEFAULTS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_default_reasons(cls: type[EnvelopeError], reason: pb.DeadLetterReason.ValueType) -> None:
    err = cls("detail text")
    assert isinstance(err, EnvelopeError)
    assert isinstance(err, LeylineError)
    assert err.reason == reason
    assert err.detail == "detail text"
    assert str(err) == "detail text"
    assert err.reason_name == reason_code(reason)


def test_reason_override() -> None:
    err = SignatureError("x", reason=pb.DEAD_LETTER_REASON_UNKNOWN_KEY)
    assert err.reason == pb.DEAD_LETTER_REASON_UNKNOWN_KEY
    assert err.reason_name == "unknown_key"
    assert SignatureError("y").reason == pb.DEAD_LETTER_REASON_BAD_SIGNATURE, "override is per instance"


def test_reason_codes_are_short_unique_lower_case() -> None:
    codes = [reason_code(v) for v in pb.DeadLetterReason.values()]
    assert len(set(codes)) == len(codes)
    for code in codes:
        assert code == code.lower() and not code.startswith("dead_letter_reason")
    assert reason_code(pb.DEAD_LETTER_REASON_BAD_SIGNATURE) == "bad_signature"
    assert reason_code(pb.DEAD_LETTER_REASON_FROM_FUTURE) == "from_future"
