"""Oona bus benchmark: request/reply, publish, consume and emergency delivery, each beside a baseline.

Run: `.venv/bin/python bench/oona_bench.py --out bench/results/oona.json` (`make bench-oona`).

Everything runs on uvloop against a private `redis-server` started here with `EmbeddedRedis` (a free
loopback port; never the system Redis). Every figure of ours is measured in the same run as its
baseline (raw redis-py asyncio on the same loop, FastStream's Redis Streams broker for
request/reply), interleaved round by round, because these machines are noisy (ARCHITECTURE §11).
Budgets are printed and recorded as `goal_*` flags; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import importlib.metadata
import json
import logging
import multiprocessing as mp
import os
import platform
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import uvloop
from faststream.redis import RedisBroker, StreamSub
from google.protobuf.message import Message
from redis.asyncio import Redis
from redis.utils import HIREDIS_AVAILABLE

from esper.core.redis_server import EmbeddedRedis
from esper.leyline import Channel, channel, pb
from esper.oona import Consumer, Delivery, OonaClient, OonaSettings
from esper.oona.consumer import AckMode

try:
    from bench.benchlib import git_state, percentile, redis_version
except ImportError:  # run as a script: bench/ is on sys.path
    from benchlib import git_state, percentile, redis_version  # type: ignore[import-not-found,no-redef]

SECRET = secrets.token_hex(16)
GROUP = "tamiyo"
PAYLOAD = b"payload"
EMERGENCY_BUCKET_PER_MIN = 1_000_000  # the prototype's 120/min would refuse 200 alerts in one second
RR_TIMEOUT_MS = 1_000.0
GC_GEN0_THRESHOLD = 10_000  # with gc.freeze(): the hot-consumer habit of ARCHITECTURE §4, same for all


@dataclass(frozen=True, slots=True)
class Sizes:
    rr_warmup: int = 300
    rr_rounds: int = 30  # short rounds, order rotated: machine noise hits every implementation alike
    rr_per_round: int = 100  # per implementation per round: 3000 timed requests each
    batch: int = 100  # publish_many batch, raw pipeline batch, consume read COUNT
    tp_rounds: int = 3  # throughput rounds (ours and raw interleaved); the median is reported
    publish_n: int = 20_000
    unpipelined_n: int = 4_000
    consume_n: int = 20_000
    consume_eager_n: int = 5_000  # eager acks cost a round trip per entry: fewer entries, same rate
    backlog_n: int = 100_000
    emergency_n: int = 200
    emergency_interval_ms: float = 5.0


QUICK = Sizes(rr_warmup=50, rr_rounds=4, rr_per_round=50, tp_rounds=1, publish_n=2_000, unpipelined_n=500,
              consume_n=2_000, consume_eager_n=500, backlog_n=10_000, emergency_n=40)

Result = dict[str, Any]
Fields = dict[Any, Any]  # stream entry fields as redis-py takes them (its stubs are stricter than its API)


# -- helpers -----------------------------------------------------------------------------------------


def settings(url: str, **overrides: Any) -> OonaSettings:
    return OonaSettings(redis_url=url, leyline_secret=SECRET, **overrides)


def state_packet(i: int = 0) -> pb.SystemStatePacket:
    """A small SystemStatePacket (the request of the decision loop, minus the seed states)."""
    return pb.SystemStatePacket(
        version=1, current_epoch=3, packet_id=f"pkt-{i:08d}", global_step=i, training_loss=0.25,
        validation_loss=0.3, validation_accuracy=0.9, training_run_id="bench-run", source_subsystem="tolaria",
        training_metrics={"loss": 0.25, "gradient_norm": 1.5, "samples_per_s": 1200.0},
    )


def reply_message() -> pb.DecisionFailure:
    return pb.DecisionFailure(packet_id="pkt-00000000", reason=pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE)


def sealed_size(url: str, message: Message, **fields: Any) -> int:
    """Bytes of the signed envelope Oona puts in the stream (raw baselines use payloads this big)."""
    client = OonaClient.from_settings(settings(url), sender="tolaria")
    _, raw = client.seal(message, **fields)
    return len(raw)


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 4)


def latency_keys(prefix: str, samples: Sequence[float]) -> Result:
    return {
        f"{prefix}_p50_ms": ms(percentile(samples, 50)),
        f"{prefix}_p90_ms": ms(percentile(samples, 90)),
        f"{prefix}_p99_ms": ms(percentile(samples, 99)),
        f"{prefix}_max_ms": ms(max(samples)),
        f"{prefix}_count": len(samples),
    }


def freeze_heap() -> None:
    """Collect once, move every survivor of set-up to the permanent generation, raise gen-0."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def flushall(url: str) -> None:
    r = Redis.from_url(url)
    await r.flushall()
    await r.aclose()


