"""Property-based fuzzing of the consume path on a real redis-server (thousands of hostile entries).

Every hostile entry must land in `oona.deadletter` with a reason; the consumer never crashes, never
hands garbage to the handler, and still serves the valid messages mixed in.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.core.clock import now_ms
from esper.leyline import CHANNELS, DEADLETTER_STREAM, SigningKeys, encode_envelope, pack, pb, sign_envelope
from esper.oona import Consumer, Delivery, OonaClient, OonaSettings

STREAM = CHANNELS["state"].stream("normal")
MAX_BYTES = 4096


@dataclass
class Rig:
    runner: asyncio.Runner
    client: OonaClient
    consumer: Consumer
    keys: SigningKeys
    handled: list[str]
    reasons: dict[str, int]


@pytest.fixture(scope="module")
def rig(redis_url: str) -> Iterator[Rig]:
    secret = secrets.token_hex(16)
    s = OonaSettings(redis_url=redis_url, leyline_secret=secret, max_message_bytes=MAX_BYTES, block_ms=0,
                     metrics_port=-1, emergency_max_per_min=10**9)
    runner = asyncio.Runner()
    client = OonaClient.from_settings(s, sender="fuzz")
    handled: list[str] = []

    async def handler(d: Delivery) -> None:
        handled.append(d.message_as(pb.SystemStatePacket).packet_id)

    consumer = Consumer(client, "state", group="tamiyo", handler=handler, batch=100)

    async def setup() -> None:
        await client.connect()
        await client.redis.flushdb()
        await consumer.start()

    runner.run(setup())
    try:
        yield Rig(runner, client, consumer, s.signing_keys(), handled, {})
    finally:
        runner.run(consumer.close())
        runner.run(client.close())
        runner.close()


def _signed(keys: SigningKeys, packet_id: str, *, issued_at_ms: int | None = None, deadline_ms: int = 0) -> bytes:
    env = pack(pb.SystemStatePacket(packet_id=packet_id), sender="fuzzer",
               issued_at_ms=now_ms() if issued_at_ms is None else issued_at_ms, deadline_ms=deadline_ms)
    return encode_envelope(sign_envelope(env, keys))


OTHER_KEYS = SigningKeys(key_id="k1", secret=b"not-the-fleet-secret-at-all")
ROGUE_KEY_ID = SigningKeys(key_id="rogue", secret=b"x" * 32)

# A hostile entry is described, then materialised with the rig's keys (hypothesis cannot see them).
hostile = st.one_of(
    st.tuples(st.just("random"), st.binary(max_size=300)),
    st.tuples(st.just("truncate"), st.integers(min_value=0, max_value=60)),
    st.tuples(st.just("flip"), st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=7)),
    st.tuples(st.just("oversize"), st.integers(min_value=1, max_value=2000)),
    st.tuples(st.just("wrong_secret"), st.just(0)),
    st.tuples(st.just("unknown_key"), st.just(0)),
    st.tuples(st.just("stale"), st.integers(min_value=61_000, max_value=10**9)),
    st.tuples(st.just("future"), st.integers(min_value=6_000, max_value=10**9)),
    st.tuples(st.just("expired"), st.integers(min_value=1, max_value=10**6)),
    st.tuples(st.just("no_payload"), st.binary(max_size=50)),
    st.tuples(st.just("replay"), st.just(0)),
)


def _materialise(case: tuple[object, ...], keys: SigningKeys, n: int) -> list[tuple[dict[bytes, bytes], bool]]:
    """Entries for one case as (fields, is_hostile). A replay yields the valid original plus its copy."""
    kind = case[0]
    pid = f"{kind}-{n}-{secrets.token_hex(4)}"
    good = _signed(keys, pid)
    if kind == "random":
        return [({b"payload": bytes(case[1])}, True)]  # type: ignore[call-overload]
    if kind == "truncate":
        cut = min(int(case[1]), len(good) - 1)  # type: ignore[call-overload]
        return [({b"payload": good[:cut]}, True)]
    if kind == "flip":
        raw = bytearray(good)
        i = int(case[1]) % len(raw)  # type: ignore[call-overload]
        raw[i] ^= 1 << int(case[2])  # type: ignore[call-overload]
        return [({b"payload": bytes(raw)}, True)]
    if kind == "oversize":
        return [({b"payload": good + b"\x00" * (MAX_BYTES + int(case[1]))}, True)]  # type: ignore[call-overload]
    if kind == "wrong_secret":
        return [({b"payload": _signed(OTHER_KEYS, pid)}, True)]
    if kind == "unknown_key":
        return [({b"payload": _signed(ROGUE_KEY_ID, pid)}, True)]
    if kind == "stale":
        return [({b"payload": _signed(keys, pid, issued_at_ms=now_ms() - int(case[1]))}, True)]  # type: ignore[call-overload]
    if kind == "future":
        return [({b"payload": _signed(keys, pid, issued_at_ms=now_ms() + int(case[1]))}, True)]  # type: ignore[call-overload]
    if kind == "expired":
        return [({b"payload": _signed(keys, pid, deadline_ms=now_ms() - int(case[1]))}, True)]  # type: ignore[call-overload]
    if kind == "no_payload":
        return [({b"junk": bytes(case[1]) or b"x"}, True)]  # type: ignore[call-overload]
    assert kind == "replay"
    return [({b"payload": good}, False), ({b"payload": good}, True)]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=st.lists(hostile, min_size=1, max_size=20), valid_every=st.integers(min_value=2, max_value=6))
def test_every_hostile_entry_is_dead_lettered_and_consumer_survives(
    rig: Rig, cases: list[tuple[object, ...]], valid_every: int
) -> None:
    async def run() -> None:
        r = rig.client.redis
        before_dl = await r.xlen(DEADLETTER_STREAM)
        last = await r.xrevrange(DEADLETTER_STREAM, count=1)
        since = last[0][0] if last else b"0-0"
        before_handled = len(rig.handled)
        pipe = r.pipeline(transaction=False)
        hostile_count, valid_ids = 0, []
        for n, case in enumerate(cases):
            for fields, is_hostile in _materialise(case, rig.keys, n):
                pipe.xadd(STREAM, fields)  # type: ignore[arg-type]
                hostile_count += is_hostile
            if n % valid_every == 0:
                vid = f"valid-{n}-{secrets.token_hex(4)}"
                pipe.xadd(STREAM, {b"payload": _signed(rig.keys, vid)})
                valid_ids.append(vid)
        await pipe.execute()
        await rig.consumer.drain()
        new_dl = await r.xlen(DEADLETTER_STREAM) - before_dl
        assert new_dl == hostile_count, f"{hostile_count} hostile entries, {new_dl} dead letters"
        for _, fields in await r.xrange(DEADLETTER_STREAM, min=b"(" + since):
            reason = fields[b"reason"].decode()
            rig.reasons[reason] = rig.reasons.get(reason, 0) + 1
        handled = rig.handled[before_handled:]
        replayed_originals = [h for h in handled if h.startswith("replay-")]
        assert sorted(set(handled) - set(replayed_originals)) == sorted(valid_ids)
        assert all(h.startswith(("valid-", "replay-")) for h in handled), handled
        assert await r.xpending(STREAM, "tamiyo") is not None
        pending = (await r.xpending(STREAM, "tamiyo"))["pending"]
        assert pending == 0, f"{pending} entries left pending"

    rig.runner.run(run())


def test_fuzz_covered_every_reason(rig: Rig) -> None:
    """The property above must actually have exercised each rejection path (a check that can fail)."""
    reasons = set(rig.reasons)
    expected = {"undecodable", "oversize", "bad_signature", "unknown_key", "stale", "from_future", "expired",
                "replayed"}
    assert expected <= reasons, f"never produced: {expected - reasons}"
    print("dead-letter reasons exercised:", rig.reasons)
    assert sum(rig.reasons.values()) >= 1000, f"only {sum(rig.reasons.values())} hostile entries were exercised"
