"""Regression tests for defects found in review: each one used to crash, hang, lose or starve."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from esper.core.deadline import Deadline
from esper.core.redis_server import EmbeddedRedis
from esper.leyline import CHANNELS, encode_envelope, pack, pb, sign_envelope
from esper.oona import Consumer, Delivery, OonaClient, OonaError, OonaSettings, PublishError
from esper.oona.errors import RequestTimeoutError
from tests.conftest import ClientFactory
from tests.oona._helpers import dead_letters, pending_count, state

STATE = CHANNELS["state"]


async def test_unsendable_reply_is_dead_lettered_and_consumer_survives(make_client: ClientFactory) -> None:
    trainer = await make_client("trainer")
    tamiyo = await make_client("tamiyo")

    async def bad(d: Delivery) -> pb.MetricPoint:  # not a bus payload
        return pb.MetricPoint(name="x")

    consumer = Consumer(tamiyo, "state", group="tamiyo", handler=bad)  # type: ignore[arg-type]
    await consumer.start()
    await trainer.publish("state", state(1), reply_to=trainer.reply_stream)
    await consumer.drain()
    [(reason, record, _)] = await dead_letters(tamiyo.redis)
    assert reason == "handler_rejected" and "unsendable reply" in record.detail
    await trainer.publish("state", state(2))
    assert await consumer.drain() == 1  # still serving
    await consumer.close()


@pytest.mark.parametrize("target", ["evil:key", "oona.{emergency}.emergency", "oona.{state}", "oona.{reply.x}.y{z}"])
async def test_reply_to_outside_reply_streams_is_refused(make_client: ClientFactory, target: str) -> None:
    trainer = await make_client("trainer")
    tamiyo = await make_client("tamiyo")
    handled: list[str] = []

    async def echo(d: Delivery) -> pb.DecisionFailure:
        handled.append(d.message_id)
        return pb.DecisionFailure(reason=pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE)

    consumer = Consumer(tamiyo, "state", group="tamiyo", handler=echo)
    await consumer.start()
    for _ in range(3):
        await trainer.publish_raw(CHANNELS["emergency"].emergency_stream, {b"payload": b"keep-me"})
    await trainer.publish("state", state(1), reply_to=target)
    await consumer.drain()
    assert handled == []
    assert [r for r, _, _ in await dead_letters(tamiyo.redis)] == ["bad_reply_to"]
    assert await tamiyo.redis.xlen(CHANNELS["emergency"].emergency_stream) == 3
    await consumer.close()


@contextlib.asynccontextmanager
async def _own_server(socket_timeout_s: float) -> AsyncIterator[tuple[int, OonaClient]]:
    """(pid, connected client) of a private redis-server the test may SIGSTOP; both gone afterwards."""
    server = EmbeddedRedis()
    server.start()
    settings = OonaSettings(redis_url=server.url, leyline_secret="s" * 32, socket_timeout_s=socket_timeout_s,
                            metrics_port=-1)
    client = OonaClient.from_settings(settings, sender="trainer")
    try:
        await client.connect()
        assert server.pid is not None
        yield server.pid, client
    finally:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)  # harmless when running
        await client.close()
        server.stop()


async def test_request_is_bounded_by_its_deadline_when_redis_hangs() -> None:
    async with _own_server(2.0) as (pid, client):
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await client.request("state", state(1), timeout_ms=100)
        assert time.monotonic() - t0 < 1.5, "the request outlived its 100 ms deadline by far (socket timeouts)"
        assert client.metrics.request_timeouts.labels("state")._value.get() == 1


async def test_a_timed_out_publish_is_not_re_sent() -> None:
    """A timed-out XADD may have been applied, so only connection errors are retried. redis-py adds the
    pool's `retry_on_error` to its Retry's default list, which holds timeouts too: each XADD to a stalled
    Redis was re-sent 3 times on new connections (8 s with 2 s timeouts; copies could land on resume)."""
    async with _own_server(0.3) as (pid, client):
        connections = int((await client.redis.info("stats"))["total_connections_received"])
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(PublishError):
                await client.publish("state", state(1))
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.2)  # the server now processes what reached it while stopped
        assert await client.redis.xlen(CHANNELS["state"].normal_stream) == 1  # sent once, applied once
        # one connection since: the one this check needed (each retry had reconnected to re-send)
        assert int((await client.redis.info("stats"))["total_connections_received"]) - connections == 1


async def test_close_fails_waiting_requests_with_a_typed_error(make_client: ClientFactory) -> None:
    trainer = await make_client("trainer")
    pending = asyncio.create_task(trainer.request("state", state(1), timeout_ms=5_000))
    await asyncio.sleep(0.2)
    await trainer.close()
    with pytest.raises(OonaError, match="closed"):
        await pending
    assert not pending.cancelled()


async def test_a_reply_dispatched_in_the_pass_its_deadline_fires_in_is_returned(make_client: ClientFactory) -> None:
    """The reader sets the reply, then the due deadline timer runs in the same loop pass (the loop was
    busy past the deadline): the request was cancelled with the reply in hand, a timeout that counted
    the reply nowhere. The exact interleaving, built on a real client's wait."""
    trainer = await make_client("trainer")
    fut: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(trainer._await_reply(fut, Deadline.after_ms(20)))
    await asyncio.sleep(0)  # the requester waits, its deadline timer armed
    time.sleep(0.05)  # noqa: ASYNC251  # the loop is busy past the deadline (a GIL-starved bus thread, say)
    await asyncio.sleep(0)  # this pass resumes us first, then runs the now-due timer
    reply = object()
    fut.set_result(reply)  # type: ignore[arg-type]  # the reader dispatches the reply in that same pass
    assert await waiting is reply