async def stop_task(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, timeout=10.0)


# -- request/reply -----------------------------------------------------------------------------------


class RoundTrip(Protocol):
    name: str

    async def start(self) -> None: ...

    async def call(self) -> None: ...

    async def stop(self) -> None: ...


class OonaRoundTrip:
    """OonaClient.request on `state` → a Consumer in group `tamiyo` returning a prebuilt reply."""

    name = "oona"

    def __init__(self, url: str) -> None:
        s = settings(url)
        self.requester = OonaClient.from_settings(s, sender="tolaria")
        self.responder = OonaClient.from_settings(s, sender="tamiyo")
        reply = reply_message()

        async def handler(_: Delivery) -> Message | None:
            return reply

        self.consumer = Consumer(self.responder, "state", group=GROUP, handler=handler)
        self.request_msg = state_packet()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.requester.connect()
        await self.responder.connect()
        await self.consumer.start()
        self._task = asyncio.create_task(self.consumer.run(self._stop))

    async def call(self) -> None:
        await self.requester.request("state", self.request_msg, timeout_ms=RR_TIMEOUT_MS)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._stop, self._task)
        await self.requester.close()
        await self.responder.close()


class RawRoundTrip:
    """The same Redis commands with plain redis-py: XADD request; responder XREADGROUP BLOCK on its own
    connection, pipeline XADD reply + XACK; requester XREAD BLOCK of its reply stream on its own connection."""

    name = "raw"
    stream = "raw.{rr}"
    reply_stream = "raw.{rr}.reply"

    def __init__(self, url: str, request_size: int, reply_size: int) -> None:
        self.cmd = Redis.from_url(url)
        self.reply_reader = Redis.from_url(url, single_connection_client=True)
        self.srv_cmd = Redis.from_url(url)
        self.srv_reader = Redis.from_url(url, single_connection_client=True)
        self.request: Fields = {PAYLOAD: os.urandom(request_size), b"reply_to": self.reply_stream.encode()}
        self.reply: Fields = {PAYLOAD: os.urandom(reply_size)}
        self.last_reply = b"0-0"
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.srv_cmd.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while not self._stopping:
            resp: Any = await self.srv_reader.xreadgroup(GROUP, "raw-1", {self.stream: ">"}, count=50, block=200)
            for _stream, entries in resp or ():
                for entry_id, fields in entries:
                    pipe = self.srv_cmd.pipeline(transaction=False)
                    pipe.xadd(fields[b"reply_to"], self.reply, maxlen=1_000, approximate=True)
                    pipe.xack(self.stream, GROUP, entry_id)
                    await pipe.execute()

    async def call(self) -> None:
        await self.cmd.xadd(self.stream, self.request, maxlen=10_000, approximate=True)
        resp: Any = await self.reply_reader.xread({self.reply_stream: self.last_reply}, count=1, block=1_000)
        self.last_reply = resp[0][1][-1][0]

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout=10.0)
        for r in (self.cmd, self.reply_reader, self.srv_cmd, self.srv_reader):
            await r.aclose()


