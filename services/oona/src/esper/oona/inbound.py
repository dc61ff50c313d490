"""Receive-side validation of one stream entry, as a plain function (no IO).

Order matters and is cheapest-first: size (before parsing anything), envelope structure and ids,
signature (before trusting any field), freshness and deadline, then replay. Every failure is a
typed `EnvelopeError` carrying its dead-letter reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from esper.leyline import (
    ReplayCache,
    SigningKeys,
    UndecodableError,
    check_freshness,
    decode_envelope,
    pb,
    verify_envelope,
)

PAYLOAD_FIELD = b"payload"

# What redis-py returns for one entry's fields (decode_responses=False).
EntryFields = Mapping[bytes, bytes]


@dataclass(frozen=True, slots=True)
class InboundPolicy:
    """Everything the checks need, bundled so the hot path passes one object."""

    keys: SigningKeys
    max_bytes: int
    window_ms: int
    max_skew_ms: int


def entry_payload(fields: EntryFields) -> bytes:
    raw = fields.get(PAYLOAD_FIELD)
    if raw is None:
        raise UndecodableError(f"entry has no {PAYLOAD_FIELD.decode()!r} field (fields: {sorted(fields)[:5]})")
    return raw


def validate_entry(
    fields: EntryFields,
    entry_id: str,
    *,
    policy: InboundPolicy,
    now_ms: int,
    replay: ReplayCache | None,
) -> pb.BusEnvelope:
    """Return the verified envelope of a stream entry or raise the EnvelopeError that rejects it."""
    raw = entry_payload(fields)
    env = decode_envelope(raw, max_bytes=policy.max_bytes)
    verify_envelope(env, policy.keys, raw=raw)
    check_freshness(env, now_ms=now_ms, window_ms=policy.window_ms, max_skew_ms=policy.max_skew_ms)
    if replay is not None:
        replay.check(env.message_id, entry_id, now_ms)
    return env


MAX_REPORTED_ID_CHARS = 128


def best_effort_ids(raw: bytes | None, *, max_bytes: int) -> tuple[str, pb.BusMessageType.ValueType]:
    """message_id/type of a rejected entry for the dead-letter record, if its envelope parses at all.

    Oversize input is never parsed (the cap holds on the dead-letter path too), and the id, which is
    untrusted, is truncated so the record itself stays small.
    """
    if not raw or len(raw) > max_bytes:
        return "", pb.BUS_MESSAGE_TYPE_UNSPECIFIED
    env = pb.BusEnvelope()
    try:
        env.ParseFromString(raw)
    except Exception:  # any parse failure just means "no ids to report"
        return "", pb.BUS_MESSAGE_TYPE_UNSPECIFIED
    return env.message_id[:MAX_REPORTED_ID_CHARS], env.message_type
