"""Oona on a real redis-server: publish/consume, request/reply, poison, emergency-first, reclaim."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from esper.leyline import CHANNELS, pb
from esper.oona import Consumer, Delivery, EmergencyRateLimitedError, OonaClient, PublishError, Reject
from esper.oona.errors import RequestTimeoutError
from esper.oona.keeper import StreamKeeper
from tests.conftest import ClientFactory
from tests.oona._helpers import dead_letters, pending_count, state, wait_until

STATE = CHANNELS["state"]


async def test_publish_consume_ack(make_client: ClientFactory) -> None:
    pub = await make_client("trainer")
    sub = await make_client("tamiyo")
    got: list[str] = []

    async def handler(d: Delivery) -> None:
        got.append(d.message_as(pb.SystemStatePacket).packet_id)

    consumer = Consumer(sub, "state", group="tamiyo", handler=handler)
    await consumer.start()
    for i in range(5):
        await pub.publish("state", state(i))
    assert await consumer.drain() == 5
    assert got == [f"p{i}" for i in range(5)]
    assert await pending_count(sub.redis, STATE.stream("normal"), "tamiyo") == 0
    assert sub.metrics.consumed.labels("state", "normal", "ok")._value.get() == 5
    assert pub.metrics.published.labels("state", "normal")._value.get() == 5
    await consumer.close()


async def test_priority_picks_lane_and_emergency_is_handled_before_backlog(make_client: ClientFactory) -> None:
    pub = await make_client("trainer")
    sub = await make_client("tamiyo")
    await pub.publish_many("state", [state(i) for i in range(10_000)])
    urgent = await pub.publish("state", state("urgent"), priority=pb.MESSAGE_PRIORITY_CRITICAL)
    assert urgent.lane == "emergency" and urgent.stream == STATE.emergency_stream
    order: list[str] = []

    async def handler(d: Delivery) -> None:
        order.append(d.message_as(pb.SystemStatePacket).packet_id)

    consumer = Consumer(sub, "state", group="tamiyo", handler=handler, batch=100)
    await consumer.start()
    await consumer.drain()
    assert len(order) == 10_001
    assert order[0] == "purgent", f"emergency handled at position {order.index('purgent')}"
    await consumer.close()


async def test_conservative_mode_routes_everything_to_emergency(make_client: ClientFactory) -> None:
    pub = await make_client("trainer")
    pub.conservative = True
    published = await pub.publish("state", state(1))
    assert published.lane == "emergency"


async def test_emergency_token_bucket_refuses_loudly(make_client: ClientFactory) -> None:
    pub = await make_client("trainer", emergency_max_per_min=3)
    for i in range(3):
        await pub.publish("state", state(i), priority=pb.MESSAGE_PRIORITY_HIGH)
    with pytest.raises(EmergencyRateLimitedError):
        await pub.publish("state", state(4), priority=pb.MESSAGE_PRIORITY_HIGH)
    assert pub.metrics.emergency_rate_limited.labels("state")._value.get() == 1
    assert await pub.redis.xlen(STATE.emergency_stream) == 3
    # The normal lane is not rate limited.
    await pub.publish("state", state(5))


async def test_oversize_publish_is_refused_before_redis(make_client: ClientFactory) -> None:
    pub = await make_client("trainer", max_message_bytes=2048)
    big = pb.SystemStatePacket(packet_id="x" * 4096)
    with pytest.raises(PublishError, match="cap"):
        await pub.publish("state", big)
    assert await pub.redis.exists(STATE.stream("normal")) == 0


async def _echo(d: Delivery) -> pb.DecisionFailure:
    """Tamiyo's stand-in: a DecisionFailure naming the request's packet."""
    packet = d.message_as(pb.SystemStatePacket)
    return pb.DecisionFailure(packet_id=packet.packet_id, reason=pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE)


async def test_request_reply_within_deadline(make_client: ClientFactory) -> None:
    trainer = await make_client("trainer")
    tamiyo = await make_client("tamiyo")

    consumer = Consumer(tamiyo, "state", group="tamiyo", handler=_echo)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        for i in range(20):
            reply = await trainer.request("state", state(i), timeout_ms=2000)
            assert reply.message_as(pb.DecisionFailure).packet_id == f"p{i}"
            assert reply.envelope.sender == "tamiyo"
    finally:
        stop.set()
        await task
    assert trainer.metrics.late_replies._value.get() == 0


async def test_expired_request_is_not_answered_late(make_client: ClientFactory) -> None:
    trainer = await make_client("trainer")
    tamiyo = await make_client("tamiyo")
    handled: list[str] = []

    async def handler(d: Delivery) -> pb.DecisionFailure:
        handled.append(d.message_id)
        return pb.DecisionFailure(reason=pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE)

    consumer = Consumer(tamiyo, "state", group="tamiyo", handler=handler)
    await consumer.start()
    t0 = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        await trainer.request("state", state(1), timeout_ms=50)
    assert time.monotonic() - t0 < 5  # liveness: the requester was not stuck
    await consumer.drain()  # the responder comes up only after the deadline
    assert handled == [], "an expired request reached the handler"
    reasons = [r for r, _, _ in await dead_letters(tamiyo.redis)]
    assert reasons == ["expired"]
    assert await trainer.redis.xlen(trainer.reply_stream) == 0, "a late reply was written to the requester"
    assert trainer.metrics.request_timeouts.labels("state")._value.get() == 1
    await consumer.close()


async def test_late_reply_is_discarded_and_counted(make_client: ClientFactory) -> None:
    trainer = await make_client("trainer")
    tamiyo = await make_client("tamiyo")
    release = asyncio.Event()

    async def slow_then_fast(d: Delivery) -> pb.DecisionFailure:
        packet = d.message_as(pb.SystemStatePacket)
        if packet.packet_id == "pslow":
            await release.wait()
        return pb.DecisionFailure(packet_id=packet.packet_id, reason=pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE)

    consumer = Consumer(tamiyo, "state", group="tamiyo", handler=slow_then_fast)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    with pytest.raises(RequestTimeoutError):
        await trainer.request("state", state("slow"), timeout_ms=150)
    release.set()  # the handler now answers, after the requester gave up (deadline passed)
    await wait_until(lambda: _reply_written(trainer), what="late reply written")
    # The next request reads the stream: it gets its own reply and discards the late one.
    reply = await trainer.request("state", state("next"), timeout_ms=2000)
    assert reply.message_as(pb.DecisionFailure).packet_id == "pnext"
    assert await _late(trainer)
    stop.set()
    await task


async def test_a_request_gives_up_at_its_deadline_while_the_reply_read_is_still_blocked(
        make_client: ClientFactory) -> None:
    """Redis times a blocked XREAD out on its own cron (every 100 ms at `hz 10`), not at its BLOCK:
    a requester that waited for its own read kept a 5 ms request ~100 ms. Now the read stays blocked
    in its task (never cancelled mid-reply) and the requester gives up at its own deadline; a reply
    that lands afterwards is counted late and the next request is answered."""
    trainer = await make_client("trainer", block_ms=10_000)
    tamiyo = await make_client("tamiyo")
    with pytest.raises(RequestTimeoutError):
        await trainer.request("state", state("unanswered"), timeout_ms=5)
    blocked = [c for c in (await tamiyo.redis.client_list()) if c["cmd"] == "xread" and "b" in c["flags"]]
    assert len(blocked) == 1, "the request waited for its reply read to end instead of its own deadline"
    assert trainer.metrics.request_timeouts.labels("state")._value.get() == 1

    consumer = Consumer(tamiyo, "state", group="tamiyo", handler=_echo)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:  # the unanswered request expired before the group saw it; the next one is answered
        reply = await trainer.request("state", state("next"), timeout_ms=5_000)
        assert reply.message_as(pb.DecisionFailure).packet_id == "pnext"
    finally:
        stop.set()
        await task


async def _reply_written(client: OonaClient) -> bool:
    return int(await client.redis.xlen(client.reply_stream)) >= 1


async def test_concurrent_requests_share_one_reply_reader(make_client: ClientFactory) -> None:
    trainer = await make_client("trainer")
    tamiyo = await make_client("tamiyo")

    consumer = Consumer(tamiyo, "state", group="tamiyo", handler=_echo)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        replies = await asyncio.gather(*(trainer.request("state", state(i), timeout_ms=3000) for i in range(50)))
        assert [r.message_as(pb.DecisionFailure).packet_id for r in replies] == [f"p{i}" for i in range(50)]
        assert trainer.metrics.late_replies._value.get() == 0
    finally:
        stop.set()
        await task


async def _late(client: OonaClient) -> bool:
    return client.metrics.late_replies._value.get() >= 1


async def test_poison_message_dead_lettered_after_max_deliveries(make_client: ClientFactory) -> None:
    pub = await make_client("trainer")
    sub = await make_client("tamiyo")
    good: list[str] = []

    async def handler(d: Delivery) -> None:
        pid = d.message_as(pb.SystemStatePacket).packet_id
        if pid == "ppoison":
            raise RuntimeError("boom: cannot digest this packet")
        good.append(pid)

    consumer = Consumer(sub, "state", group="tamiyo", handler=handler)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await pub.publish("state", state("poison"))
    for i in range(10):
        await pub.publish("state", state(i))

    async def dead() -> bool:
        return len(await dead_letters(sub.redis)) == 1

    await wait_until(dead, what="poison dead-lettered")
    await pub.publish("state", state("after"))
    await wait_until(lambda: _has(good, "pafter"), what="consumer kept serving")
    stop.set()
    await task
    [(reason, record, _)] = await dead_letters(sub.redis)
    assert reason == "max_deliveries"
    assert record.deliveries == sub.settings.max_deliveries
    assert "boom" in record.detail
    assert record.source_stream == STATE.stream("normal")
    assert consumer.stats.handler_errors == sub.settings.max_deliveries
    assert sorted(good) == sorted([f"p{i}" for i in range(10)] + ["pafter"])
    assert await pending_count(sub.redis, STATE.stream("normal"), "tamiyo") == 0


async def _has(items: list[str], item: str) -> bool:
    return item in items


async def test_reject_dead_letters_immediately(make_client: ClientFactory) -> None:
    pub = await make_client("trainer")
    sub = await make_client("tamiyo")

    async def handler(d: Delivery) -> None:
        raise Reject("unknown training run")

    consumer = Consumer(sub, "state", group="tamiyo", handler=handler)
    await consumer.start()
    await pub.publish("state", state(1))
    await consumer.drain()
    [(reason, record, _)] = await dead_letters(sub.redis)
    assert reason == "handler_rejected" and "unknown training run" in record.detail
    assert consumer.stats.handler_errors == 0
    await consumer.close()


async def test_dead_letter_emits_telemetry_event(make_client: ClientFactory) -> None:
    sub = await make_client("tamiyo")
    consumer = Consumer(sub, "state", group="tamiyo", handler=_noop)
    await consumer.start()
    await sub.publish_raw(STATE.stream("normal"), {b"payload": b"\x00garbage"})
    await consumer.drain()
    await consumer.close()
    tel = CHANNELS["telemetry"]
    entries = [*await sub.redis.xrange(tel.emergency_stream), *await sub.redis.xrange(tel.stream("normal"))]
    from esper.leyline import decode_envelope, unpack_as

    packets = [unpack_as(decode_envelope(f[b"payload"]), pb.TelemetryPacket) for _, f in entries]
    events = [e for p in packets for e in p.events]
    assert any(e.attributes["event"] == "oona.dead_letter" and e.attributes["reason"] == "undecodable" for e in events)


async def _noop(d: Delivery) -> None:
    return None


async def test_redelivery_of_processed_message_is_skipped(make_client: ClientFactory) -> None:
    """An entry handled but not yet acked (ack lost) and then reclaimed must not run its handler again."""
    pub = await make_client("trainer")
    sub = await make_client("tamiyo")
    runs: list[str] = []

    async def handler(d: Delivery) -> None:
        runs.append(d.message_id)

    consumer = Consumer(sub, "state", group="tamiyo", name="a", handler=handler, ack_mode="batch")
    await consumer.start()
    await pub.publish("state", state(1))
    # Handle it, then lose the ack (as if the XACK never reached Redis).
    resp = await sub.redis.xreadgroup("tamiyo", "a", {STATE.stream("normal"): ">"}, count=10)
    [(stream, [(entry_id, fields)])] = resp
    await consumer._handle_entry(stream.decode(), "normal", entry_id.decode(), fields, 1)
    consumer._acks.clear()
    assert await pending_count(sub.redis, STATE.stream("normal"), "tamiyo") == 1
    await asyncio.sleep(sub.settings.visibility_timeout_ms / 1000 + 0.1)
    assert await consumer.reclaim() == 1
    assert runs == [runs[0]], "handler ran twice for one message"
    assert consumer.stats.duplicates == 1
    assert await pending_count(sub.redis, STATE.stream("normal"), "tamiyo") == 0
    await consumer.close()


async def test_keeper_dead_letters_entries_no_consumer_can_finish(make_client: ClientFactory) -> None:
    pub = await make_client("trainer")
    keeper_client = await make_client("oona")
    keeper = StreamKeeper(keeper_client, registry=CollectorRegistry())
    await keeper.ensure_all()
    await pub.publish("state", state(1))
    stream = STATE.stream("normal")
    # A consumer that keeps crashing: read (delivery 1) and reclaim repeatedly, never ack.
    await pub.redis.xreadgroup("tamiyo", "crashy", {stream: ">"}, count=1)
    for _ in range(keeper_client.settings.max_deliveries):
        await asyncio.sleep(keeper_client.settings.visibility_timeout_ms / 1000 + 0.05)
        await pub.redis.xautoclaim(stream, "tamiyo", "crashy", min_idle_time=1, start_id="0-0")
    await asyncio.sleep(keeper_client.settings.visibility_timeout_ms / 1000 + 0.05)
    result = await keeper.tick()
    assert result.dead_lettered == 1
    [(reason, record, _)] = await dead_letters(pub.redis)
    assert reason == "max_deliveries" and record.consumer == "oona-keeper"
    assert await pending_count(pub.redis, stream, "tamiyo") == 0
    assert keeper.metrics.deadletters._value.get() == 1


async def test_durable_consumer_takes_a_longer_freshness_window(make_client: ClientFactory) -> None:
    from esper.core.clock import now_ms
    from esper.leyline import encode_envelope, pack, sign_envelope

    sub = await make_client("simic")
    window = sub.settings.freshness_window_ms
    old = pack(state("old"), sender="tamiyo", issued_at_ms=now_ms() - 2 * window)
    raw = encode_envelope(sign_envelope(old, sub.keys))
    handled: list[str] = []

    async def handler(d: Delivery) -> None:
        handled.append(d.message_as(pb.SystemStatePacket).packet_id)

    default = Consumer(sub, "state", group="strict", handler=handler)
    durable = Consumer(sub, "state", group="durable", handler=handler, freshness_window_ms=4 * window)
    await default.start()
    await durable.start()
    await sub.publish_raw(STATE.stream("normal"), {b"payload": raw})
    await default.drain()
    await durable.drain()
    assert handled == ["pold"]
    assert [r for r, _, _ in await dead_letters(sub.redis)] == ["stale"]
    await default.close()
    await durable.close()