async def test_a_closed_client_refuses_a_request_at_once(make_client: ClientFactory) -> None:
    """It published, waited out its whole deadline, and re-created the reply stream close() deleted."""
    trainer = await make_client("trainer")
    await trainer.close()
    with pytest.raises(OonaError, match="closed"):
        await trainer.request("state", state(1), timeout_ms=60_000)
    probe = await make_client("probe")
    assert await probe.redis.exists(trainer.reply_stream) == 0


async def test_close_does_not_wait_out_a_blocked_reply_read_and_keeps_its_callers_cancel(
        make_client: ClientFactory) -> None:
    """One request answered, another still waiting: the reader has just sent its next XREAD BLOCK, where
    a cancel can be swallowed (redis-py's wait_for on Python 3.11) and close() waited the whole BLOCK.
    close() now closes the read's connection; and a cancel of the task running close() is not eaten."""
    trainer = await make_client("trainer", block_ms=30_000)
    tamiyo = await make_client("tamiyo")

    async def answer_only_a(d: Delivery) -> pb.DecisionFailure | None:
        packet = d.message_as(pb.SystemStatePacket)
        return pb.DecisionFailure(packet_id=packet.packet_id) if packet.packet_id == "pa" else None

    stop = asyncio.Event()
    responder = asyncio.create_task(Consumer(tamiyo, "state", group="tamiyo", handler=answer_only_a).run(stop))
    try:
        a = asyncio.create_task(trainer.request("state", state("a"), timeout_ms=60_000))
        b = asyncio.create_task(trainer.request("state", state("b"), timeout_ms=60_000))
        await a
        async with asyncio.timeout(10):  # a third of the BLOCK: close() did not wait the read out
            await trainer.close()
        with pytest.raises(OonaError, match="closed"):
            await b
    finally:
        stop.set()
        await responder
    other = await make_client("other")
    c = asyncio.create_task(other.request("state", state("c"), timeout_ms=60_000))
    await asyncio.sleep(0.2)  # its reader is blocked in XREAD
    closer = asyncio.create_task(other.close())
    await asyncio.sleep(0)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert isinstance((await asyncio.gather(c, return_exceptions=True))[0], OonaError)
    await other.close()  # finishes the interrupted close
    assert other._close_finished


async def test_reclaim_counts_are_exact_when_own_pending_entries_crowd_the_range(make_client: ClientFactory) -> None:
    pub = await make_client("trainer")
    sub = await make_client("tamiyo")
    stream = STATE.stream("normal")
    runs: list[str] = []

    async def handler(d: Delivery) -> None:
        runs.append(d.message_as(pb.SystemStatePacket).packet_id)

    me = Consumer(sub, "state", group="tamiyo", name="me", handler=handler)
    await me.start()
    ids = [p for p in await pub.publish_many("state", [state(i) for i in range(12)])]
    # A dead consumer holds the first and last; "me" holds the ten in between (fresh, not idle).
    await sub.redis.xreadgroup("tamiyo", "dead", {stream: ">"}, count=1)
    await sub.redis.xreadgroup("tamiyo", "me", {stream: ">"}, count=10)
    await sub.redis.xreadgroup("tamiyo", "dead", {stream: ">"}, count=1)
    await asyncio.sleep(sub.settings.visibility_timeout_ms / 1000 + 0.1)
    await sub.redis.xclaim(stream, "tamiyo", "me", 0, ids[1:11])  # "me"'s own entries: idle time reset
    assert await me.reclaim() == 2
    assert sorted(runs) == ["p0", "p11"], "a reclaimed entry was dead-lettered instead of handled"
    assert await dead_letters(sub.redis) == []
    await me.close()


async def test_big_reclaim_backlog_does_not_starve_the_emergency_lane(make_client: ClientFactory) -> None:
    pub = await make_client("trainer")
    sub = await make_client("tamiyo")
    stream = STATE.stream("normal")
    order: list[str] = []

    async def handler(d: Delivery) -> None:
        order.append(d.message_as(pb.SystemStatePacket).packet_id)

    consumer = Consumer(sub, "state", group="tamiyo", name="me", handler=handler, batch=50)
    await consumer.start()
    await pub.publish_many("state", [state(i) for i in range(1000)])
    await sub.redis.xreadgroup("tamiyo", "dead", {stream: ">"}, count=1000)  # a consumer that then died
    await asyncio.sleep(sub.settings.visibility_timeout_ms / 1000 + 0.1)
    await pub.publish("state", state("urgent"), priority=pb.MESSAGE_PRIORITY_CRITICAL)
    async with asyncio.timeout(30):  # liveness bound: one reclaim page per claim interval
        while len(order) < 1001:
            await consumer.run_once(block_ms=10)
    assert len(order) == 1001
    assert order.index("purgent") <= 2 * consumer.batch, f"emergency handled at {order.index('purgent')}"
    assert await pending_count(sub.redis, stream, "tamiyo") == 0
    await consumer.close()