class FastStreamRoundTrip:
    """FastStream 0.7: `broker.request(..., stream=...)` XADDs to the stream; a StreamSub subscriber in a
    group returns the reply, which FastStream sends back over Redis pub/sub to a per-request channel."""

    name = "faststream"
    stream = "fs.{rr}"

    def __init__(self, url: str, request_size: int, reply_size: int) -> None:
        # logger=None: no per-message log lines, which would be unfair to FastStream (stubs omit None).
        self.broker = RedisBroker(url, logger=None)  # type: ignore[arg-type]
        reply = os.urandom(reply_size)
        self.request = os.urandom(request_size)

        async def handle(body: bytes) -> bytes:
            return reply

        self.broker.subscriber(stream=StreamSub(self.stream, group=GROUP, consumer="fs-1"))(handle)

    async def start(self) -> None:
        await self.broker.start()

    async def call(self) -> None:
        await self.broker.request(self.request, stream=self.stream, timeout=RR_TIMEOUT_MS / 1000.0)

    async def stop(self) -> None:
        await self.broker.stop()


async def bench_request_reply(url: str, sizes: Sizes) -> Result:
    """Interleave rounds of sequential requests per implementation (order rotated each round)."""
    req_size = sealed_size(url, state_packet(), reply_to="oona.{reply.tolaria.0123456789ab}",
                           correlation_id=uuid.uuid4().hex, deadline_ms=int(time.time() * 1000))
    rep_size = sealed_size(url, reply_message(), correlation_id=uuid.uuid4().hex)
    impls: list[RoundTrip] = [OonaRoundTrip(url), RawRoundTrip(url, req_size, rep_size),
                              FastStreamRoundTrip(url, req_size, rep_size)]
    for impl in impls:
        await impl.start()
    try:
        for impl in impls:
            for _ in range(sizes.rr_warmup):
                await impl.call()
        freeze_heap()
        samples: dict[str, list[float]] = {impl.name: [] for impl in impls}
        for rnd in range(sizes.rr_rounds):
            for impl in impls[rnd % len(impls):] + impls[:rnd % len(impls)]:
                await timed_calls(impl.call, sizes.rr_per_round, samples[impl.name])
    finally:
        for impl in impls:
            await impl.stop()
        gc.unfreeze()
    return {
        **latency_keys("rr", samples["oona"]),
        **latency_keys("raw_rr", samples["raw"]),
        **latency_keys("faststream_rr", samples["faststream"]),
        "rr_request_bytes": req_size,
        "rr_reply_bytes": rep_size,
        "faststream_rr_note": (
            "FastStream 0.7.8 RedisBroker.request(stream=...) XADDs to the stream and a StreamSub "
            "(group/consumer) subscriber replies; FastStream carries the reply over Redis pub/sub "
            "(SUBSCRIBE to a fresh per-request channel, PUBLISH, UNSUBSCRIBE), not over a reply stream. "
            "logger=None, bytes bodies of the same sizes, default BinaryMessageFormatV1."
        ),
    }


