"""Hostile bus entries for the bad-input drill: mutated, tampered, forged, stale and junk envelopes.

Every entry produced here must be refused by any Oona consumer (dead-lettered with a reason): a byte
flip anywhere in a signed envelope breaks its decode or its HMAC, and the rest fail decoding,
signature, key, freshness or type checks. Nothing here may be accepted, so the drill can demand one
dead letter per entry per live consumer group — an exact count, not a rate.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable

from google.protobuf.message import Message

from esper.core.clock import now_ms
from esper.leyline import SigningKeys, encode_envelope, pack, pb, sign_envelope

PAYLOAD = b"payload"
DAY_MS = 86_400_000

Entry = dict[bytes, bytes]


def _foreign_message(channel: str) -> Message:
    """A well-formed message of a type `channel` does not carry."""
    if channel == "emergency":
        return pb.SystemStatePacket(packet_id="fuzz-wrong-type")
    return pb.EmergencySignal(level=pb.EMERGENCY_LEVEL_NOTICE, reason="fuzz-wrong-type", origin="fuzz")


def _sample_message(channel: str, i: int) -> Message:
    """A plausible message for `channel` (the base that mutations start from)."""
    if channel == "emergency":
        return pb.EmergencySignal(level=pb.EMERGENCY_LEVEL_NOTICE, reason=f"fuzz-{i}", origin="fuzz")
    if channel == "field_report":
        return pb.FieldReport(report_id=f"fuzz-{i}", command_id=f"fuzz-{i}")
    if channel == "telemetry":
        return pb.TelemetryPacket(packet_id=f"fuzz-{i}", source_subsystem="fuzz")
    return pb.SystemStatePacket(packet_id=f"fuzz-{i}")


def hostile_entries(channel: str, keys: SigningKeys, *, count: int, rng: random.Random) -> list[tuple[str, Entry]]:
    """`count` (case, fields) pairs cycling through every kind of bad input for `channel`."""
    rogue = SigningKeys(key_id="rogue", secret=secrets.token_bytes(32))

    def env(i: int, *, issued_at_ms: int | None = None, message: Message | None = None) -> pb.BusEnvelope:
        msg = message if message is not None else _sample_message(channel, i)
        return pack(msg, sender="fuzz", issued_at_ms=now_ms() if issued_at_ms is None else issued_at_ms)

    def signed(e: pb.BusEnvelope, k: SigningKeys = keys) -> bytes:
        return encode_envelope(sign_envelope(e, k))

    def flipped(i: int) -> bytes:
        raw = bytearray(signed(env(i)))
        for pos in rng.sample(range(len(raw)), k=min(len(raw), rng.randint(1, 4))):
            raw[pos] ^= rng.randint(1, 255)
        return bytes(raw)

    def truncated(i: int) -> bytes:
        raw = signed(env(i))
        return raw[: rng.randrange(0, len(raw) - 1)]

    makers: list[tuple[str, Callable[[int], Entry]]] = [
        ("byte flips", lambda i: {PAYLOAD: flipped(i)}),
        ("truncated", lambda i: {PAYLOAD: truncated(i)}),
        ("random bytes", lambda i: {PAYLOAD: rng.randbytes(rng.randint(1, 512))}),
        ("forged key", lambda i: {PAYLOAD: signed(env(i), rogue)}),
        ("unsigned", lambda i: {PAYLOAD: encode_envelope(env(i))}),
        ("stale", lambda i: {PAYLOAD: signed(env(i, issued_at_ms=now_ms() - 2 * DAY_MS))}),
        ("from the future", lambda i: {PAYLOAD: signed(env(i, issued_at_ms=now_ms() + DAY_MS))}),
        ("no payload field", lambda i: {b"junk": rng.randbytes(16)}),
        ("wrong message type", lambda i: {PAYLOAD: signed(env(i, message=_foreign_message(channel)))}),
    ]
    return [(makers[i % len(makers)][0], makers[i % len(makers)][1](i)) for i in range(count)]
