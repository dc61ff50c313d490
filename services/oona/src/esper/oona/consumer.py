"""The consume loop: emergency lane first, consumer groups, ack after the handler, reclaim,
dead letters, idempotency by message_id. Split decode → dispatch → ack (STYLE: no 200-line run_job).

Delivery guarantees (at-least-once):
- An entry is acked only after its handler returned (or after it was dead-lettered).
- A handler error leaves the entry pending; any consumer of the group reclaims it with XAUTOCLAIM
  once it has been idle for the visibility timeout. After `max_deliveries` it is dead-lettered.
- `ack_mode="eager"` (default) acks right after each handler, so a crash can only ever repeat the
  one entry whose handler was running. `ack_mode="batch"` acks once per read batch (throughput
  consumers such as telemetry ingest): a crash may then repeat up to one batch of already-handled
  entries, which at-least-once delivery allows and idempotent handlers absorb.
- An ack that could not be written is kept and retried; until it lands, processed message ids are
  remembered in memory so the entry, if reclaimed by this consumer, is acked without a second run.
  (A shared Redis "processed" set was measured and dropped: written in the ack's own pipeline it
  protects nothing the ack does not, and it cost ~10% of consume throughput.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from google.protobuf.message import Message
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from esper.core.clock import now_ms, sleep_or_stop
from esper.core.errors import BreakerOpenError
from esper.core.logging import get_logger
from esper.leyline import (
    BoundedTTLMap,
    Channel,
    EnvelopeError,
    Lane,
    ReplayCache,
    channel,
    pb,
    reason_code,
)
from esper.oona.client import OonaClient, decode_id, ensure_group_on, valid_reply_target
from esper.oona.connection import RETRYABLE
from esper.oona.delivery import Delivery
from esper.oona.errors import OonaError, Reject
from esper.oona.inbound import PAYLOAD_FIELD, validate_entry

log = get_logger("esper.oona.consumer")

Handler = Callable[[Delivery], Awaitable[Message | None]]
# One XREADGROUP/XAUTOCLAIM entry as redis-py returns it (RESP2, bytes).
Entry = tuple[bytes, Mapping[bytes, bytes] | None]
AckMode = Literal["eager", "batch"]
StartAt = Literal["all", "latest"]
# Called after an entry was dead-lettered: (reason code, detail, lane). Lets a service turn a bus-level
# rejection (bad signature, stale) into its own domain event (e.g. Tamiyo's `policy_update_rejected`).
DeadLetterHook = Callable[[str, str, Lane], None]


@dataclass(slots=True)
class ConsumerStats:
    """Counters a test or drill can read without scraping Prometheus."""

    handled: int = 0
    handler_errors: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    reclaimed: int = 0
    reconnects: int = 0
    dead_reasons: dict[str, int] = field(default_factory=dict)


def default_consumer_name(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}"


class Consumer:
    """Consumes one channel (both lanes) in a consumer group and dispatches to `handler`.

    The handler gets a verified `Delivery`; it may return a Leyline message, which is sent to the
    request's `reply_to` in the same pipeline as the ack. Raise `Reject` to dead-letter at once;
    any other exception leaves the entry for redelivery.
    """

    def __init__(
        self,
        client: OonaClient,
        ch: str | Channel,
        *,
        group: str,
        handler: Handler,
        name: str | None = None,
        batch: int | None = None,
        block_ms: int | None = None,
        visibility_timeout_ms: int | None = None,
        claim_interval_ms: int | None = None,
        max_deliveries: int | None = None,
        ack_mode: AckMode = "eager",
        freshness_window_ms: int | None = None,
        start_at: StartAt = "all",
        ephemeral_group: bool = False,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        """`start_at="latest"` creates a new group just before each lane's newest entry (that entry and
        everything after it are delivered), for fan-out readers that only need the current state plus
        what follows; `ephemeral_group` destroys the group on `close()` (one group per process)."""
        s = client.settings
        self.client = client
        self.channel = ch if isinstance(ch, Channel) else channel(ch)
        self.group = group
        self.name = name or default_consumer_name(group)
        self.handler = handler
        self.batch = batch or s.read_batch
        self.block_ms = block_ms if block_ms is not None else s.block_ms
        self.visibility_timeout_ms = visibility_timeout_ms or s.visibility_timeout_ms
        self.claim_interval_ms = claim_interval_ms or s.claim_interval_ms
        self.max_deliveries = max_deliveries or s.max_deliveries
        self.ack_mode = ack_mode
        self.start_at = start_at
        self.ephemeral_group = ephemeral_group
        self.on_dead_letter = on_dead_letter
        # Durable channels (field reports) may accept older envelopes than the bus default so a
        # backlog survives an outage; the replay memory is sized to the window actually used.
        window_ms = freshness_window_ms or s.freshness_window_ms
        self.policy = dataclasses.replace(client.policy, window_ms=window_ms,
                                          max_bytes=self.channel.max_message_bytes or client.policy.max_bytes)
        self.stats = ConsumerStats()
        self.breaker = client._breaker("consume", reset_timeout_s=s.consume_breaker_reset_s)
        self._streams = self.channel.streams  # emergency first
        self._lane_of: dict[str, Lane] = {self.channel.emergency_stream: "emergency"}
        if self.channel.normal_stream is not None:
            self._lane_of[self.channel.normal_stream] = "normal"
        self._read_args: dict[Any, Any] = dict.fromkeys(self._streams, ">")
        self._replay = ReplayCache(capacity=s.replay_cache_size, ttl_ms=2 * window_ms)
        self._done = BoundedTTLMap(capacity=max(4 * s.replay_cache_size, 1024), ttl_ms=s.done_ttl_ms)
        self._last_error: BoundedTTLMap = BoundedTTLMap(capacity=1024, ttl_ms=s.done_ttl_ms)
        self._acks: dict[str, list[bytes]] = {}
        self._replies: list[tuple[str, bytes]] = []
        self._claim_cursor: dict[str, str] = {}
        self._conn: Redis | None = None
        self._next_claim = 0.0
        # Emergency entries that arrive while a normal batch is being handled are picked up between
        # normal entries: for free on each eager ack pipeline, or every `emergency_poll_ms` in batch mode.
        self._poll_emergency = self.channel.normal_stream is not None
        self._emergency_poll_s = s.emergency_poll_ms / 1000.0
        self._last_emergency_poll = 0.0
        self._emergency_read: dict[Any, Any] = {self.channel.emergency_stream: ">"}
        m = client.metrics
        cname = self.channel.name
        self._m_ok = {lane: m.consumed.labels(cname, lane, "ok") for lane in ("normal", "emergency")}
        self._m_err = {lane: m.consumed.labels(cname, lane, "error") for lane in ("normal", "emergency")}
        self._m_latency = m.handler_latency.labels(cname)
        self._m_dup = m.duplicates.labels(cname)

    # -- setup -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the group on both lanes (idempotent) and open the dedicated blocking connection."""
        for stream in self._streams:
            start = "0" if self.start_at == "all" else await _before_newest(self.client.redis, stream)
            await ensure_group_on(self.client.redis, stream, self.group, start_id=start)
        if self._conn is None:
            self._conn = self.client.blocking_connection()

    async def close(self) -> None:
        try:
            await self._flush()
            if self.ephemeral_group:
                for stream in self._streams:
                    await self.client.redis.xgroup_destroy(stream, self.group)
        finally:
            if self._conn is not None:
                await self._conn.aclose()
                self._conn = None

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- loop --------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; then finish the in-flight batch, flush acks and return."""
        backoff = 0.05
        try:
            while not stop.is_set():
                try:
                    if self._conn is None:
                        await self.start()  # inside the loop: Redis down at start-up means back off, not exit
                    await self.run_once()
                    backoff = 0.05
                except BreakerOpenError as e:
                    await sleep_or_stop(stop, min(e.retry_after_s, 1.0))
                except RETRYABLE as e:
                    # Redis went away: count, back off (bounded), reconnect on the next read.
                    self.breaker.record_failure()
                    self.stats.reconnects += 1
                    self.client.metrics.reconnects.inc()
                    log.warning("consume read failed; backing off", error=str(e), backoff_s=backoff,
                                channel=self.channel.name)
                    await self._reset_connection()
                    await sleep_or_stop(stop, backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            try:
                await self.close()
            except RETRYABLE as e:
                log.warning("could not flush acks on shutdown; entries will be redelivered", error=str(e))

    async def run_once(self, block_ms: int | None = None) -> int:
        """One cycle: reclaim if due, one read of both lanes, handle emergency entries first, ack."""
        self.breaker.check()
        seen = 0
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.claim_interval_ms / 1000.0
            seen += await self.reclaim()
        if self._conn is None:
            await self.start()
        assert self._conn is not None
        block = self.block_ms if block_ms is None else block_ms
        try:
            resp: Any = await self._conn.xreadgroup(self.group, self.name, self._read_args, count=self.batch,
                                               block=block or None)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning("consumer group missing (redis restarted without persistence?); recreating",
                        group=self.group, channel=self.channel.name)
            await self.start()
            return seen
        self.breaker.record_success()
        self._last_emergency_poll = time.perf_counter()  # this read just covered the emergency lane
        if resp:
            for stream, entries in _emergency_first(resp, self.channel.emergency_stream):
                await self._handle_batch(stream, entries, deliveries=None)
                seen += len(entries)
        await self._flush()
        return seen

    async def drain(self, *, max_idle_rounds: int = 1) -> int:
        """Burst mode for tests and drills (arq's burst=True): handle until both lanes are empty."""
        total, idle = 0, 0
        while idle < max_idle_rounds:
            n = await self.run_once(block_ms=0)
            total += n
            idle = idle + 1 if n == 0 else 0
        return total

    async def _reset_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(*RETRYABLE):
                await self._conn.aclose()
            self._conn = None

    # -- handling ----------------------------------------------------------------------------------

    async def _handle_batch(self, stream: str, entries: Sequence[Entry], deliveries: Mapping[str, int] | None) -> None:
        lane = self._lane_of.get(stream, "normal")
        # Peek at the emergency lane only while normal work remains in this batch: after the last
        # entry the next read covers both lanes anyway (and the request/reply path stays lean).
        poll = lane == "normal" and self._poll_emergency
        last = len(entries) - 1
        for i, (raw_id, fields) in enumerate(entries):
            more = poll and i < last
            due = time.perf_counter() - self._last_emergency_poll > self._emergency_poll_s
            if more and due and self.ack_mode == "batch":
                await self._handle_emergency_poll(await self.client.redis.xreadgroup(
                    self.group, self.name, self._emergency_read, count=self.batch))
            entry_id = decode_id(raw_id)
            count = 1 if deliveries is None else deliveries.get(entry_id, 1)
            await self._handle_entry(stream, lane, entry_id, fields or {}, count, poll_emergency=more)

    async def _handle_emergency_poll(self, resp: Any) -> None:
        """Handle what a non-blocking read of the emergency lane returned (before more normal work)."""
        self._last_emergency_poll = time.perf_counter()
        for stream, entries in resp or ():
            await self._handle_batch(decode_id(stream), entries, deliveries=None)

    async def _handle_entry(
        self,
        stream: str,
        lane: Lane,
        entry_id: str,
        fields: Mapping[bytes, bytes],
        deliveries: int,
        *,
        poll_emergency: bool = False,
    ) -> None:
        now = now_ms()
        try:
            env = validate_entry(fields, entry_id, policy=self.policy, now_ms=now, replay=self._replay)
        except EnvelopeError as e:
            await self._dead_letter(stream, entry_id, fields, e.reason, e.detail, deliveries)
            return
        if self._done.get(env.message_id, now) is not None:
            self.stats.duplicates += 1
            self._m_dup.inc()
            self._queue_ack(stream, entry_id)
            return
        if env.reply_to and not valid_reply_target(env.reply_to):
            await self._dead_letter(stream, entry_id, fields, pb.DEAD_LETTER_REASON_BAD_REPLY_TO,
                                    f"reply_to {env.reply_to[:200]!r} is not a reply or command stream", deliveries)
            return
        delivery = Delivery(env, self.channel.name, stream, entry_id, lane, deliveries)
        t0 = time.perf_counter()
        try:
            reply = await self.handler(delivery)
        except Reject as e:
            await self._dead_letter(stream, entry_id, fields, pb.DEAD_LETTER_REASON_HANDLER_REJECTED, str(e),
                                    deliveries)
            return
        except EnvelopeError as e:  # handler's own decode of the payload failed: never retryable
            await self._dead_letter(stream, entry_id, fields, e.reason, e.detail, deliveries)
            return
        except Exception as e:
            self._on_handler_error(stream, lane, entry_id, e, deliveries)
            if deliveries >= self.max_deliveries:
                await self._dead_letter(stream, entry_id, fields, pb.DEAD_LETTER_REASON_MAX_DELIVERIES,
                                        f"handler failed on delivery {deliveries}: {e!r}", deliveries)
            return
        self._m_latency.observe(time.perf_counter() - t0)
        self._m_ok[lane].inc()
        self.stats.handled += 1
        self._done.put(env.message_id, entry_id, now)
        try:
            out = self.client.reply_entry(delivery, reply) if reply is not None else None
        except (EnvelopeError, OonaError) as e:
            # The handler ran but its reply cannot be sent (not a bus message, oversize): surface it
            # as a dead letter with the reason instead of letting one bad reply kill the consumer.
            await self._dead_letter(stream, entry_id, fields, pb.DEAD_LETTER_REASON_HANDLER_REJECTED,
                                    f"handler returned an unsendable reply: {e}", deliveries)
            return
        self._queue_ack(stream, entry_id)
        if out is not None or self.ack_mode == "eager":
            urgent = await self._flush(reply=out, poll_emergency=poll_emergency)
            if urgent:
                await self._handle_emergency_poll(urgent)

    def _on_handler_error(self, stream: str, lane: Lane, entry_id: str, e: Exception, deliveries: int) -> None:
        self.stats.handler_errors += 1
        self._m_err[lane].inc()
        self._last_error.put(entry_id, repr(e)[:500], now_ms())
        log.warning("handler failed; entry left pending for redelivery", channel=self.channel.name,
                    entry_id=entry_id, deliveries=deliveries, max_deliveries=self.max_deliveries, error=repr(e))

    def _queue_ack(self, stream: str, entry_id: str) -> None:
        self._acks.setdefault(stream, []).append(entry_id.encode())

    async def _flush(self, reply: tuple[str, bytes] | None = None, *, poll_emergency: bool = False) -> Any:
        """Replies and XACKs in one round trip; with `poll_emergency`, the same round trip also reads
        the emergency lane (non-blocking) and returns what it found.

        Acks and replies are cleared only once Redis confirmed them: if the pipeline fails they are
        put back, so a later flush (or `close()`) still sends what was handled.
        """
        if reply is not None:
            self._replies.append(reply)
        if not self._acks and not self._replies:
            return None
        acks, self._acks = self._acks, {}
        replies, self._replies = self._replies, []
        pipe = self.client.redis.pipeline(transaction=False)
        for to, raw in replies:
            pipe.xadd(to, {PAYLOAD_FIELD: raw}, maxlen=self.client.settings.reply_maxlen, approximate=True)
        for stream, ids in acks.items():
            pipe.xack(stream, self.group, *ids)
        if poll_emergency:
            pipe.xreadgroup(self.group, self.name, self._emergency_read, count=self.batch)
        try:
            results = await pipe.execute()
        except BaseException:
            for stream, ids in acks.items():
                self._acks.setdefault(stream, [])[:0] = ids
            self._replies[:0] = replies
            raise
        return results[-1] if poll_emergency else None

    async def _dead_letter(
        self,
        stream: str,
        entry_id: str,
        fields: Mapping[bytes, bytes],
        reason: pb.DeadLetterReason.ValueType,
        detail: str,
        deliveries: int,
    ) -> None:
        pipe = self.client.redis.pipeline(transaction=False)
        self.client.add_dead_letter(pipe, channel_name=self.channel.name, stream=stream, entry_id=entry_id,
                                    fields=fields, reason=reason, detail=detail, group=self.group,
                                    consumer=self.name, deliveries=deliveries)
        pipe.xack(stream, self.group, entry_id)
        await pipe.execute()
        self.stats.dead_lettered += 1
        code = pb.DeadLetterReason.Name(reason)
        self.stats.dead_reasons[code] = self.stats.dead_reasons.get(code, 0) + 1
        if self.on_dead_letter is not None:
            self.on_dead_letter(reason_code(reason), detail, self._lane_of.get(stream, "normal"))

    # -- reclaim -----------------------------------------------------------------------------------

    async def reclaim(self) -> int:
        """XAUTOCLAIM one page per lane of entries idle past the visibility timeout; dead-letter the
        over-delivered ones, skip the ones this consumer already processed, handle the rest.

        One page per call (the cursor is kept between calls) so a large reclaim backlog never holds
        the emergency lane: the regular read, emergency first, runs between pages. Emergency lane
        pages are taken first. Returns how many entries it took over.
        """
        total = 0
        for stream in self._streams:
            start = self._claim_cursor.get(stream, "0-0")
            try:
                res = await self.client.redis.xautoclaim(stream, self.group, self.name,
                                                         min_idle_time=self.visibility_timeout_ms,
                                                         start_id=start, count=self.batch)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                await self.start()
                continue
            self._claim_cursor[stream] = decode_id(res[0])
            entries: list[Entry] = [(i, f) for i, f in res[1] if f is not None]
            trimmed = len(res[2]) if len(res) > 2 else 0
            if trimmed:
                self.client.metrics.trimmed_pending.labels(self.channel.name).inc(trimmed)
                log.warning("pending entries were trimmed before processing", stream=stream, count=trimmed)
            if entries:
                total += len(entries)
                self.stats.reclaimed += len(entries)
                self.client.metrics.reclaimed.labels(self.channel.name).inc(len(entries))
                await self._handle_reclaimed(stream, entries)
        await self._flush()
        return total

    async def _handle_reclaimed(self, stream: str, entries: list[Entry]) -> None:
        ids = [decode_id(i) for i, _ in entries]
        counts = await self._delivery_counts(stream, ids)
        lane = self._lane_of.get(stream, "normal")
        poll = lane == "normal" and self._poll_emergency
        last_index = len(entries) - 1
        for i, ((_raw_id, fields), entry_id) in enumerate(zip(entries, ids, strict=True)):
            n = counts.get(entry_id)
            f = fields or {}
            if n is None:  # acked by someone else since the claim: not ours any more
                continue
            if n > self.max_deliveries:
                last = self._last_error.get(entry_id, now_ms()) or "consumer died or stalled while handling it"
                await self._dead_letter(stream, entry_id, f, pb.DEAD_LETTER_REASON_MAX_DELIVERIES,
                                        f"delivered {n} times (max {self.max_deliveries}); last error: {last}", n)
            else:
                await self._handle_entry(stream, lane, entry_id, f, n, poll_emergency=poll and i < last_index)

    async def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        """Exact delivery count per claimed id (one XPENDING per id, one round trip): a range query
        could be crowded out by this consumer's other pending entries and miss some."""
        pipe = self.client.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1)
        counts: dict[str, int] = {}
        for rows in await pipe.execute():
            for r in rows:
                counts[decode_id(r["message_id"])] = int(r["times_delivered"])
        return counts


async def _before_newest(redis: Redis, stream: str) -> str:
    """The id a group must start at to deliver `stream`'s newest entry and all later ones."""
    newest = await redis.xrevrange(stream, count=2) or []
    return decode_id(newest[1][0]) if len(newest) == 2 else "0"


def _emergency_first(resp: Sequence[Any], emergency_stream: str) -> list[tuple[str, Sequence[Entry]]]:
    out = [(decode_id(s), entries) for s, entries in resp]
    out.sort(key=lambda item: item[0] != emergency_stream)
    return out


__all__ = ["Consumer", "ConsumerStats", "Handler"]
