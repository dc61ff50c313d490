"""Receive-side validation of one stream entry (no Redis): reasons, order, ids, and hostile bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.leyline import (
    EnvelopeError,
    ReplayCache,
    SigningKeys,
    encode_envelope,
    pack,
    pb,
    reason_code,
    sign_envelope,
)
from esper.oona.inbound import PAYLOAD_FIELD, InboundPolicy, best_effort_ids, entry_payload, validate_entry

NOW_MS = 1_700_000_000_000
ENTRY = f"{NOW_MS}-0"  # Redis stamps entry ids with its own clock: a realistic id for an entry read now
KEYS = SigningKeys("k1", b"inbound-test-secret-0123456789ab")
OTHER_KEYS = SigningKeys("k2", b"some-other-secret-0123456789abcd")
WINDOW = 60_000
SKEW = 5_000
POLICY = InboundPolicy(keys=KEYS, max_bytes=4096, window_ms=WINDOW, max_skew_ms=SKEW)


def _env(**kw: object) -> pb.BusEnvelope:
    fields: dict[str, object] = {
        "sender": "tolaria-0", "issued_at_ms": NOW_MS, "correlation_id": "corr", "reply_to": "oona.{command.run1}",
        "deadline_ms": NOW_MS + 5_000, "attributes": {"origin": "tolaria"},
    }
    fields.update(kw)
    payload = pb.SystemStatePacket(packet_id="p1", global_step=7, training_run_id="run1", training_metrics={"l": 0.5})
    return pack(payload, **fields)  # type: ignore[arg-type]


def _raw(env: pb.BusEnvelope | None = None, keys: SigningKeys | None = KEYS) -> bytes:
    env = _env() if env is None else env
    if keys is not None:
        sign_envelope(env, keys)
    return encode_envelope(env)


def _fields(raw: bytes) -> dict[bytes, bytes]:
    return {PAYLOAD_FIELD: raw}


def _validate(fields: dict[bytes, bytes], entry_id: str = ENTRY, now_ms: int = NOW_MS,
              replay: ReplayCache | None = None, policy: InboundPolicy = POLICY) -> pb.BusEnvelope:
    return validate_entry(fields, entry_id, policy=policy, now_ms=now_ms, replay=replay)


def _rejection(fields: dict[bytes, bytes], **kw: object) -> pb.DeadLetterReason.ValueType:
    with pytest.raises(EnvelopeError) as exc:
        _validate(fields, **kw)  # type: ignore[arg-type]
    err = exc.value
    assert err.reason != pb.DEAD_LETTER_REASON_UNSPECIFIED
    assert err.reason_name == reason_code(err.reason)
    return err.reason


def test_valid_entry_is_returned_verified() -> None:
    original = sign_envelope(_env(), KEYS)
    env = _validate(_fields(encode_envelope(original)), replay=ReplayCache())
    assert env == original
    assert env.message_id == original.message_id


# -- every rejection maps to its dead-letter reason -------------------------------------------------


def test_entry_without_payload_field_is_undecodable() -> None:
    assert _rejection({}) == pb.DEAD_LETTER_REASON_UNDECODABLE
    assert _rejection({b"data": _raw()}) == pb.DEAD_LETTER_REASON_UNDECODABLE
    with pytest.raises(EnvelopeError):
        entry_payload({b"signature": b"x"})
    assert entry_payload({PAYLOAD_FIELD: b"abc", b"x": b"y"}) == b"abc"


def test_garbage_is_undecodable() -> None:
    assert _rejection(_fields(b"\xff\xff\xff\xff")) == pb.DEAD_LETTER_REASON_UNDECODABLE


def test_oversize_is_refused_before_parsing() -> None:
    assert _rejection(_fields(b"\xff" * (POLICY.max_bytes + 1))) == pb.DEAD_LETTER_REASON_OVERSIZE
    big = _raw(_env(attributes={"pad": "x" * POLICY.max_bytes}))
    assert _rejection(_fields(big)) == pb.DEAD_LETTER_REASON_OVERSIZE


def test_missing_message_id() -> None:
    assert _rejection(_fields(b"")) == pb.DEAD_LETTER_REASON_MISSING_ID
    signed = _raw(_env(message_id="x"))
    without_id = signed.replace(b"\x22\x01x", b"")  # drop field 4 (message_id) from a signed envelope
    assert len(without_id) == len(signed) - 3
    assert _rejection(_fields(without_id)) == pb.DEAD_LETTER_REASON_MISSING_ID


def test_unsigned_is_missing_signature() -> None:
    assert _rejection(_fields(_raw(keys=None))) == pb.DEAD_LETTER_REASON_MISSING_SIGNATURE


def test_tampered_is_bad_signature() -> None:
    env = sign_envelope(_env(), KEYS)
    env.reply_to = "oona.{command.evil}"
    assert _rejection(_fields(encode_envelope(env))) == pb.DEAD_LETTER_REASON_BAD_SIGNATURE


def test_unknown_key() -> None:
    assert _rejection(_fields(_raw(keys=OTHER_KEYS))) == pb.DEAD_LETTER_REASON_UNKNOWN_KEY


def test_stale() -> None:
    raw = _raw(_env(issued_at_ms=NOW_MS - WINDOW - 1, deadline_ms=0))
    assert _rejection(_fields(raw)) == pb.DEAD_LETTER_REASON_STALE


def test_missing_issued_at_is_stale() -> None:
    assert _rejection(_fields(_raw(_env(issued_at_ms=0, deadline_ms=0)))) == pb.DEAD_LETTER_REASON_STALE


def test_from_future() -> None:
    raw = _raw(_env(issued_at_ms=NOW_MS + SKEW + 1, deadline_ms=0))
    assert _rejection(_fields(raw), entry_id=f"{NOW_MS + SKEW + 1}-0") == pb.DEAD_LETTER_REASON_FROM_FUTURE
    assert _rejection(_fields(raw)) == pb.DEAD_LETTER_REASON_FROM_FUTURE


def test_expired_deadline() -> None:
    raw = _raw(_env(deadline_ms=NOW_MS - 1))
    assert _rejection(_fields(raw)) == pb.DEAD_LETTER_REASON_EXPIRED


def test_replayed_in_another_entry() -> None:
    raw = _raw()
    cache = ReplayCache()
    _validate(_fields(raw), replay=cache)
    _validate(_fields(raw), replay=cache, now_ms=NOW_MS + 10)  # redelivery of the same entry
    assert _rejection(_fields(raw), entry_id=f"{NOW_MS}-1", replay=cache) == pb.DEAD_LETTER_REASON_REPLAYED
    _validate(_fields(raw), entry_id=f"{NOW_MS}-1", replay=None)  # no cache, no replay check


# -- order: cheapest first, nothing untrusted reaches the replay cache -------------------------------


def test_oversize_wins_over_everything() -> None:
    unsigned_big = _raw(_env(attributes={"pad": "x" * POLICY.max_bytes}), keys=None)
    assert _rejection(_fields(unsigned_big)) == pb.DEAD_LETTER_REASON_OVERSIZE


def test_signature_is_checked_before_freshness() -> None:
    stale_unsigned = _raw(_env(issued_at_ms=NOW_MS - 10 * WINDOW, deadline_ms=0), keys=None)
    assert _rejection(_fields(stale_unsigned)) == pb.DEAD_LETTER_REASON_MISSING_SIGNATURE
    stale_foreign = _raw(_env(issued_at_ms=NOW_MS - 10 * WINDOW, deadline_ms=0), keys=OTHER_KEYS)
    assert _rejection(_fields(stale_foreign)) == pb.DEAD_LETTER_REASON_UNKNOWN_KEY


def test_forged_or_stale_copies_do_not_poison_the_replay_cache() -> None:
    genuine = sign_envelope(_env(), KEYS)
    cache = ReplayCache()
    forged = pb.BusEnvelope()
    forged.CopyFrom(genuine)
    forged.signature = b"\x00" * 32
    assert _rejection(_fields(encode_envelope(forged)), entry_id=f"{NOW_MS}-5", replay=cache) == (
        pb.DEAD_LETTER_REASON_BAD_SIGNATURE
    )
    stale = sign_envelope(_env(message_id=genuine.message_id, issued_at_ms=NOW_MS - 2 * WINDOW, deadline_ms=0), KEYS)
    assert _rejection(_fields(encode_envelope(stale)), entry_id=f"{NOW_MS}-6", replay=cache) == (
        pb.DEAD_LETTER_REASON_STALE
    )
    assert len(cache) == 0
    assert _validate(_fields(encode_envelope(genuine)), replay=cache) == genuine


# -- age is measured at receipt, whatever the (client-settable) entry id says ------------------------


def test_backlogged_envelope_older_than_the_window_is_stale_at_receipt() -> None:
    raw = _raw(_env(deadline_ms=0))
    later = NOW_MS + WINDOW + 1  # read after an outage longer than the window: dead-lettered, not lost
    assert _rejection(_fields(raw), entry_id=f"{NOW_MS + 1}-0", now_ms=later) == pb.DEAD_LETTER_REASON_STALE
    _validate(_fields(raw), entry_id=f"{NOW_MS + 1}-0", now_ms=NOW_MS + WINDOW)


def test_old_envelope_re_added_under_an_early_entry_id_is_refused() -> None:
    """XADD accepts explicit ids, so an entry id is writer-chosen, not proof of when Redis stored it.

    freshness.py relies on "anything older [than the window] is refused as stale anyway" to bound the
    replay cache (TTL 2x window). A captured envelope re-added later, under an explicit id just after its
    issued_at (possible on any stream whose last id is older: a new command.<run> stream, an idle
    policy/bsds stream), must still be refused once the replay cache has forgotten its id.
    """
    captured = _raw(_env(deadline_ms=0))
    cache = ReplayCache()
    _validate(_fields(captured), entry_id=ENTRY, replay=cache)  # original delivery
    much_later = NOW_MS + 60 * WINDOW  # an hour on: replay cache TTL (2 x window) long expired
    try:
        _validate(_fields(captured), entry_id=f"{NOW_MS + 1}-0", now_ms=much_later, replay=cache)
    except EnvelopeError as e:
        assert e.reason in {pb.DEAD_LETTER_REASON_STALE, pb.DEAD_LETTER_REASON_REPLAYED}
    else:
        pytest.fail(
            "validate_entry accepted an hour-old envelope re-added under an early (client-settable) entry id "
            "after the replay cache had forgotten it: freshness must be measured at receipt"
        )


MAXB = 1 << 20


# -- best_effort_ids ---------------------------------------------------------------------------------


def test_best_effort_ids() -> None:
    env = sign_envelope(_env(message_id="m-42"), KEYS)
    assert best_effort_ids(encode_envelope(env), max_bytes=MAXB) == ("m-42", pb.BUS_MESSAGE_TYPE_SYSTEM_STATE)
    unsigned = _env(message_id="m-43")
    assert best_effort_ids(encode_envelope(unsigned), max_bytes=MAXB) == ("m-43", pb.BUS_MESSAGE_TYPE_SYSTEM_STATE)
    assert best_effort_ids(None, max_bytes=MAXB) == ("", pb.BUS_MESSAGE_TYPE_UNSPECIFIED)
    assert best_effort_ids(b"", max_bytes=MAXB) == ("", pb.BUS_MESSAGE_TYPE_UNSPECIFIED)
    assert best_effort_ids(b"\xff\xff\xff", max_bytes=MAXB) == ("", pb.BUS_MESSAGE_TYPE_UNSPECIFIED)
    invalid_utf8_id = b"\x22\x02\xff\xfe"
    assert best_effort_ids(invalid_utf8_id, max_bytes=MAXB) == ("", pb.BUS_MESSAGE_TYPE_UNSPECIFIED)


def test_best_effort_ids_does_not_parse_oversize_and_truncates_ids() -> None:
    env = sign_envelope(_env(message_id="m" * 1000), KEYS)
    raw = encode_envelope(env)
    assert best_effort_ids(raw, max_bytes=len(raw) - 1) == ("", pb.BUS_MESSAGE_TYPE_UNSPECIFIED)
    mid, _ = best_effort_ids(raw, max_bytes=len(raw))
    assert mid == "m" * 128


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=256))
def test_best_effort_ids_never_raises(raw: bytes) -> None:
    message_id, message_type = best_effort_ids(raw, max_bytes=MAXB)
    assert isinstance(message_id, str)
    assert isinstance(message_type, int)


# -- hostile bytes: only EnvelopeErrors, and only the genuine envelope gets through ------------------

GENUINE = sign_envelope(_env(message_id="fuzz-target", attributes={"origin": "tolaria", "run": "run1"}), KEYS)
GENUINE_RAW = encode_envelope(GENUINE)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(GENUINE_RAW)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        pos = draw(st.integers(0, max(len(data), 1) - 1)) if data else 0
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "overwrite" and data:
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


def _only_envelope_errors_or_genuine(raw: bytes) -> None:
    try:
        env = _validate(_fields(raw), replay=ReplayCache())
    except EnvelopeError as e:
        assert e.reason != pb.DEAD_LETTER_REASON_UNSPECIFIED
        return
    assert env == GENUINE, "a mutated entry verified as something other than the signed original"


def test_genuine_fuzz_target_is_accepted() -> None:
    assert _validate(_fields(GENUINE_RAW)) == GENUINE


@settings(max_examples=3000, deadline=None)
@given(_mutated())
def test_mutations_of_a_signed_envelope(raw: bytes) -> None:
    _only_envelope_errors_or_genuine(raw)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        _validate(_fields(raw), replay=ReplayCache())


def _entry_id_contract(entry_id: str) -> None:
    try:
        env = _validate(_fields(GENUINE_RAW), entry_id=entry_id, replay=ReplayCache())
    except EnvelopeError:
        return
    except Exception as e:  # the contract is EnvelopeError or a verified envelope, nothing else
        pytest.fail(f"BUG: validate_entry(entry_id={entry_id!r}) raised {type(e).__name__}: {e} "
                    "(entry ids must never reach int() unchecked)")
    assert env == GENUINE


@pytest.mark.parametrize("entry_id", ["", "-", "0-0", "abc", "1700000000000", "\u00b2-0", "\u0661\u0662-0", "1-2-3"])
def test_odd_entry_ids_only_raise_envelope_errors(entry_id: str) -> None:
    _entry_id_contract(entry_id)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=30),
                 st.text(st.one_of(st.characters(categories=("Nd", "No")), st.sampled_from("-0123456789")),
                         max_size=20)))
def test_any_entry_id_never_escapes_as_another_exception(entry_id: str) -> None:
    """Entry ids come from Redis, but validate_entry's contract is 'EnvelopeError or a verified envelope'."""
    _entry_id_contract(entry_id)