async def test_forged_traffic_does_not_use_up_the_process_emergency_quota(make_client: ClientFactory) -> None:
    sub = await make_client("tamiyo", emergency_max_per_min=20)
    consumer = Consumer(sub, "state", group="tamiyo", handler=_noop)
    await consumer.start()
    rogue = pack(state(1), sender="rogue", issued_at_ms=int(time.time() * 1000))
    from esper.leyline import SigningKeys

    forged = encode_envelope(sign_envelope(rogue, SigningKeys("k1", b"not-the-secret-at-all!!")))
    for _ in range(30):
        await sub.publish_raw(STATE.stream("normal"), {b"payload": forged})
    await consumer.drain()
    assert len(await dead_letters(sub.redis)) == 30
    assert sub.metrics.telemetry_dropped.labels("emergency_rate")._value.get() == 10
    # The process's own emergency still goes out.
    await sub.publish("emergency", pb.EmergencySignal(level=pb.EMERGENCY_LEVEL_HALT, reason="drill"),
                      priority=pb.MESSAGE_PRIORITY_CRITICAL)
    await consumer.close()


async def _noop(d: Delivery) -> None:
    return None


async def test_failed_reply_flush_keeps_the_reply(tmp_path: object) -> None:
    """Redis dies right after the handler: the reply (not only the ack) must be sent on the next flush."""
    server = EmbeddedRedis(appendonly=True)
    server.start()
    settings = OonaSettings(redis_url=server.url, leyline_secret="s" * 32, redis_retries=0, block_ms=50,
                            metrics_port=-1)
    trainer = OonaClient.from_settings(settings, sender="trainer")
    tamiyo = OonaClient.from_settings(settings, sender="tamiyo")
    await trainer.connect()
    await tamiyo.connect()

    async def answer_then_lose_redis(d: Delivery) -> pb.DecisionFailure:
        await asyncio.to_thread(server.stop)
        return pb.DecisionFailure(packet_id="p1", reason=pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE)

    consumer = Consumer(tamiyo, "state", group="tamiyo", handler=answer_then_lose_redis)
    await consumer.start()
    await trainer.publish("state", state(1), reply_to=trainer.reply_stream)
    with pytest.raises(Exception, match=r"(?i)connect|closed|refused|reset"):
        await consumer.run_once(block_ms=0)
    assert consumer._replies, "the unsent reply was dropped"
    await asyncio.to_thread(server.start)
    await tamiyo.connect()
    await consumer.close()
    assert await tamiyo.redis.xlen(trainer.reply_stream) == 1
    await trainer.close()
    await tamiyo.close()
    server.stop()


async def test_keeper_deletes_abandoned_reply_streams_only(make_client: ClientFactory) -> None:
    from prometheus_client import CollectorRegistry

    from esper.oona.keeper import StreamKeeper

    client = await make_client("oona")
    keeper = StreamKeeper(client, registry=CollectorRegistry())
    old_ms = int(time.time() * 1000) - client.settings.reply_stream_ttl_ms - 60_000
    await client.redis.xadd("oona.{reply.crashed.abc}", {b"payload": b"x"}, id=f"{old_ms}-0")
    await client.redis.xadd("oona.{reply.alive.def}", {b"payload": b"x"})
    await client.redis.xadd("oona.{state}", {b"payload": b"x"}, id=f"{old_ms}-0")
    assert await keeper.sweep_reply_streams() == 1
    assert not await client.redis.exists("oona.{reply.crashed.abc}")
    assert await client.redis.exists("oona.{reply.alive.def}")
    assert await client.redis.exists("oona.{state}")


async def test_keeper_sweeps_past_the_first_page_of_pending(make_client: ClientFactory) -> None:
    from prometheus_client import CollectorRegistry

    from esper.oona.keeper import StreamKeeper

    client = await make_client("oona")
    keeper = StreamKeeper(client, registry=CollectorRegistry(), channels={"state": STATE})
    await keeper.ensure_all()
    stream = STATE.stream("normal")
    await client.publish_many("state", [state(i) for i in range(250)])
    await client.redis.xreadgroup("tamiyo", "crashy", {stream: ">"}, count=250)
    for _ in range(client.settings.max_deliveries):
        await asyncio.sleep(client.settings.visibility_timeout_ms / 1000 + 0.05)
        start = "0-0"
        while True:
            nxt, _, _ = await client.redis.xautoclaim(stream, "tamiyo", "crashy", min_idle_time=1, start_id=start,
                                                     count=100)
            start = nxt.decode()
            if start == "0-0":
                break
    await asyncio.sleep(client.settings.visibility_timeout_ms / 1000 + 0.05)
    result = await keeper.tick()
    assert result.dead_lettered == 250
    assert await pending_count(client.redis, stream, "tamiyo") == 0
