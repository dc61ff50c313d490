"""HMAC envelope signing: round trip, every field authenticated, reasons, rotation, key validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from esper.leyline import (
    SignatureError,
    SigningKeys,
    decode_envelope,
    encode_envelope,
    hmac_sha256,
    pack,
    pb,
    sign_envelope,
    verify_envelope,
)
from esper.leyline.signing import MIN_SECRET_BYTES

from .samples import KEYS, NOW_MS, sample_payloads

OLD_SECRET = b"old-secret-old-secret-0123456789"
NEW_SECRET = b"new-secret-new-secret-0123456789"


def _envelope() -> pb.BusEnvelope:
    return pack(sample_payloads()[pb.BUS_MESSAGE_TYPE_SYSTEM_STATE], sender="tolaria-0", issued_at_ms=NOW_MS,
                correlation_id="corr-1", reply_to="oona.{command.run1}", deadline_ms=NOW_MS + 5,
                priority=pb.MESSAGE_PRIORITY_NORMAL, attributes={"origin": "tolaria", "run": "run1"})


def _signed(keys: SigningKeys = KEYS) -> pb.BusEnvelope:
    return sign_envelope(_envelope(), keys)


def _reason(env: pb.BusEnvelope, keys: SigningKeys = KEYS) -> pb.DeadLetterReason.ValueType:
    with pytest.raises(SignatureError) as exc:
        verify_envelope(env, keys)
    return exc.value.reason


def test_sign_verify_round_trip_and_over_the_wire() -> None:
    env = _signed()
    assert env.key_id == "k1"
    assert len(env.signature) == 32, "HMAC-SHA256 digest"
    verify_envelope(env, KEYS)
    wire = decode_envelope(encode_envelope(env))
    verify_envelope(wire, KEYS)
    assert wire == env


def test_signature_is_hmac_over_envelope_with_empty_signature() -> None:
    env = _signed()
    unsigned = pb.BusEnvelope()
    unsigned.CopyFrom(env)
    unsigned.signature = b""
    assert env.signature == hmac_sha256(KEYS.secret, unsigned.SerializeToString(deterministic=True))


def test_signing_is_deterministic_and_idempotent() -> None:
    a = _signed()
    b = pb.BusEnvelope()
    b.CopyFrom(a)
    sign_envelope(b, KEYS)  # re-signing an already signed envelope gives the same signature
    assert b.signature == a.signature
    # Map insertion order does not matter (deterministic serialisation sorts map keys).
    x = _envelope()
    x.attributes.clear()
    x.attributes.update({"a": "1", "b": "2", "c": "3"})
    y = pb.BusEnvelope()
    y.CopyFrom(x)
    y.attributes.clear()
    for k in ("c", "a", "b"):
        y.attributes[k] = {"a": "1", "b": "2", "c": "3"}[k]
    assert sign_envelope(x, KEYS).signature == sign_envelope(y, KEYS).signature


def test_verify_does_not_mutate_the_envelope() -> None:
    env = _signed()
    before = env.SerializeToString(deterministic=True)
    verify_envelope(env, KEYS)
    env.reply_to = "tampered"
    with pytest.raises(SignatureError):
        verify_envelope(env, KEYS)
    env.reply_to = "oona.{command.run1}"
    assert env.SerializeToString(deterministic=True) == before


def _set_attr(env: pb.BusEnvelope) -> None:
    env.attributes["origin"] = "kasmina"


def _add_attr(env: pb.BusEnvelope) -> None:
    env.attributes["extra"] = ""


def _del_attr(env: pb.BusEnvelope) -> None:
    del env.attributes["run"]


def _flip_payload_bit(env: pb.BusEnvelope) -> None:
    env.payload = bytes([env.payload[0] ^ 1]) + env.payload[1:]


def _append_payload(env: pb.BusEnvelope) -> None:
    env.payload = env.payload + b"\x00"


def _set(field: str, value: object) -> Callable[[pb.BusEnvelope], None]:
    def change(env: pb.BusEnvelope) -> None:
        setattr(env, field, value)

    return change


TAMPERS: dict[str, Callable[[pb.BusEnvelope], None]] = {
    "payload_bit": _flip_payload_bit,
    "payload_longer": _append_payload,
    "payload_empty": _set("payload", b""),
    "reply_to": _set("reply_to", "oona.{command.evil}"),
    "reply_to_cleared": _set("reply_to", ""),
    "deadline_ms": _set("deadline_ms", NOW_MS + 60_000),
    "deadline_cleared": _set("deadline_ms", 0),
    "priority": _set("priority", pb.MESSAGE_PRIORITY_CRITICAL),
    "attributes_value": _set_attr,
    "attributes_added": _add_attr,
    "attributes_removed": _del_attr,
    "message_id": _set("message_id", "another-id"),
    "correlation_id": _set("correlation_id", "corr-2"),
    "sender": _set("sender", "mallory"),
    "issued_at_ms": _set("issued_at_ms", NOW_MS + 1),
    "message_type": _set("message_type", pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND),
    "attempt": _set("attempt", 7),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_any_single_field_change_is_bad_signature(tamper: str) -> None:
    env = _signed()
    verify_envelope(env, KEYS)
    TAMPERS[tamper](env)
    assert _reason(env) == pb.DEAD_LETTER_REASON_BAD_SIGNATURE


def test_tampered_signature_bytes_are_bad_signature() -> None:
    env = _signed()
    env.signature = bytes([env.signature[0] ^ 0x80]) + env.signature[1:]
    assert _reason(env) == pb.DEAD_LETTER_REASON_BAD_SIGNATURE
    env.signature = env.signature[:-1]
    assert _reason(env) == pb.DEAD_LETTER_REASON_BAD_SIGNATURE


def test_wrong_secret_same_key_id_is_bad_signature() -> None:
    env = sign_envelope(_envelope(), SigningKeys("k1", NEW_SECRET))
    assert _reason(env, SigningKeys("k1", OLD_SECRET)) == pb.DEAD_LETTER_REASON_BAD_SIGNATURE


def test_unsigned_is_missing_signature() -> None:
    assert _reason(_envelope()) == pb.DEAD_LETTER_REASON_MISSING_SIGNATURE
    env = _signed()
    env.signature = b""
    assert _reason(env) == pb.DEAD_LETTER_REASON_MISSING_SIGNATURE


def test_unknown_key_id() -> None:
    env = _signed()
    env.key_id = "k9"
    assert _reason(env) == pb.DEAD_LETTER_REASON_UNKNOWN_KEY
    env.key_id = ""
    assert _reason(env) == pb.DEAD_LETTER_REASON_UNKNOWN_KEY


def test_rotation_accepts_previous_key_until_it_is_dropped() -> None:
    old = SigningKeys("k-old", OLD_SECRET)
    rotated = SigningKeys("k-new", NEW_SECRET, previous_key_id="k-old", previous_secret=OLD_SECRET)
    after = SigningKeys("k-new", NEW_SECRET)

    in_flight = sign_envelope(_envelope(), old)
    verify_envelope(in_flight, old)
    verify_envelope(in_flight, rotated)
    assert _reason(in_flight, after) == pb.DEAD_LETTER_REASON_UNKNOWN_KEY

    fresh = sign_envelope(_envelope(), rotated)
    assert fresh.key_id == "k-new", "the current key signs"
    verify_envelope(fresh, rotated)
    verify_envelope(fresh, after)
    assert _reason(fresh, old) == pb.DEAD_LETTER_REASON_UNKNOWN_KEY


def test_rotation_does_not_let_a_key_id_be_swapped() -> None:
    rotated = SigningKeys("k-new", NEW_SECRET, previous_key_id="k-old", previous_secret=OLD_SECRET)
    env = sign_envelope(_envelope(), SigningKeys("k-old", OLD_SECRET))
    env.key_id = "k-new"  # claims the current key with a previous-key signature
    assert _reason(env, rotated) == pb.DEAD_LETTER_REASON_BAD_SIGNATURE


def test_secret_for() -> None:
    keys = SigningKeys("a", NEW_SECRET, previous_key_id="b", previous_secret=OLD_SECRET)
    assert keys.secret_for("a") == NEW_SECRET
    assert keys.secret_for("b") == OLD_SECRET
    assert keys.secret_for("c") is None
    assert KEYS.secret_for("b") is None


def test_signing_keys_validation() -> None:
    assert MIN_SECRET_BYTES == 16
    SigningKeys("k", b"x" * MIN_SECRET_BYTES)  # exactly the minimum is fine
    with pytest.raises(ValueError, match="at least"):
        SigningKeys("k", b"x" * (MIN_SECRET_BYTES - 1))
    with pytest.raises(ValueError, match="at least"):
        SigningKeys("k", b"")
    with pytest.raises(ValueError, match="key_id"):
        SigningKeys("", NEW_SECRET)
    with pytest.raises(ValueError, match="together"):
        SigningKeys("k", NEW_SECRET, previous_key_id="old")
    with pytest.raises(ValueError, match="together"):
        SigningKeys("k", NEW_SECRET, previous_secret=OLD_SECRET)
    with pytest.raises(ValueError, match="differ"):
        SigningKeys("k", NEW_SECRET, previous_key_id="k", previous_secret=OLD_SECRET)


def test_signing_keys_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        KEYS.key_id = "other"  # type: ignore[misc]


def _rejected(**kwargs: object) -> bool:
    try:
        SigningKeys("k", NEW_SECRET, **kwargs)  # type: ignore[arg-type]
    except ValueError:
        return True
    return False


def test_short_previous_secret_is_rejected() -> None:
    """A previous key still authenticates traffic, so a weak one is as dangerous as a weak current key."""
    assert _rejected(previous_key_id="old", previous_secret=b"x"), (
        "BUG: SigningKeys accepts a 1-byte previous_secret; MIN_SECRET_BYTES is enforced only on the current "
        "secret, yet verify_envelope accepts anything signed with the previous one"
    )


def test_empty_previous_key_id_is_rejected() -> None:
    assert _rejected(previous_key_id="", previous_secret=OLD_SECRET), (
        "BUG: SigningKeys accepts previous_key_id='' although key_id must be non-empty; an envelope without "
        "key_id then verifies against the previous secret"
    )


# -- verification from the received bytes (hot path) --------------------------------------------------


def test_verify_from_raw_bytes_matches_reserialising_path() -> None:
    raw = encode_envelope(_signed())
    env = decode_envelope(raw)
    verify_envelope(env, KEYS, raw=raw)
    verify_envelope(env, KEYS)


def test_raw_path_rejects_tampered_prefix_with_intact_signature_suffix() -> None:
    raw = bytearray(encode_envelope(_signed()))
    raw[10] ^= 0x01  # inside the signed prefix; the trailing signature field is untouched
    try:
        env = decode_envelope(bytes(raw))
    except Exception:
        return  # the flip broke the structure: also a rejection
    with pytest.raises(SignatureError):
        verify_envelope(env, KEYS, raw=bytes(raw))


def test_raw_path_rejects_a_duplicated_signature_field() -> None:
    raw = encode_envelope(_signed())
    doubled = raw + raw[-34:]  # parser keeps the last value; the prefix now includes a signature field
    env = decode_envelope(doubled)
    with pytest.raises(SignatureError):
        verify_envelope(env, KEYS, raw=doubled)


def test_non_canonical_layout_falls_back_to_reserialising() -> None:
    signed = _signed()
    sig_field = encode_envelope(signed)[-34:]
    body = encode_envelope(signed)[:-34]
    reordered = sig_field + body  # signature first: valid protobuf, different byte layout
    env = decode_envelope(reordered)
    verify_envelope(env, KEYS, raw=reordered)


# -- command signatures ------------------------------------------------------------------------------


def _command() -> pb.AdaptationCommand:
    cmd = pb.AdaptationCommand(version=1, command_id="cmd-1", command_type=pb.COMMAND_SEED, target_seed_id="s1",
                               issued_by="tamiyo")
    cmd.issued_at.FromMilliseconds(NOW_MS)
    cmd.seed_operation.operation = pb.SEED_OP_GERMINATE
    cmd.seed_operation.blueprint_id = "BP001"
    cmd.seed_operation.parameters["alpha"] = 0.1
    cmd.annotations["policy_version"] = "tamiyo_gnn_v1"
    return cmd


def test_command_signature_round_trip_and_tamper() -> None:
    from esper.leyline import sign_command, verify_command

    cmd = sign_command(_command(), KEYS)
    verify_command(cmd, KEYS)
    wire = pb.AdaptationCommand.FromString(cmd.SerializeToString())
    verify_command(wire, KEYS)
    for mutate in (
        lambda c: setattr(c, "target_seed_id", "s2"),
        lambda c: c.seed_operation.parameters.__setitem__("alpha", 0.9),
        lambda c: c.annotations.__setitem__("policy_version", "evil"),
        lambda c: setattr(c, "command_type", pb.COMMAND_PAUSE),
    ):
        bad = pb.AdaptationCommand()
        bad.CopyFrom(cmd)
        mutate(bad)
        with pytest.raises(SignatureError) as exc:
            verify_command(bad, KEYS)
        assert exc.value.reason == pb.DEAD_LETTER_REASON_BAD_SIGNATURE


def test_command_signature_reasons() -> None:
    from esper.leyline import sign_command, verify_command

    with pytest.raises(SignatureError) as exc:
        verify_command(_command(), KEYS)
    assert exc.value.reason == pb.DEAD_LETTER_REASON_MISSING_SIGNATURE
    other = SigningKeys(key_id="other", secret=NEW_SECRET)
    with pytest.raises(SignatureError) as exc:
        verify_command(sign_command(_command(), other), KEYS)
    assert exc.value.reason == pb.DEAD_LETTER_REASON_UNKNOWN_KEY
    nameless = _command()
    nameless.command_id = ""
    with pytest.raises(SignatureError):
        sign_command(nameless, KEYS)