async def timed_calls(call: Callable[[], Awaitable[None]], n: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        await call()
        out.append(clock() - t0)


# -- throughput --------------------------------------------------------------------------------------


async def rate(n: int, body: Callable[[], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    await body()
    return n / (time.perf_counter() - t0)


async def bench_publish(url: str, sizes: Sizes) -> Result:
    """publish_many / publish on `state` (approximate MAXLEN 10 000) vs raw XADD MAXLEN ~ 10 000."""
    client = OonaClient.from_settings(settings(url), sender="tolaria")
    raw = Redis.from_url(url)
    await client.connect()
    await raw.ping()
    stream, maxlen = "raw.{publish}", channel("state").maxlen
    messages = [state_packet(i) for i in range(sizes.batch)]
    fields: Fields = {PAYLOAD: os.urandom(sealed_size(url, state_packet()))}
    n_batches = sizes.publish_n // sizes.batch

    async def ours_pipelined() -> None:
        for _ in range(n_batches):
            await client.publish_many("state", messages)

    async def raw_pipelined() -> None:
        for _ in range(n_batches):
            pipe = raw.pipeline(transaction=False)
            for _ in range(sizes.batch):
                pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)
            await pipe.execute()

    async def ours_single() -> None:
        msg = messages[0]
        for _ in range(sizes.unpipelined_n):
            await client.publish("state", msg)

    async def raw_single() -> None:
        for _ in range(sizes.unpipelined_n):
            await raw.xadd(stream, fields, maxlen=maxlen, approximate=True)

    await ours_pipelined()  # warm-up: streams exist and are at their cap, code paths are hot
    await raw_pipelined()
    freeze_heap()
    runs: dict[str, list[float]] = {"ours": [], "raw": [], "ours1": [], "raw1": []}
    try:
        for _ in range(sizes.tp_rounds):
            runs["ours"].append(await rate(n_batches * sizes.batch, ours_pipelined))
            runs["raw"].append(await rate(n_batches * sizes.batch, raw_pipelined))
            runs["ours1"].append(await rate(sizes.unpipelined_n, ours_single))
            runs["raw1"].append(await rate(sizes.unpipelined_n, raw_single))
    finally:
        gc.unfreeze()
        await client.close()
        await raw.aclose()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "publish_msgs_per_s": round(med["ours"]),
        "raw_publish_msgs_per_s": round(med["raw"]),
        "publish_ratio": round(med["ours"] / med["raw"], 3),
        "publish_unpipelined_msgs_per_s": round(med["ours1"]),
        "raw_publish_unpipelined_msgs_per_s": round(med["raw1"]),
        "publish_unpipelined_ratio": round(med["ours1"] / med["raw1"], 3),
        "publish_batch": sizes.batch,
        "publish_msgs": n_batches * sizes.batch,
        "publish_unpipelined_msgs": sizes.unpipelined_n,
    }


async def consume_ours_once(url: str, n: int, batch: int, ack_mode: AckMode) -> float:
    """Pre-publish N signed entries, then time Consumer.drain() (batched reads, no-op handler, acks)."""
    chan = Channel(f"bench.consume.{ack_mode}", maxlen=2 * n)
    s = settings(url, read_batch=batch)
    producer = OonaClient.from_settings(s, sender="tolaria")
    server = OonaClient.from_settings(s, sender="nissa")

    async def noop(_: Delivery) -> Message | None:
        return None

    consumer = Consumer(server, chan, group=GROUP, handler=noop, batch=batch, ack_mode=ack_mode)
    await consumer.start()
    messages = [state_packet(i) for i in range(min(n, 1_000))]
    for _ in range(n // len(messages)):
        await producer.publish_many(chan, messages)
    freeze_heap()
    try:
        per_s = await rate(n, consumer.drain)
    finally:
        gc.unfreeze()
    handled = consumer.stats.handled
    await consumer.close()
    await producer.close()
    await server.close()
    if handled != n:
        raise RuntimeError(f"consumer ({ack_mode} acks) handled {handled} of {n} entries")
    return per_s


async def consume_raw_once(url: str, sizes: Sizes, payload_size: int) -> float:
    """Pre-publish N raw entries, then time XREADGROUP COUNT batch + XACK of the batch until empty."""
    stream = "raw.{consume}"
    cmd = Redis.from_url(url)
    reader = Redis.from_url(url, single_connection_client=True)
    fields: Fields = {PAYLOAD: os.urandom(payload_size)}
    await cmd.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for _ in range(sizes.consume_n // 1_000):
        pipe = cmd.pipeline(transaction=False)
        for _ in range(1_000):
            pipe.xadd(stream, fields)
        await pipe.execute()
    handled = 0

    async def drain() -> None:
        nonlocal handled
        while True:
            resp: Any = await reader.xreadgroup(GROUP, "raw-1", {stream: ">"}, count=sizes.batch)
            if not resp or not resp[0][1]:
                return
            ids = [entry_id for entry_id, _fields in resp[0][1]]
            handled += len(ids)
            await cmd.xack(stream, GROUP, *ids)

    freeze_heap()
    try:
        per_s = await rate(sizes.consume_n, drain)
    finally:
        gc.unfreeze()
    await cmd.aclose()
    await reader.aclose()
    if handled != sizes.consume_n:
        raise RuntimeError(f"raw consumer handled {handled} of {sizes.consume_n} entries")
    return per_s


async def bench_consume(url: str, sizes: Sizes) -> Result:
    """Ours with ack_mode="batch" (one XACK+ZADD pipeline per read, like the raw loop) and with the
    default ack_mode="eager" (that pipeline after every entry), against raw XREADGROUP + batch XACK."""
    payload_size = sealed_size(url, state_packet())
    runs: dict[str, list[float]] = {"batch": [], "eager": [], "raw": []}
    for _ in range(sizes.tp_rounds):
        runs["batch"].append(await consume_ours_once(url, sizes.consume_n, sizes.batch, "batch"))
        await flushall(url)
        runs["eager"].append(await consume_ours_once(url, sizes.consume_eager_n, sizes.batch, "eager"))
        await flushall(url)
        runs["raw"].append(await consume_raw_once(url, sizes, payload_size))
        await flushall(url)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "consume_msgs_per_s": round(med["batch"]),
        "consume_ack_mode": "batch",
        "raw_consume_msgs_per_s": round(med["raw"]),
        "consume_ratio": round(med["batch"] / med["raw"], 3),
        "consume_eager_msgs_per_s": round(med["eager"]),
        "consume_eager_ratio": round(med["eager"] / med["raw"], 3),
        "consume_batch": sizes.batch,
        "consume_msgs": sizes.consume_n,
        "consume_eager_msgs": sizes.consume_eager_n,
    }


# -- emergency lane under a backlog ------------------------------------------------------------------


@dataclass(slots=True)
class Arrivals:
    """Latencies of emergency messages, from the send time carried in their key to handler entry."""

    expected: int
    seen: set[str]
    latencies: list[float]
    draining: asyncio.Event  # set once the consumer handles its first backlog entry
    done: asyncio.Event

    @classmethod
    def new(cls, expected: int) -> Arrivals:
        return cls(expected, set(), [], asyncio.Event(), asyncio.Event())

    def arrived(self, key: str) -> None:
        # perf_counter_ns is CLOCK_MONOTONIC: one clock for the alerter process and this one.
        now_ns = time.perf_counter_ns()
        if key in self.seen or not key.startswith("alert-"):
            return
        self.seen.add(key)
        self.latencies.append((now_ns - int(key.rsplit("-", 1)[1])) / 1e9)
        if len(self.latencies) >= self.expected:
            self.done.set()


GO_KEY = "bench.emergency.go"


def alerter_process(url: str, secret: str, target: str, raw: bool, sizes: Sizes, payload_size: int) -> None:
    """Entry point of the alerting process (spawned): a separate process, as in the fleet, so the
    measured latency is the consumer's, not time the publisher spent waiting for the same event loop."""
    uvloop.run(_alerts(url, secret, target, raw, sizes, payload_size))


async def _alerts(url: str, secret: str, target: str, raw: bool, sizes: Sizes, payload_size: int) -> None:
    r = Redis.from_url(url)
    body = os.urandom(payload_size)
    client = OonaClient.from_settings(
        OonaSettings(redis_url=url, leyline_secret=secret, emergency_max_per_min=EMERGENCY_BUCKET_PER_MIN),
        sender="weatherlight")
    await client.connect()
    chan = Channel(target, maxlen=2 * sizes.backlog_n)
    alert = state_packet(0)
    while not await r.exists(GO_KEY):  # noqa: ASYNC110 - set by another process: start with the drain
        await asyncio.sleep(0.001)
    for i in range(sizes.emergency_n):
        key = f"alert-{i:06d}-{time.perf_counter_ns()}"
        if raw:
            await r.xadd(target, {PAYLOAD: body, b"key": key.encode()}, maxlen=10_000, approximate=True)
        else:
            await client.publish(chan, alert, priority=pb.MESSAGE_PRIORITY_HIGH, message_id=key)
        await asyncio.sleep(sizes.emergency_interval_ms / 1000.0)
    await client.close()
    await r.aclose()


async def run_alerter(url: str, target: str, raw: bool, sizes: Sizes, arrivals: Arrivals, payload_size: int) -> None:
    """Start the alerting process, release it once the backlog drain has begun, wait for every alert."""
    proc = mp.get_context("spawn").Process(target=alerter_process,
                                           args=(url, SECRET, target, raw, sizes, payload_size))
    proc.start()
    try:
        await asyncio.wait_for(arrivals.draining.wait(), timeout=10.0)
        r = Redis.from_url(url)
        await r.set(GO_KEY, 1)
        await r.aclose()
        await asyncio.wait_for(arrivals.done.wait(), timeout=60.0)
    finally:
        await asyncio.to_thread(proc.join, 30)
        if proc.is_alive():
            proc.kill()


async def emergency_ours(url: str, sizes: Sizes, ack_mode: AckMode) -> tuple[list[float], Result]:
    """A Consumer drains a normal backlog while another client publishes HIGH-priority alerts."""
    s = settings(url, emergency_max_per_min=EMERGENCY_BUCKET_PER_MIN)
    chan = Channel(f"bench.backlog.{ack_mode}", maxlen=2 * sizes.backlog_n)
    filler = OonaClient.from_settings(s, sender="tolaria")
    server = OonaClient.from_settings(s, sender="tamiyo")
    arrivals = Arrivals.new(sizes.emergency_n)

    async def handler(d: Delivery) -> Message | None:
        if d.lane == "emergency":
            arrivals.arrived(d.message_id)
        else:
            arrivals.draining.set()
        return None

    consumer = Consumer(server, chan, group=GROUP, handler=handler, ack_mode=ack_mode)
    await consumer.start()
    messages = [state_packet(i) for i in range(1_000)]
    for _ in range(sizes.backlog_n // len(messages)):
        await filler.publish_many(chan, messages)
    freeze_heap()
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await run_alerter(url, chan.name, False, sizes, arrivals, 0)
        handled_normal = consumer.stats.handled - len(arrivals.latencies)
    finally:
        await stop_task(stop, task)
        gc.unfreeze()
        for c in (filler, server):
            await c.close()
    return arrivals.latencies, {
        "emergency_backlog": sizes.backlog_n,
        f"emergency_{ack_mode}_backlog_left_at_end": sizes.backlog_n - handled_normal,
        "emergency_read_batch": consumer.batch,
    }


class RawLaneConsumer:
    """Raw baseline: one XREADGROUP over both lanes, emergency entries handled first, one XACK per lane."""

    def __init__(self, url: str, normal: str, emergency: str, batch: int, arrivals: Arrivals) -> None:
        self.cmd = Redis.from_url(url)
        self.reader = Redis.from_url(url, single_connection_client=True)
        self.normal, self.emergency, self.batch = normal, emergency, batch
        self.arrivals = arrivals
        self.handled = 0

    async def run(self, stop: asyncio.Event) -> None:
        streams: dict[Any, Any] = {self.emergency: ">", self.normal: ">"}
        while not stop.is_set():
            resp: Any = await self.reader.xreadgroup(GROUP, "raw-1", streams, count=self.batch, block=200)
            if not resp:
                continue
            resp.sort(key=lambda item: item[0].decode() != self.emergency)
            pipe = self.cmd.pipeline(transaction=False)
            for stream, entries in resp:
                if stream.decode() == self.emergency:
                    for _entry_id, fields in entries:
                        self.arrivals.arrived(fields[b"key"].decode())
                self.handled += len(entries)
                self.arrivals.draining.set()
                pipe.xack(stream, GROUP, *[entry_id for entry_id, _ in entries])
            await pipe.execute()

    async def close(self) -> None:
        await self.cmd.aclose()
        await self.reader.aclose()


async def emergency_raw(url: str, sizes: Sizes, payload_size: int, batch: int) -> Result:
    normal, emergency = "raw.{backlog}", "raw.{backlog}.emergency"
    arrivals = Arrivals.new(sizes.emergency_n)
    consumer = RawLaneConsumer(url, normal, emergency, batch, arrivals)
    body = os.urandom(payload_size)
    for stream in (emergency, normal):
        await consumer.cmd.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for _ in range(sizes.backlog_n // 1_000):
        pipe = consumer.cmd.pipeline(transaction=False)
        for _ in range(1_000):
            pipe.xadd(normal, {PAYLOAD: body})
        await pipe.execute()

    freeze_heap()
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await run_alerter(url, emergency, True, sizes, arrivals, payload_size)
    finally:
        await stop_task(stop, task)
        gc.unfreeze()
        await consumer.close()
    return latency_keys("raw_emergency", arrivals.latencies)


async def bench_emergency(url: str, sizes: Sizes) -> Result:
    """Headline: the default Consumer (eager acks); also ack_mode="batch" and the raw two-lane loop."""
    eager, info = await emergency_ours(url, sizes, "eager")
    await flushall(url)
    batch, info_b = await emergency_ours(url, sizes, "batch")
    await flushall(url)
    raw = await emergency_raw(url, sizes, sealed_size(url, state_packet()), info["emergency_read_batch"])
    await flushall(url)
    return {
        **latency_keys("emergency", eager),
        "emergency_ack_mode": "eager",
        **latency_keys("emergency_batch_ack", batch),
        **info, **info_b, **raw,
        "emergency_interval_ms": sizes.emergency_interval_ms,
        "emergency_bucket_per_min": EMERGENCY_BUCKET_PER_MIN,
    }


# -- report ------------------------------------------------------------------------------------------


GOALS: list[tuple[str, str, Callable[[Result], bool]]] = [
    ("goal_rr_p50", "rr p50 <= 0.4 ms", lambda r: r["rr_p50_ms"] <= 0.4),
    ("goal_rr_p99", "rr p99 <= 1.0 ms", lambda r: r["rr_p99_ms"] <= 1.0),
    ("goal_rr_beats_faststream", "rr p99 < FastStream p99", lambda r: r["rr_p99_ms"] < r["faststream_rr_p99_ms"]),
    ("goal_publish", "publish >= 50% of raw", lambda r: r["publish_ratio"] >= 0.5),
    ("goal_consume", "consume >= 50% of raw (batch acks)", lambda r: r["consume_ratio"] >= 0.5),
    ("goal_consume_eager", "consume >= 50% of raw (default eager acks)", lambda r: r["consume_eager_ratio"] >= 0.5),
    ("goal_emergency_p99", "emergency p99 <= 2 ms (default eager acks)", lambda r: r["emergency_p99_ms"] <= 2.0),
    ("goal_emergency_batch_ack_p99", "emergency p99 <= 2 ms (batch acks)",
     lambda r: r["emergency_batch_ack_p99_ms"] <= 2.0),
]


def metadata(url: str, sizes: Sizes, loop_name: str) -> Result:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "redis_server_version": redis_version(url),
        "redis_py_version": importlib.metadata.version("redis"),
        "faststream_version": importlib.metadata.version("faststream"),
        "uvloop_version": importlib.metadata.version("uvloop"),
        "hiredis": HIREDIS_AVAILABLE,
        "event_loop": loop_name,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **git_state(),
        "sizes": ", ".join(f"{k}={v}" for k, v in vars_of(sizes).items()),
        "notes": (
            "One uvloop loop per process, a private redis-server (EmbeddedRedis, loopback, no persistence). "
            "Ours and baselines interleave round by round; throughput = median of rounds; latency percentiles "
            "are nearest-rank over all timed samples after a warm-up. gc.collect()+gc.freeze() after each "
            f"scenario's set-up and gen-0 threshold {GC_GEN0_THRESHOLD} for ours and baselines alike. "
            "Raw baselines send pre-built bytes of the signed envelope's size, so the ratios include Oona's "
            "pack/sign/verify, metrics, breakers, replay and idempotency bookkeeping. Emergency latency = "
            "handler entry - perf_counter_ns() (CLOCK_MONOTONIC) taken just before publish in a separate "
            "alerting process (as in the fleet), for ours and raw alike; the token bucket is raised to "
            f"{EMERGENCY_BUCKET_PER_MIN}/min (emergency_bucket_per_min) so it refuses none."
        ),
    }


def vars_of(sizes: Sizes) -> dict[str, Any]:
    return {name: getattr(sizes, name) for name in sizes.__slots__}


async def run_all(url: str, sizes: Sizes, log: Callable[[str], None]) -> Result:
    loop_name = type(asyncio.get_running_loop()).__module__
    if not loop_name.startswith("uvloop"):
        raise RuntimeError(f"not running on uvloop: {loop_name}")
    result: Result = {}
    scenarios: list[tuple[str, Callable[[str, Sizes], Awaitable[Result]]]] = [
        ("request/reply", bench_request_reply),
        ("publish", bench_publish),
        ("consume", bench_consume),
        ("emergency", bench_emergency),
    ]
    for label, scenario in scenarios:
        t0 = time.perf_counter()
        result.update(await scenario(url, sizes))
        await flushall(url)
        log(f"{label}: {time.perf_counter() - t0:.1f} s")
    result.update(metadata(url, sizes, loop_name))
    for key, _text, check in GOALS:
        result[key] = check(result)
    return result


def table(r: Result) -> str:
    rows = [
        ("request/reply p50 ms", r["rr_p50_ms"], r["raw_rr_p50_ms"], r["faststream_rr_p50_ms"], ""),
        ("request/reply p99 ms", r["rr_p99_ms"], r["raw_rr_p99_ms"], r["faststream_rr_p99_ms"], ""),
        ("publish pipelined msg/s", r["publish_msgs_per_s"], r["raw_publish_msgs_per_s"], "",
         r["publish_ratio"]),
        ("publish unpipelined msg/s", r["publish_unpipelined_msgs_per_s"],
         r["raw_publish_unpipelined_msgs_per_s"], "", r["publish_unpipelined_ratio"]),
        ("consume msg/s (batch acks)", r["consume_msgs_per_s"], r["raw_consume_msgs_per_s"], "",
         r["consume_ratio"]),
        ("consume msg/s (eager acks)", r["consume_eager_msgs_per_s"], r["raw_consume_msgs_per_s"], "",
         r["consume_eager_ratio"]),
        ("emergency p50 ms (eager)", r["emergency_p50_ms"], r["raw_emergency_p50_ms"], "", ""),
        ("emergency p99 ms (eager)", r["emergency_p99_ms"], r["raw_emergency_p99_ms"], "", ""),
        ("emergency p50 ms (batch)", r["emergency_batch_ack_p50_ms"], r["raw_emergency_p50_ms"], "", ""),
        ("emergency p99 ms (batch)", r["emergency_batch_ack_p99_ms"], r["raw_emergency_p99_ms"], "", ""),
    ]
    lines = [f"{'':28}{'oona':>12}{'raw':>12}{'faststream':>12}{'ours/raw':>10}"]
    lines += [f"{name:28}{a!s:>12}{b!s:>12}{c!s:>12}{d!s:>10}" for name, a, b, c, d in rows]
    lines.append("")
    lines += [f"{'MET ' if r[key] else 'MISS'} {text}" for key, text, _ in GOALS]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/oona.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for checking the script itself")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    logging.getLogger("faststream").setLevel(logging.WARNING)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    with EmbeddedRedis() as server:
        log(f"redis-server pid {server.pid} at {server.url}")
        result = uvloop.run(run_all(server.url, sizes, log))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(table(result))
    print(f"\nwrote {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
