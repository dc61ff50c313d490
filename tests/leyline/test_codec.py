"""Envelope codec: pack/unpack round trips, the size cap before parsing, and hostile bytes."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.leyline import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PAYLOAD_TYPES,
    EnvelopeError,
    MissingIdError,
    OversizeError,
    SignatureError,
    UndecodableError,
    UnknownTypeError,
    decode_envelope,
    encode_envelope,
    message_type_of,
    new_message_id,
    pack,
    pb,
    sign_envelope,
    unpack,
    unpack_as,
    verify_envelope,
)

from .samples import KEYS, NOW_MS, command_variants, sample_payloads

SAMPLES = sample_payloads()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, body: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(body)) + body


def _signed_raw(payload: Message | None = None, **kw: object) -> bytes:
    env = pack(payload or SAMPLES[pb.BUS_MESSAGE_TYPE_SYSTEM_STATE], sender="test", issued_at_ms=NOW_MS,
               reply_to="oona.{command.run1}", correlation_id="corr", deadline_ms=NOW_MS + 5,
               attributes={"origin": "tolaria", "attempt": "1"}, **kw)  # type: ignore[arg-type]
    return encode_envelope(sign_envelope(env, KEYS))


# -- payload table ---------------------------------------------------------------------------------


def test_payload_types_cover_every_bus_message_type() -> None:
    declared = {v for v in pb.BusMessageType.values() if v != pb.BUS_MESSAGE_TYPE_UNSPECIFIED}
    assert set(PAYLOAD_TYPES) == declared, "every BusMessageType needs a payload class (and nothing else)"
    classes = list(PAYLOAD_TYPES.values())
    assert len(set(classes)) == len(classes), "a payload class must map back to exactly one BusMessageType"


def test_samples_cover_payload_types() -> None:
    assert set(SAMPLES) == set(PAYLOAD_TYPES)
    for t, msg in SAMPLES.items():
        assert type(msg) is PAYLOAD_TYPES[t]


@pytest.mark.parametrize("message_type", sorted(PAYLOAD_TYPES), ids=lambda t: pb.BusMessageType.Name(t))
def test_pack_unpack_round_trip(message_type: pb.BusMessageType.ValueType) -> None:
    payload = SAMPLES[message_type]
    assert message_type_of(payload) == message_type
    env = pack(payload, sender="test", issued_at_ms=NOW_MS)
    assert env.message_type == message_type
    raw = encode_envelope(sign_envelope(env, KEYS))
    decoded = decode_envelope(raw)
    verify_envelope(decoded, KEYS)
    assert decoded == env
    out = unpack(decoded)
    assert type(out) is PAYLOAD_TYPES[message_type]
    assert out == payload
    assert unpack(decoded, PAYLOAD_TYPES[message_type]) == payload
    typed = unpack_as(decoded, type(payload))
    assert typed == payload


@pytest.mark.parametrize("command", command_variants(), ids=lambda c: c.command_id)
def test_adaptation_command_oneof_variants_round_trip(command: pb.AdaptationCommand) -> None:
    env = decode_envelope(encode_envelope(pack(command, sender="tamiyo", issued_at_ms=NOW_MS)))
    out = unpack_as(env, pb.AdaptationCommand)
    assert out == command
    assert out.WhichOneof("payload") == command.WhichOneof("payload")


def test_pack_sets_routing_fields_and_fresh_ids() -> None:
    payload = SAMPLES[pb.BUS_MESSAGE_TYPE_SYSTEM_STATE]
    env = pack(payload, sender="tolaria-0", issued_at_ms=NOW_MS, priority=pb.MESSAGE_PRIORITY_HIGH,
               correlation_id="corr", reply_to="oona.{command.run1}", deadline_ms=NOW_MS + 5,
               attributes={"a": "1"})
    assert env.sender == "tolaria-0"
    assert env.issued_at_ms == NOW_MS
    assert env.priority == pb.MESSAGE_PRIORITY_HIGH
    assert env.correlation_id == "corr"
    assert env.reply_to == "oona.{command.run1}"
    assert env.deadline_ms == NOW_MS + 5
    assert dict(env.attributes) == {"a": "1"}
    assert env.payload == payload.SerializeToString(deterministic=True)
    assert not env.signature and not env.key_id, "pack returns an unsigned envelope"
    default = pack(payload, sender="s", issued_at_ms=NOW_MS)
    assert default.priority == pb.MESSAGE_PRIORITY_NORMAL
    assert default.deadline_ms == 0
    ids = {pack(payload, sender="s", issued_at_ms=NOW_MS).message_id for _ in range(100)}
    assert len(ids) == 100 and all(ids), "every pack gets a fresh non-empty message_id"
    assert pack(payload, sender="s", issued_at_ms=NOW_MS, message_id="fixed").message_id == "fixed"
    mid = new_message_id()
    assert len(mid) == 32 and int(mid, 16) >= 0


def test_non_bus_message_is_unknown_type() -> None:
    with pytest.raises(UnknownTypeError) as exc:
        message_type_of(pb.SeedState())
    assert exc.value.reason == pb.DEAD_LETTER_REASON_UNKNOWN_TYPE
    with pytest.raises(UnknownTypeError):
        pack(pb.HardwareContext(), sender="s", issued_at_ms=NOW_MS)


def test_unpack_with_wrong_expected_type() -> None:
    env = pack(SAMPLES[pb.BUS_MESSAGE_TYPE_SYSTEM_STATE], sender="s", issued_at_ms=NOW_MS)
    with pytest.raises(UnknownTypeError) as exc:
        unpack(env, pb.AdaptationCommand)
    assert exc.value.reason == pb.DEAD_LETTER_REASON_UNKNOWN_TYPE
    with pytest.raises(UnknownTypeError):
        unpack_as(env, pb.DecisionFailure)


@pytest.mark.parametrize("message_type", [pb.BUS_MESSAGE_TYPE_UNSPECIFIED, 99])
def test_unpack_unregistered_message_type(message_type: int) -> None:
    env = pb.BusEnvelope(message_id="m", payload=b"")
    env.message_type = message_type  # type: ignore[assignment]  # open enum: any int arrives on the wire
    with pytest.raises(UnknownTypeError):
        unpack(env)


def test_unpack_garbage_payload_is_undecodable() -> None:
    env = pb.BusEnvelope(message_id="m", message_type=pb.BUS_MESSAGE_TYPE_SYSTEM_STATE, payload=b"\xff\xff\xff")
    with pytest.raises(UndecodableError) as exc:
        unpack(env)
    assert exc.value.reason == pb.DEAD_LETTER_REASON_UNDECODABLE


def test_unpack_deeply_nested_struct_is_undecodable_not_recursion() -> None:
    # rollback_payload is a google.protobuf.Struct: Value.list_value (6) -> ListValue.values (1) -> Value ...
    value = b""
    for _ in range(5_000):
        value = _len_field(6, _len_field(1, value))
    struct = _len_field(1, _len_field(1, b"k") + _len_field(2, value))  # Struct.fields map entry
    command = _len_field(13, struct)
    env = pb.BusEnvelope(message_id="m", message_type=pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND, payload=command)
    with pytest.raises(UndecodableError):
        unpack(env)


# -- decode_envelope -------------------------------------------------------------------------------


def test_decode_refuses_oversize_garbage_by_length_before_parsing() -> None:
    cap = 64
    with pytest.raises(OversizeError) as exc:
        decode_envelope(b"\xff" * (cap + 1), max_bytes=cap)
    assert exc.value.reason == pb.DEAD_LETTER_REASON_OVERSIZE
    # The same garbage at the cap is parsed, and fails as garbage.
    with pytest.raises(UndecodableError):
        decode_envelope(b"\xff" * cap, max_bytes=cap)


def test_decode_default_cap_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 1 << 20
    with pytest.raises(OversizeError):
        decode_envelope(b"\xff" * (DEFAULT_MAX_MESSAGE_BYTES + 1))


def test_decode_refuses_a_valid_envelope_over_the_cap() -> None:
    raw = _signed_raw()
    with pytest.raises(OversizeError):
        decode_envelope(raw, max_bytes=len(raw) - 1)
    assert decode_envelope(raw, max_bytes=len(raw)).message_id


def test_decode_empty_and_id_less_envelopes_are_missing_id() -> None:
    with pytest.raises(MissingIdError) as exc:
        decode_envelope(b"")
    assert exc.value.reason == pb.DEAD_LETTER_REASON_MISSING_ID
    env = pack(SAMPLES[pb.BUS_MESSAGE_TYPE_TELEMETRY], sender="s", issued_at_ms=NOW_MS)
    env.message_id = ""
    with pytest.raises(MissingIdError):
        decode_envelope(encode_envelope(sign_envelope(env, KEYS)))


def test_decode_invalid_utf8_string_is_undecodable() -> None:
    raw = _len_field(4, b"\xff\xfe")  # message_id with invalid UTF-8
    with pytest.raises(UndecodableError):
        decode_envelope(raw)


def test_decode_deeply_nested_unknown_groups_is_undecodable() -> None:
    start_group_99 = _varint((99 << 3) | 3)
    with pytest.raises(UndecodableError):
        decode_envelope(start_group_99 * 50_000)


def test_every_strict_prefix_of_a_signed_envelope_is_rejected() -> None:
    raw = _signed_raw()
    assert decode_envelope(raw).message_id
    for i in range(len(raw)):
        try:
            env = decode_envelope(raw[:i])
        except (UndecodableError, MissingIdError):
            continue
        # A prefix cut at a field boundary parses; it must never verify.
        with pytest.raises(SignatureError):
            verify_envelope(env, KEYS)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=512))
def test_decode_arbitrary_bytes_only_raises_envelope_errors(data: bytes) -> None:
    cap = 256
    try:
        env = decode_envelope(data, max_bytes=cap)
    except OversizeError:
        assert len(data) > cap
        return
    except (UndecodableError, MissingIdError):
        assert len(data) <= cap
        return
    assert len(data) <= cap
    assert env.message_id


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(sorted(PAYLOAD_TYPES)), st.binary(max_size=256))
def test_unpack_arbitrary_payload_only_raises_undecodable(
    message_type: pb.BusMessageType.ValueType, payload: bytes
) -> None:
    env = pb.BusEnvelope(message_id="m", message_type=message_type, payload=payload)
    try:
        msg = unpack(env)
    except EnvelopeError as e:
        assert isinstance(e, UndecodableError), f"unexpected {type(e).__name__}"
        return
    assert type(msg) is PAYLOAD_TYPES[message_type]


_MAP_ENTRY = _len_field(1, b"k") + _len_field(2, b"v")


def _proto_like(program: bytes) -> bytes:
    """Turn arbitrary bytes into plausible protobuf fields: known or unknown numbers, right or wrong wire
    types, honest or lying lengths (one cheap hypothesis draw instead of many small ones)."""
    out = bytearray()
    i = 0
    while i + 3 <= len(program):
        sel, wire, size = program[i], program[i + 1] % 6, program[i + 2] % 24
        i += 3
        number = sel % 15 if sel < 240 else sel * 2_000_003 % ((1 << 29) - 1)
        out += _varint((max(number, 1) << 3) | wire)
        value = program[i : i + size]
        i += size
        if wire == 0:
            out += _varint(int.from_bytes(value[:10], "little") % (1 << 64))
        elif wire == 1:
            out += value.ljust(8, b"\0")[:8]
        elif wire == 5:
            out += value.ljust(4, b"\0")[:4]
        elif wire == 2:
            body = _MAP_ENTRY if size == 1 else value
            declared = len(body) if size % 5 else size * 3
            out += _varint(declared) + body
    return bytes(out)


@settings(max_examples=3000, deadline=None)
@given(st.tuples(st.sampled_from([b"", _len_field(4, b"m-1")]), st.binary(max_size=300)).map(
    lambda t: t[0] + _proto_like(t[1])
))
def test_decode_proto_like_bytes_only_raises_envelope_errors(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except (UndecodableError, MissingIdError):
        return
    assert env.message_id
    # Whatever parsed re-encodes and re-parses to the same envelope.
    assert decode_envelope(encode_envelope(env)) == env
